"""Initial neuron partitions and router initialisation (METHOD.md sections 5 and 7). Pure torch.

A *partition* is a LongTensor `[d_ff]` giving each neuron its column: `0..E-1` for the routed
experts, `spec.num_experts` for the shared expert when `spec.shared > 0`. Column `e` holds exactly
`spec.column_capacities[e]` neurons (`check_partition` enforces this).

- `random_partition`: uniformly random, capacity-exact.
- `kmeans_partition`: balanced spherical k-means on each neuron's normalised `[W_g row ; W_u row]`
  (MoEfication / LLaMA-MoE style); the shared expert takes the most important neurons.
- `coactivation_partition`: balanced spherical k-means on the neurons' activation-magnitude
  patterns over calibration tokens; the shared expert takes the most strongly active neurons.
- `activation_importance`: the activation-weighted norm that structured pruning keeps by.
- `initial_scores`: Theta = beta * one_hot(partition), so DOT starts where the heuristic ends.
- `router_init`, `fit_router_lstsq`, `scale_router`: a router whose initial gates are near-uniform.

No distributed or DeepSpeed code lives here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dotmoe_ds.sinkhorn import assign_by_score, sinkhorn
from dotmoe_ds.spec import MoESpec

DEFAULT_KMEANS_ITERS = 20
# Intermediate k-means assignments only steer the centroids, so they get a short swap refinement;
# the returned assignment gets the full one (sinkhorn.assign_by_score's default).
KMEANS_REFINE_ROUNDS = 5
FINAL_REFINE_ROUNDS = 50
# k-means++ seeding looks at max(KMEANS_PP_MIN_SAMPLE, KMEANS_PP_SAMPLE_PER_CLUSTER * E) random
# rows (all rows of FFNs up to that size), see _kmeans_pp_init.
KMEANS_PP_MIN_SAMPLE = 4096
KMEANS_PP_SAMPLE_PER_CLUSTER = 64
# Router logit spread at initialisation. At 0.1, E * p_e ~ exp(l_e - mean l) is typically within
# 10% of 1 (20% at two standard deviations), so the top-k gates k * p_e / sum_topk p are all close
# to 1 and the converted layer starts as "the plain sum of the chosen experts" (what oracle routing
# measures), while the *ranking* of the experts, which decides the top-k, is the heuristic's.
# Larger spreads let an untrained router amplify one expert by up to k (anchors/README.md: 81M).
DEFAULT_LOGIT_STD = 0.1
_EPS = 1e-12


# ----------------------------------------------------------------------------- checks

def check_partition(partition: Tensor, spec: MoESpec) -> None:
    """Raise ValueError unless `partition` is a capacity-exact column index per neuron for `spec`."""
    if not isinstance(partition, Tensor) or partition.dtype != torch.long:
        raise ValueError(f"a partition must be a LongTensor, got {type(partition).__name__}"
                         f"{'' if not isinstance(partition, Tensor) else ' of ' + str(partition.dtype)}")
    if partition.shape != (spec.d_ff,):
        raise ValueError(f"a partition must have shape [d_ff] = [{spec.d_ff}], got {tuple(partition.shape)}")
    if partition.numel() and (partition.min() < 0 or partition.max() >= spec.num_columns):
        raise ValueError(f"partition values must lie in 0..{spec.num_columns - 1} (routed experts"
                         f"{', then the shared expert' if spec.has_shared else ''}), got "
                         f"{partition.min().item()}..{partition.max().item()}")
    counts = torch.bincount(partition, minlength=spec.num_columns).tolist()
    if counts != list(spec.column_capacities):
        raise ValueError(f"partition fills the columns with {counts} neurons but the spec's capacities are "
                         f"{list(spec.column_capacities)}: every column must be exactly full")


def _check_ffn_weights(gate_weight: Tensor, up_weight: Tensor, spec: MoESpec,
                       down_weight: Tensor | None = None) -> None:
    if gate_weight.dim() != 2:
        raise ValueError(f"gate_weight must be [d_ff, d], got shape {tuple(gate_weight.shape)}")
    if up_weight.shape != gate_weight.shape:
        raise ValueError(f"gate_weight {tuple(gate_weight.shape)} and up_weight {tuple(up_weight.shape)} must "
                         "have the same shape [d_ff, d] (rows are neurons); pass the nn.Linear weights "
                         "of gate_proj and up_proj")
    if gate_weight.shape[0] != spec.d_ff:
        raise ValueError(f"gate_weight has {gate_weight.shape[0]} rows (neurons) but spec.d_ff is {spec.d_ff}")
    if down_weight is not None and down_weight.shape != (gate_weight.shape[1], spec.d_ff):
        raise ValueError(f"down_weight must be [d, d_ff] = [{gate_weight.shape[1]}, {spec.d_ff}] (the "
                         f"down_proj nn.Linear weight), got {tuple(down_weight.shape)}")


def _check_activations(activations: Tensor, spec: MoESpec | None, d_ff: int | None = None) -> None:
    d_ff = spec.d_ff if spec is not None else d_ff
    if activations.dim() != 2 or activations.shape[1] != d_ff:
        raise ValueError(f"activations must be [tokens, d_ff] = [T, {d_ff}] (the input of down_proj, "
                         f"act(W_g x) * (W_u x), flattened over batch and sequence), got "
                         f"{tuple(activations.shape)}")
    if activations.shape[0] < 2:
        raise ValueError(f"activations hold {activations.shape[0]} tokens; need at least 2 calibration tokens")
    if not torch.isfinite(activations).all():
        raise ValueError("activations contain NaN or inf; check the calibration forward pass")


def _check_importance(importance: Tensor, spec: MoESpec) -> None:
    if importance.shape != (spec.d_ff,):
        raise ValueError(f"importance must be [d_ff] = [{spec.d_ff}], got {tuple(importance.shape)}")
    if not torch.isfinite(importance).all():
        raise ValueError("importance contains NaN or inf")


# ----------------------------------------------------------------------------- random

def random_partition(spec: MoESpec, seed: int) -> Tensor:
    """Uniformly random capacity-exact partition; the same seed gives the same partition."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(spec.d_ff, generator=g)
    ends = torch.tensor(spec.column_capacities).cumsum(0)
    columns = torch.bucketize(torch.arange(spec.d_ff), ends, right=True)   # column e repeated c_e times
    partition = torch.empty(spec.d_ff, dtype=torch.long)
    partition[perm] = columns
    return partition


# ----------------------------------------------------------------------------- balanced k-means

class _RowFeatures:
    """Rows of `concat(parts, dim=1) * inv_norm[:, None]` without materialising the concatenation,
    so k-means on [W_g ; W_u] of a 28672 x 8192 FFN costs no copy of the weights."""

    def __init__(self, parts: list[Tensor]):
        self.parts = parts
        self.inv_norm = _row_norms(parts).clamp_min(_EPS).reciprocal()   # zero rows stay zero
        self.n = parts[0].shape[0]
        self.device = parts[0].device

    def rows(self, idx: Tensor) -> list[Tensor]:
        return [p[idx] * self.inv_norm[idx, None] for p in self.parts]

    def similarity(self, centroids: list[Tensor]) -> Tensor:
        """Cosine similarity `[n, E]` of every row to unit-norm centroids."""
        return sum(p @ c.T for p, c in zip(self.parts, centroids)) * self.inv_norm[:, None]

    def cluster_sums(self, assign: Tensor, E: int) -> list[Tensor]:
        """Per cluster, the sum of its normalised rows (a one-hot matmul, no [n, D] temporary)."""
        w = torch.zeros(E, self.n, dtype=self.inv_norm.dtype, device=self.device)
        w[assign, torch.arange(self.n, device=self.device)] = self.inv_norm
        return [w @ p for p in self.parts]


def _row_norms(parts: list[Tensor]) -> Tensor:
    """Norm of each row of concat(parts, dim=1), without an [n, D] temporary."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p, dim=1) for p in parts]), dim=0)


def _unit_rows(parts: list[Tensor]) -> list[Tensor]:
    norm = _row_norms(parts).clamp_min(_EPS)
    return [p / norm[:, None] for p in parts]


def _kmeans_pp_init(feats: _RowFeatures, E: int, gen: torch.Generator) -> list[Tensor]:
    """Greedy k-means++ seeding (as scikit-learn does) on cosine distance 1 - cos: each step draws
    `2 + log(E)` candidates by D^2 sampling and keeps the one that lowers the total D^2 most, which
    makes "two seeds in one natural cluster" (a local optimum balanced k-means rarely escapes)
    much rarer than plain k-means++. Costs `E * trials` similarity columns: small next to one
    k-means iteration."""
    trials = 2 + int(math.log(E))
    max_rows = max(KMEANS_PP_MIN_SAMPLE, KMEANS_PP_SAMPLE_PER_CLUSTER * E)
    if feats.n > max_rows:
        # Seeding only needs to land one seed per natural cluster: a random subsample that still
        # holds many rows per cluster does that at a fraction of the full passes' memory traffic.
        sample = torch.randperm(feats.n, generator=gen)[:max_rows].to(feats.device)
        feats = _RowFeatures([p[sample] for p in feats.parts])
    first = torch.randint(feats.n, (1,), generator=gen).to(feats.device)
    centroids = _unit_rows(feats.rows(first))
    dist = (1 - feats.similarity(centroids)[:, 0]).clamp_min(0)
    for _ in range(1, E):
        weights = dist.pow(2)
        if weights.sum() <= 0:                       # fewer distinct directions than clusters
            weights = torch.ones_like(weights)
        # drawn on the CPU so the same seed gives the same seeds on any device
        cand = torch.multinomial(weights.cpu(), trials, replacement=True, generator=gen).to(feats.device)
        new = _unit_rows(feats.rows(cand))
        cand_dist = torch.minimum(dist[:, None], (1 - feats.similarity(new)).clamp_min(0))   # [n, trials]
        best = cand_dist.pow(2).sum(0).argmin()
        centroids = [torch.cat([c, n[best:best + 1]]) for c, n in zip(centroids, new)]
        dist = cand_dist[:, best]
    return centroids


def _match_centroids_to_capacities(sim: Tensor, capacities: list[int] | tuple[int, ...]) -> Tensor:
    """Which centroid should fill which column when capacities differ: `perm[e]` is the centroid
    for column e. Centroid k's value for a column of capacity c is the sum of its c largest
    similarities (what it would collect ignoring the others); the best one-to-one matching of
    those values is itself a capacity-1 assignment. Without this step, a centroid seeded in a big
    natural cluster but sitting in a small column stays there, and k-means cannot recover."""
    caps = torch.tensor(capacities, device=sim.device)
    top = sim.sort(dim=0, descending=True).values.cumsum(0)     # [n, K]: sum of the c best rows
    value = top[caps - 1].T                                       # [K centroids, E columns]
    col_of_centroid = assign_by_score(value, [1] * len(capacities))
    return torch.argsort(col_of_centroid)


def balanced_kmeans(parts: list[Tensor], capacities: list[int] | tuple[int, ...], seed: int,
                    n_iters: int = DEFAULT_KMEANS_ITERS, n_init: int = 1) -> tuple[Tensor, float]:
    """Capacity-exact spherical k-means on the rows of `concat(parts, dim=1)`, each row normalised.

    Assignment step: `assign_by_score` on the cosine similarities to the unit centroids, so cluster
    e gets exactly `capacities[e]` rows (with unequal capacities the centroids are first matched
    to the columns, `_match_centroids_to_capacities`). Update step: centroid = normalised mean of
    its rows. Stops when the assignment repeats or after `n_iters` assignments. `n_init` restarts
    from different seedings keep the best objective (the local optimum depends on the seeding:
    on SmolLM2-135M layers the objective varies by up to ~4% across seeds).
    Returns `(assign [n] on the CPU, objective)`, objective = sum over rows of the cosine similarity
    to their own cluster's mean direction (= sum_e ||sum of e's unit rows||). The best assignment
    seen is returned: the approximate capacity-exact assignment need not improve monotonically.
    Runs on the device of `parts`; the result depends only on `seed` and the data.
    """
    n, E = parts[0].shape[0], len(capacities)
    if sum(capacities) != n:
        raise ValueError(f"capacities sum to {sum(capacities)} but there are {n} rows to cluster")
    if n_iters < 1 or n_init < 1:
        raise ValueError(f"n_iters and n_init must be at least 1, got {n_iters} and {n_init}")
    if E == 1:
        return torch.zeros(n, dtype=torch.long), float("nan")
    feats = _RowFeatures(parts)
    gen = torch.Generator().manual_seed(seed)
    uneven = len(set(capacities)) > 1
    best_assign, best_obj = None, -math.inf

    def step(centroids: list[Tensor], refine_rounds: int):
        sim = feats.similarity(centroids)
        if uneven:
            perm = _match_centroids_to_capacities(sim, capacities)
            sim = sim[:, perm]
        assign = assign_by_score(sim, list(capacities), refine_rounds=refine_rounds)
        sums = feats.cluster_sums(assign, E)
        norms = _row_norms(sums)
        return assign, norms.sum().item(), [c / norms.clamp_min(_EPS)[:, None] for c in sums]

    for _ in range(n_init):
        centroids, prev = _kmeans_pp_init(feats, E, gen), None
        for it in range(n_iters):
            last = it == n_iters - 1
            assign, obj, centroids = step(centroids, FINAL_REFINE_ROUNDS if last else KMEANS_REFINE_ROUNDS)
            if obj > best_obj:
                best_assign, best_obj = assign, obj
            if prev is not None and torch.equal(assign, prev):
                break
            prev = assign
        if not last:   # converged early: polish the final assignment with the full refinement
            assign, obj, _ = step(centroids, FINAL_REFINE_ROUNDS)
            if obj > best_obj:
                best_assign, best_obj = assign, obj
    return best_assign.cpu(), best_obj


def clustering_objective(parts: list[Tensor], assign: Tensor, num_clusters: int) -> float:
    """Sum over rows of the cosine similarity to their cluster's mean direction (higher is tighter)."""
    feats = _RowFeatures(parts)
    return _row_norms(feats.cluster_sums(assign.to(feats.device), num_clusters)).sum().item()


def _partition_with_shared(spec: MoESpec, importance: Tensor | None, cluster_fn) -> Tensor:
    """Shared column = the `spec.shared` most important neurons; `cluster_fn(rows)` assigns the rest
    (CPU indices, ascending) to the routed experts, capacity-exactly. Returns a CPU partition."""
    partition = torch.empty(spec.d_ff, dtype=torch.long)
    if spec.has_shared:
        shared = torch.topk(importance.detach().float().cpu(), spec.shared).indices
        routed_mask = torch.ones(spec.d_ff, dtype=torch.bool)
        routed_mask[shared] = False
        routed = routed_mask.nonzero().squeeze(1)
        partition[shared] = spec.num_experts
    else:
        routed = torch.arange(spec.d_ff)
    partition[routed] = cluster_fn(routed)
    check_partition(partition, spec)
    return partition


def weight_importance(gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor | None = None) -> Tensor:
    """Data-free neuron importance ||W_g[j]|| * ||W_u[j]|| (* ||W_d[:, j]|| when given): neuron j's
    output is about (W_g[j] . x) * (W_u[j] . x) * W_d[:, j], so this bounds its size per unit input."""
    imp = gate_weight.float().norm(dim=1) * up_weight.float().norm(dim=1)
    if down_weight is not None:
        imp = imp * down_weight.float().norm(dim=0)
    return imp


def kmeans_partition(gate_weight: Tensor, up_weight: Tensor, spec: MoESpec, seed: int,
                     n_iters: int = DEFAULT_KMEANS_ITERS, *, n_init: int = 1,
                     down_weight: Tensor | None = None, importance: Tensor | None = None) -> Tensor:
    """Balanced k-means partition (MoEfication / LLaMA-MoE style) of one FFN's neurons.

    gate_weight, up_weight: `[d_ff, d]`; down_weight (optional): `[d, d_ff]`, only used for the
    default importance. Each neuron is the unit vector of `[W_g[j] ; W_u[j]]`; clusters are
    capacity-exact (`spec.capacities`). With a shared expert, the `spec.shared` neurons of highest
    `importance` (default `weight_importance`) form it and only the rest are clustered.
    Memory: the weights (as fp32) plus `[d_ff, E]` similarities; no pairwise distances.
    """
    _check_ffn_weights(gate_weight, up_weight, spec, down_weight)
    g, u = gate_weight.detach().float(), up_weight.detach().float()
    if spec.has_shared:
        if importance is None:
            importance = weight_importance(g, u, None if down_weight is None else down_weight.detach())
        _check_importance(importance, spec)

    def cluster(rows: Tensor) -> Tensor:
        rows = rows.to(g.device)
        parts = [g, u] if rows.numel() == spec.d_ff else [g[rows], u[rows]]
        return balanced_kmeans(parts, spec.capacities, seed, n_iters, n_init)[0]

    return _partition_with_shared(spec, importance, cluster)


# ----------------------------------------------------------------------------- calibration-based

def activation_importance(activations: Tensor, down_weight: Tensor, p: float = 1.0) -> Tensor:
    """Activation-weighted norm `mean_t(|h_tj|^p)^(1/p) * ||W_d[:, j]||` per neuron (METHOD.md
    section 7: structured pruning keeps the largest). activations: `[T, d_ff]` inputs of down_proj;
    down_weight: `[d, d_ff]`. p=1 is the mean magnitude; p=2 (RMS) is what anchors/prune50.py used."""
    if down_weight.dim() != 2:
        raise ValueError(f"down_weight must be [d, d_ff], got {tuple(down_weight.shape)}")
    _check_activations(activations, None, down_weight.shape[1])
    h = activations.detach().float().abs()
    mag = h.mean(0) if p == 1 else h.pow(p).mean(0).pow(1.0 / p)
    return mag * down_weight.detach().float().norm(dim=0)


def coactivation_features(activations: Tensor) -> Tensor:
    """Per neuron `[d_ff, T]`: its activation *magnitude* pattern over tokens, made comparable.

    - |h|: routing chooses experts by how much they contribute to a token, whatever the sign, and
      SwiGLU has no exact zeros, so on/off indicators would need an arbitrary threshold.
    - divided per token by that token's RMS over neurons: top-k routing only compares experts
      within a token, and a few tokens (e.g. the first of a sequence) have activations orders of
      magnitude above the rest and would otherwise decide every similarity.
    - centred per neuron over tokens: magnitudes are all positive, so uncentred cosines are all
      close to 1 and dominated by the average pattern; centring makes the cosine the Pearson
      correlation of two neurons' magnitudes, i.e. how much they are active *together*.
    """
    a = activations.detach().float().abs()
    a = a / a.pow(2).mean(1, keepdim=True).sqrt().clamp_min(_EPS)
    a = a - a.mean(0, keepdim=True)
    return a.T


def coactivation_partition(activations: Tensor, spec: MoESpec, seed: int,
                           n_iters: int = DEFAULT_KMEANS_ITERS, *, n_init: int = 1,
                           importance: Tensor | None = None, down_weight: Tensor | None = None) -> Tensor:
    """Balanced k-means on the neurons' co-activation patterns (`coactivation_features`).

    activations: `[T, d_ff]` calibration values of `act(W_g x) * (W_u x)`. With a shared expert,
    the `spec.shared` neurons of highest `importance` form it (default: `activation_importance`
    with `down_weight` if given, else the mean |h_j|: the most strongly active neurons, which
    almost every token needs).
    """
    _check_activations(activations, spec)
    if spec.has_shared:
        if importance is None:
            if down_weight is not None:
                if down_weight.dim() != 2 or down_weight.shape[1] != spec.d_ff:
                    raise ValueError(f"down_weight must be [d, d_ff={spec.d_ff}], got {tuple(down_weight.shape)}")
                importance = activation_importance(activations, down_weight)
            else:
                importance = activations.detach().float().abs().mean(0)
        _check_importance(importance, spec)
    feats = coactivation_features(activations)

    def cluster(rows: Tensor) -> Tensor:
        return balanced_kmeans([feats if rows.numel() == spec.d_ff else feats[rows.to(feats.device)]],
                               spec.capacities, seed, n_iters, n_init)[0]

    return _partition_with_shared(spec, importance, cluster)


def importance_partition(importance: Tensor, spec: MoESpec) -> Tensor:
    """Importance-stratified partition *(ours)*: neurons sorted by `importance` (highest first) fill
    the shared expert, then expert 0, expert 1, ... in that order, each to its capacity.

    Why: structured pruning to the same budget is the strongest untrained baseline (anchors), and
    with this partition a router that picks experts 0..k-1 for every token *is* that pruning; a
    router fitted to the experts' output norms (lstsq) starts close to it and training can only add
    token-dependent choices. Measured untrained on SmolLM2-135M, E=8, k=4, calibration-side text
    (Mansfield Park, 4k tokens), lstsq router: 126.7 perplexity vs 2,028 for balanced k-means and
    101.5 for pruning itself (dense 36.6; `tools/probe_init.py`).
    importance: `[d_ff]`, e.g. `activation_importance(h, W_d, p=2)`. Ties go to the lower index.
    """
    _check_importance(importance, spec)
    imp = importance.detach().float().cpu()
    # stable descending order: ties keep the lower neuron index first
    order = torch.sort(-imp, stable=True).indices
    partition = torch.empty(spec.d_ff, dtype=torch.long)
    columns = ([spec.num_experts] if spec.has_shared else []) + list(range(spec.num_experts))
    start = 0
    for col in columns:
        cap = spec.column_capacities[col]
        partition[order[start:start + cap]] = col
        start += cap
    check_partition(partition, spec)
    return partition


# ----------------------------------------------------------------------------- assignment scores

def initial_scores(partition: Tensor, spec: MoESpec, beta: float) -> Tensor:
    """Theta `[d_ff, num_columns]` = beta * one_hot(partition) (METHOD.md section 5).

    How beta sets the starting confidence: at temperature tau, Sinkhorn(Theta / tau) with uniform
    column capacities (all `spec.column_capacities` equal) puts exactly
        q = exp(beta / tau) / (exp(beta / tau) + E' - 1)        (E' = spec.num_columns)
    of each neuron's mass on its own column (that plan already has the right column sums), so
    `beta = tau * log(q * (E' - 1) / (1 - q))` (`beta_for_confidence`). E.g. E' = 8, tau = 1:
    beta = 3 gives q = 0.74, beta = 5 gives q = 0.95. With unequal capacities q differs per column;
    `initial_confidence` measures it. The rounded plan equals `partition` for any beta > 0.
    """
    check_partition(partition, spec)
    if not beta > 0:
        raise ValueError(f"beta must be positive (the confidence in the initial partition), got {beta}")
    return beta * torch.nn.functional.one_hot(partition, spec.num_columns).float()


def beta_for_confidence(confidence: float, num_columns: int, tau: float = 1.0) -> float:
    """The beta at which a uniform-capacity plan at temperature tau puts `confidence` of each
    neuron's mass on its initial column (see `initial_scores`)."""
    if num_columns < 2:
        raise ValueError("with one column there is no choice to be confident about")
    if not 1.0 / num_columns < confidence < 1.0:
        raise ValueError(f"confidence must be in (1/{num_columns}, 1) (1/E' is a uniform plan), got {confidence}")
    return tau * math.log(confidence * (num_columns - 1) / (1 - confidence))


def initial_confidence(partition: Tensor, spec: MoESpec, beta: float, tau: float = 1.0) -> Tensor:
    """Per column, the mean mass its own neurons keep on it in Sinkhorn(initial_scores / tau)."""
    plan = sinkhorn(initial_scores(partition, spec, beta), spec.column_capacities, tau,
                    n_iters=1000, tol=1e-6)
    own = plan.gather(1, partition[:, None]).squeeze(1)
    return torch.zeros(spec.num_columns).index_add_(0, partition, own) / torch.tensor(
        spec.column_capacities, dtype=torch.float32)


# ----------------------------------------------------------------------------- router

def router_logit_spread(router_weight: Tensor, hidden_states: Tensor) -> float:
    """RMS over tokens of the standard deviation of the logits across experts. Softmax ignores a
    per-token shift, so this spread alone sets how far the gates are from uniform."""
    logits = hidden_states.detach().float() @ router_weight.detach().float().to(hidden_states.device).T
    return (logits - logits.mean(1, keepdim=True)).pow(2).mean().sqrt().item()


def scale_router(router_weight: Tensor, hidden_states: Tensor | None = None,
                 logit_std: float = DEFAULT_LOGIT_STD, center: bool = False) -> Tensor:
    """Rescale a router `[E, d]` so its initial gates are near-uniform.

    With calibration `hidden_states` `[T, d]` (the MLP's input): if `center`, first remove the
    component along the mean hidden state, which gives each expert the same logit offset on every
    token (so the same experts win on most tokens: balanced load, but see `router_init`); then scale so `router_logit_spread` equals `logit_std`. Without hidden states, each row gets
    norm `logit_std`: that is the logit spread for inputs with unit RMS per coordinate and random
    direction (what an RMSNorm with unit gain produces); pass hidden states when the norm's gain
    is far from 1.
    """
    if router_weight.dim() != 2:
        raise ValueError(f"router_weight must be [E, d], got {tuple(router_weight.shape)}")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be positive, got {logit_std}")
    w = router_weight.detach().float().clone()
    if w.shape[0] == 1:   # one expert: softmax is 1 whatever the logits
        return torch.zeros_like(w)
    if hidden_states is None:
        return w / w.norm(dim=1, keepdim=True).clamp_min(_EPS) * logit_std
    if hidden_states.dim() != 2 or hidden_states.shape[1] != w.shape[1]:
        raise ValueError(f"hidden_states must be [tokens, d] = [T, {w.shape[1]}] (the MLP input), "
                         f"got {tuple(hidden_states.shape)}")
    x = hidden_states.detach().float().to(w.device)
    if center:
        mu = x.mean(0)
        w = w - (w @ mu)[:, None] * mu[None, :] / mu.pow(2).sum().clamp_min(_EPS)
    spread = router_logit_spread(w, x)
    if spread < _EPS:     # the router cannot tell tokens apart: exactly uniform is the honest start
        return torch.zeros_like(w)
    return w * (logit_std / spread)


def router_init(gate_weight: Tensor, partition: Tensor, spec: MoESpec,
                hidden_states: Tensor | None = None, logit_std: float = DEFAULT_LOGIT_STD,
                center: bool = False) -> Tensor:
    """Router `[E, d]`: row e is the mean of the `W_g` rows of expert e's neurons (the direction in
    which its neurons' gates open), then `scale_router`. The shared column gets no router row.

    Measured on SmolLM2-135M (E=8, k=4, untrained, held-out perplexity; dense 36.6): this router
    picks the oracle's top-k experts barely above chance (60-63% agreement, chance 50%) and the
    model is unusable untrained: 3,934 (k-means partition) and 19,880 (co-activation partition).
    `center` (remove the per-expert logit offset, see `scale_router`) balances the load but cuts
    both ways: 27,873 and 2,590. It is off by default, so the router is a pure rescaling of the
    mean gate rows. `fit_router_lstsq` is far better (79-83% agreement; 596 with co-activation)."""
    if gate_weight.dim() != 2 or gate_weight.shape[0] != spec.d_ff:
        raise ValueError(f"gate_weight must be [d_ff, d] with d_ff={spec.d_ff}, got {tuple(gate_weight.shape)}")
    check_partition(partition, spec)
    g = gate_weight.detach().float()
    partition = partition.to(g.device)
    routed = partition < spec.num_experts
    sums = torch.zeros(spec.num_experts, g.shape[1], device=g.device).index_add_(0, partition[routed], g[routed])
    means = sums / torch.tensor(spec.capacities, dtype=torch.float32, device=g.device)[:, None]
    return scale_router(means, hidden_states, logit_std, center)


def expert_output_norms(activations: Tensor, down_weight: Tensor, partition: Tensor, spec: MoESpec) -> Tensor:
    """`[T, E]`: ||W_d[:, S_e] h[S_e]|| per token and routed expert (what oracle routing ranks by)."""
    _check_activations(activations, spec)
    check_partition(partition, spec)
    if down_weight.dim() != 2 or down_weight.shape[1] != spec.d_ff:
        raise ValueError(f"down_weight must be [d, d_ff={spec.d_ff}], got {tuple(down_weight.shape)}")
    h, wd = activations.detach().float(), down_weight.detach().float().to(activations.device)
    partition = partition.to(h.device)
    return torch.stack([(h[:, idx] @ wd[:, idx].T).norm(dim=1)
                        for idx in (torch.nonzero(partition == e).squeeze(1) for e in range(spec.num_experts))], 1)


def fit_router_lstsq(hidden_states: Tensor, expert_norms: Tensor, ridge: float = 1e-3,
                     logit_std: float = DEFAULT_LOGIT_STD, center: bool = False) -> Tensor:
    """Router `[E, d]` fitted by ridge least squares so that its logits track each expert's output
    norm on calibration tokens (MoEfication's idea, linear), then `scale_router`.

    hidden_states `[T, d]` (MLP input), expert_norms `[T, E]` (`expert_output_norms`). The target is
    each norm relative to the token's mean over experts, minus 1: ranking within a token is what
    top-k uses, and it keeps tokens with huge activations from dominating the fit. `ridge` is
    relative to the mean eigenvalue of X^T X. `center` is off by default: the fitted per-expert
    offset is signal (some experts matter on most tokens); on SmolLM2-135M (E=8, k=4, k-means
    partition, untrained) centring raised held-out perplexity from 3,325 to 16,276.
    """
    if hidden_states.dim() != 2 or expert_norms.dim() != 2 or hidden_states.shape[0] != expert_norms.shape[0]:
        raise ValueError(f"hidden_states [T, d] and expert_norms [T, E] must share T, got "
                         f"{tuple(hidden_states.shape)} and {tuple(expert_norms.shape)}")
    x = hidden_states.detach().double()
    n = expert_norms.detach().double()
    y = n / n.mean(1, keepdim=True).clamp_min(_EPS) - 1
    gram = x.T @ x
    lam = ridge * gram.diagonal().mean().clamp_min(_EPS)
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), x.T @ y).T
    return scale_router(w.float(), hidden_states, logit_std, center)
