"""Initial partitions, assignment scores and router initialisation (dotmoe_ds/partition.py)."""
import math

import pytest
import torch

from dotmoe_ds.partition import (
    activation_importance, balanced_kmeans, beta_for_confidence, check_partition, clustering_objective,
    coactivation_partition, expert_output_norms, fit_router_lstsq, initial_confidence, initial_scores,
    kmeans_partition, random_partition, router_init, router_logit_spread, scale_router, weight_importance)
from dotmoe_ds.sinkhorn import sinkhorn
from dotmoe_ds.spec import MoESpec

SPECS = {
    "uniform": MoESpec.uniform(96, 8, 2),
    "uneven": MoESpec.uniform(100, 7, 2),                       # 100 = 7 * 14 + 2: the first two experts get 15
    "custom": MoESpec.custom(96, [8, 16, 24, 48], 2),
    "shared": MoESpec.uniform(96, 4, 2, shared=16),
    "shared_custom": MoESpec.custom(96, [10, 20, 30], 1, shared=36),
}


def _weights(spec: MoESpec, d: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(spec.d_ff, d, generator=g), torch.randn(spec.d_ff, d, generator=g),
            torch.randn(d, spec.d_ff, generator=g))


def _activations(spec: MoESpec, T: int = 64, seed: int = 0):
    return torch.randn(T, spec.d_ff, generator=torch.Generator().manual_seed(seed))


def _counts(partition: torch.Tensor, spec: MoESpec) -> list[int]:
    return torch.bincount(partition, minlength=spec.num_columns).tolist()


def _same_clustering(labels: torch.Tensor, partition: torch.Tensor) -> bool:
    """True when the partition equals the planted labels up to renaming the columns."""
    pairs = set(zip(labels.tolist(), partition.tolist()))
    return len(pairs) == len(set(labels.tolist())) == len({p for _, p in pairs})


# ----------------------------------------------------------------------------- capacity exactness

@pytest.mark.parametrize("name", list(SPECS))
def test_every_partition_is_capacity_exact(name):
    spec = SPECS[name]
    g, u, d = _weights(spec)
    parts = {
        "random": random_partition(spec, 0),
        "kmeans": kmeans_partition(g, u, spec, 0, n_iters=5),
        "kmeans_down": kmeans_partition(g, u, spec, 0, n_iters=5, down_weight=d),
        "coact": coactivation_partition(_activations(spec), spec, 0, n_iters=5),
    }
    for method, p in parts.items():
        assert p.dtype == torch.long and p.shape == (spec.d_ff,), method
        assert _counts(p, spec) == list(spec.column_capacities), method
        check_partition(p, spec)


def test_check_partition_rejects_bad_partitions():
    spec = SPECS["shared"]
    good = random_partition(spec, 0)
    with pytest.raises(ValueError, match="exactly full"):
        bad = good.clone()
        bad[bad == 0] = 1                                       # column 0 empty, column 1 overfull
        check_partition(bad, spec)
    with pytest.raises(ValueError, match="lie in 0..4"):
        check_partition(torch.full((96,), 5, dtype=torch.long), spec)
    with pytest.raises(ValueError, match=r"shape \[d_ff\]"):
        check_partition(good[:-1], spec)
    with pytest.raises(ValueError, match="LongTensor"):
        check_partition(good.float(), spec)


# ----------------------------------------------------------------------------- determinism

def test_random_partition_deterministic_per_seed_and_differs_across_seeds():
    spec = SPECS["uniform"]
    assert torch.equal(random_partition(spec, 3), random_partition(spec, 3))
    assert not torch.equal(random_partition(spec, 3), random_partition(spec, 4))


def test_random_partition_is_uniform():
    # Each neuron lands in column e with probability c_e / d_ff: check the empirical frequencies.
    spec = MoESpec.custom(12, [2, 4, 6], 1)
    n = 2000
    freq = torch.nn.functional.one_hot(torch.stack([random_partition(spec, s) for s in range(n)]), 3)
    expected = torch.tensor([2, 4, 6]) / 12
    assert (freq.float().mean(0) - expected).abs().max() < 0.045   # 4 standard errors at p=1/2


def test_kmeans_and_coactivation_deterministic_per_seed():
    spec = SPECS["uniform"]
    g, u, _ = _weights(spec)
    h = _activations(spec)
    assert torch.equal(kmeans_partition(g, u, spec, 1), kmeans_partition(g, u, spec, 1))
    assert not torch.equal(kmeans_partition(g, u, spec, 1), kmeans_partition(g, u, spec, 2))
    assert torch.equal(coactivation_partition(h, spec, 1), coactivation_partition(h, spec, 1))
    assert not torch.equal(coactivation_partition(h, spec, 1), coactivation_partition(h, spec, 2))


# ----------------------------------------------------------------------------- k-means quality

def _planted_weights(capacities, d=32, noise=0.05, seed=0):
    """Neurons whose [W_g ; W_u] rows are a cluster direction plus noise, at random scales."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(capacities)), torch.tensor(capacities))
    centres = torch.randn(len(capacities), 2 * d, generator=g)
    rows = centres[labels] + noise * centres.norm(dim=1).mean() / math.sqrt(2 * d) * torch.randn(
        labels.numel(), 2 * d, generator=g)
    rows = rows * torch.empty(labels.numel(), 1).uniform_(0.1, 10, generator=g)   # scale must not matter
    perm = torch.randperm(labels.numel(), generator=g)
    return rows[perm, :d], rows[perm, d:], labels[perm]


@pytest.mark.parametrize("capacities", [[24] * 8, [8, 16, 24, 48], [5, 40, 10, 20, 25]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_planted_balanced_clusters(capacities, seed):
    gate, up, labels = _planted_weights(capacities, seed=seed)
    spec = MoESpec.custom(sum(capacities), capacities, 1)
    p = kmeans_partition(gate, up, spec, seed)
    assert _same_clustering(labels, p)
    # and each planted cluster sits in the column of its own size
    for e, c in enumerate(capacities):
        assert (labels[p == e] == labels[p == e][0]).all() and (labels == labels[p == e][0]).sum() == c


def test_kmeans_objective_beats_random_partition_on_random_weights():
    spec = MoESpec.uniform(512, 8, 2)
    g, u, _ = _weights(spec, d=64)
    km = clustering_objective([g, u], kmeans_partition(g, u, spec, 0), 8)
    rnd = [clustering_objective([g, u], random_partition(spec, s), 8) for s in range(5)]
    # random directions in 128 dims: a random cluster of 64 unit vectors has ||sum|| ~ 8, so 8 * 8
    assert max(rnd) < 75 < km
    assert km > 1.1 * max(rnd)


def test_restarts_never_lower_the_objective():
    spec = MoESpec.uniform(256, 8, 2)
    g, u, _ = _weights(spec, d=16)
    one = balanced_kmeans([g, u], spec.capacities, 0, n_init=1)[1]
    three = balanced_kmeans([g, u], spec.capacities, 0, n_init=3)[1]
    assert three > one                        # the first restart is the n_init=1 run; others did better
    assert torch.equal(kmeans_partition(g, u, spec, 0, n_init=3), kmeans_partition(g, u, spec, 0, n_init=3))


def test_balanced_kmeans_objective_matches_its_definition():
    spec = MoESpec.uniform(64, 4, 1)
    g, u, _ = _weights(spec, d=8)
    assign, obj = balanced_kmeans([g, u], spec.capacities, 0)
    x = torch.nn.functional.normalize(torch.cat([g, u], 1), dim=1)
    direct = sum((x[assign == e] @ torch.nn.functional.normalize(x[assign == e].mean(0), dim=0)).sum()
                 for e in range(4))
    assert obj == pytest.approx(direct.item(), rel=1e-5)
    assert obj == pytest.approx(clustering_objective([g, u], assign, 4), rel=1e-6)


def test_single_expert_takes_every_routed_neuron():
    spec = MoESpec.uniform(32, 1, 1, shared=8)
    g, u, _ = _weights(spec)
    p = kmeans_partition(g, u, spec, 0)
    assert _counts(p, spec) == [24, 8]


# ----------------------------------------------------------------------------- shared expert

def test_kmeans_shared_expert_takes_the_most_important_neurons():
    spec = SPECS["shared"]
    g, u, d = _weights(spec)
    importance = torch.rand(spec.d_ff, generator=torch.Generator().manual_seed(5))
    p = kmeans_partition(g, u, spec, 0, importance=importance)
    top = set(torch.topk(importance, spec.shared).indices.tolist())
    assert set((p == spec.num_experts).nonzero().squeeze(1).tolist()) == top
    # default: the weight-based importance, including ||W_d[:, j]|| when the down weight is given
    default = kmeans_partition(g, u, spec, 0, down_weight=d)
    w_imp = g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)
    assert torch.allclose(weight_importance(g, u, d), w_imp)
    assert set((default == spec.num_experts).nonzero().squeeze(1).tolist()) == set(
        torch.topk(w_imp, spec.shared).indices.tolist())


def test_kmeans_with_shared_still_recovers_planted_clusters_among_the_rest():
    capacities = [20, 20, 20]
    gate, up, labels = _planted_weights(capacities + [12], seed=3)   # 4th planted group -> shared
    spec = MoESpec.custom(72, capacities, 1, shared=12)
    importance = (labels == 3).float()
    p = kmeans_partition(gate, up, spec, 0, importance=importance)
    assert (p[labels == 3] == 3).all()
    assert _same_clustering(labels[labels < 3], p[labels < 3])


def test_coactivation_shared_expert_is_the_most_active_neurons():
    spec = SPECS["shared_custom"]
    h = _activations(spec) * torch.linspace(0.1, 3.0, spec.d_ff)   # later neurons are stronger
    p = coactivation_partition(h, spec, 0)
    assert set((p == 3).nonzero().squeeze(1).tolist()) == set(
        torch.topk(h.abs().mean(0), spec.shared).indices.tolist())
    _, _, d = _weights(spec)
    p_down = coactivation_partition(h, spec, 0, down_weight=d)
    assert set((p_down == 3).nonzero().squeeze(1).tolist()) == set(
        torch.topk(activation_importance(h, d), spec.shared).indices.tolist())


# ----------------------------------------------------------------------------- co-activation

def _planted_coactivation(capacities, T=400, seed=0):
    """Neurons in a group are strongly active (either sign) on the same tokens, weakly otherwise;
    token 0 is a massive-activation outlier that must not decide the clustering."""
    g = torch.Generator().manual_seed(seed)
    G = len(capacities)
    labels = torch.repeat_interleave(torch.arange(G), torch.tensor(capacities))
    active = torch.rand(T, G, generator=g) < 0.3                        # which groups each token uses
    mag = torch.where(active[:, labels], 1.0, 0.05) * torch.empty(T, labels.numel()).uniform_(0.5, 1.5, generator=g)
    sign = torch.randint(0, 2, (T, labels.numel()), generator=g) * 2 - 1
    h = mag * sign * torch.empty(1, labels.numel()).uniform_(0.2, 5, generator=g)   # per-neuron scale
    h[0] *= 1000
    perm = torch.randperm(labels.numel(), generator=g)
    return h[:, perm], labels[perm]


@pytest.mark.parametrize("capacities", [[16] * 6, [8, 16, 32, 40]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coactivation_recovers_planted_groups(capacities, seed):
    h, labels = _planted_coactivation(capacities, seed=seed)
    spec = MoESpec.custom(sum(capacities), capacities, 1)
    p = coactivation_partition(h, spec, 0)
    assert _same_clustering(labels, p)


def test_activation_importance_is_activation_weighted_norm():
    spec = SPECS["uniform"]
    h = _activations(spec)
    _, _, d = _weights(spec)
    imp = activation_importance(h, d)
    j = 7
    assert imp[j].item() == pytest.approx(h[:, j].abs().mean().item() * d[:, j].norm().item(), rel=1e-5)
    imp2 = activation_importance(h, d, p=2)
    assert imp2[j].item() == pytest.approx(h[:, j].pow(2).mean().sqrt().item() * d[:, j].norm().item(), rel=1e-5)


# ----------------------------------------------------------------------------- scores Theta

@pytest.mark.parametrize("name", list(SPECS))
def test_initial_scores_argmax_is_the_partition(name):
    spec = SPECS[name]
    p = random_partition(spec, 0)
    theta = initial_scores(p, spec, beta=2.5)
    assert theta.shape == (spec.d_ff, spec.num_columns)
    assert torch.equal(theta.argmax(1), p)
    assert theta.sum().item() == pytest.approx(2.5 * spec.d_ff)


@pytest.mark.parametrize("E, q", [(8, 0.74), (8, 0.95), (5, 0.5)])
def test_beta_sets_the_initial_plan_confidence(E, q):
    spec = MoESpec.uniform(40 * E, E, 1)
    beta = beta_for_confidence(q, spec.num_columns)
    conf = initial_confidence(random_partition(spec, 0), spec, beta)
    assert torch.allclose(conf, torch.full((E,), q), atol=1e-4)
    # at temperature tau, beta / tau plays the role of beta
    beta_t = beta_for_confidence(q, spec.num_columns, tau=0.5)
    assert beta_t == pytest.approx(beta / 2)
    assert torch.allclose(initial_confidence(random_partition(spec, 0), spec, beta_t, tau=0.5),
                          torch.full((E,), q), atol=1e-4)


def test_initial_confidence_on_shared_spec_is_consistent_with_sinkhorn():
    spec = SPECS["shared_custom"]
    p = random_partition(spec, 0)
    conf = initial_confidence(p, spec, 3.0)
    plan = sinkhorn(initial_scores(p, spec, 3.0), spec.column_capacities, n_iters=1000, tol=1e-6)
    assert conf[3].item() == pytest.approx(plan[p == 3, 3].mean().item(), abs=1e-5)
    assert ((conf > 1 / spec.num_columns) & (conf < 1)).all()


def test_initial_scores_rejects_nonpositive_beta():
    spec = SPECS["uniform"]
    with pytest.raises(ValueError, match="beta must be positive"):
        initial_scores(random_partition(spec, 0), spec, 0.0)


# ----------------------------------------------------------------------------- router

def _hidden(T=500, d=24, offset=3.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    # a large shared offset, like the consistent components of real residual streams
    return torch.randn(T, d, generator=g) + offset * torch.randn(1, d, generator=g)


@pytest.mark.parametrize("logit_std", [0.05, 0.1, 1.0])
def test_router_init_has_requested_logit_spread_and_near_uniform_gates(logit_std):
    spec = SPECS["uniform"]
    g, _, _ = _weights(spec)
    p = random_partition(spec, 0)
    x = _hidden()
    w = router_init(g, p, spec, hidden_states=x, logit_std=logit_std, center=True)
    assert w.shape == (spec.num_experts, g.shape[1])
    assert router_logit_spread(w, x) == pytest.approx(logit_std, rel=1e-4)
    logits = x @ w.T
    assert logits.mean(0).abs().max() < 1e-4 * logit_std      # centred: no expert favoured on average
    if logit_std <= 0.1:
        probs = torch.softmax(logits, -1) * spec.num_experts
        assert (probs - 1).abs().mean() < 1.2 * logit_std    # E * p_e ~ 1 + (l_e - mean l)
        assert (probs - 1).abs().max() < 6 * logit_std


def test_router_init_default_keeps_the_offset_and_still_hits_the_spread():
    spec = SPECS["uniform"]
    g, _, _ = _weights(spec)
    x = _hidden()
    p = random_partition(spec, 0)
    w = router_init(g, p, spec, hidden_states=x, logit_std=0.1)
    assert router_logit_spread(w, x) == pytest.approx(0.1, rel=1e-4)
    assert (x @ w.T).mean(0).abs().max() > 0.01                 # the per-expert offset survived
    # and it is a pure rescaling of the mean gate rows
    means = torch.stack([g[p == e].mean(0) for e in range(spec.num_experts)])
    ratio = w / means
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), rtol=1e-4)


def test_router_init_rows_are_mean_gate_rows_normalised_without_hidden_states():
    spec = SPECS["shared_custom"]
    g, _, _ = _weights(spec)
    p = random_partition(spec, 0)
    w = router_init(g, p, spec, logit_std=0.2)
    assert w.shape == (3, g.shape[1])                          # no row for the shared column
    assert torch.allclose(w.norm(dim=1), torch.full((3,), 0.2), atol=1e-6)
    for e in range(3):
        mean_row = g[p == e].mean(0)
        assert torch.allclose(w[e], mean_row / mean_row.norm() * 0.2, atol=1e-6)


def test_scale_router_edge_cases():
    assert torch.equal(scale_router(torch.randn(1, 8)), torch.zeros(1, 8))       # one expert
    x = torch.randn(50, 8)
    same = torch.randn(1, 8).repeat(4, 1)                                         # identical rows
    assert torch.equal(scale_router(same, x), torch.zeros(4, 8))


def test_expert_output_norms_match_masked_dense_outputs():
    spec = SPECS["shared"]
    h = _activations(spec, T=10)
    _, _, d = _weights(spec)
    p = random_partition(spec, 0)
    norms = expert_output_norms(h, d, p, spec)
    assert norms.shape == (10, spec.num_experts)
    for e in range(spec.num_experts):
        direct = ((h * (p == e).float()) @ d.T).norm(dim=1)
        assert torch.allclose(norms[:, e], direct, rtol=1e-5, atol=1e-5)


def test_fit_router_lstsq_recovers_a_linear_norm_model():
    g = torch.Generator().manual_seed(0)
    T, d, E = 2000, 16, 4
    x = torch.randn(T, d, generator=g)
    A = torch.randn(E, d, generator=g)
    A = A - A.mean(0)                                    # mean over experts 0 -> relative target is linear
    norms = 1 + 0.05 * x @ A.T
    assert (norms > 0).all()
    w = fit_router_lstsq(x, norms, ridge=1e-6, logit_std=0.1)
    assert router_logit_spread(w, x) == pytest.approx(0.1, rel=1e-4)
    assert torch.equal((x @ w.T).argmax(1), norms.argmax(1))
    cos = torch.nn.functional.cosine_similarity(w, A, dim=1)
    assert cos.min() > 0.999


# ----------------------------------------------------------------------------- bad input

def test_shape_mismatches_fail_with_clear_messages():
    spec = SPECS["uniform"]
    g, u, d = _weights(spec)
    with pytest.raises(ValueError, match="same shape"):
        kmeans_partition(g, u[:, :-1], spec, 0)
    with pytest.raises(ValueError, match="spec.d_ff is 96"):
        kmeans_partition(g[:-1], u[:-1], spec, 0)
    with pytest.raises(ValueError, match="down_weight must be"):
        kmeans_partition(g, u, spec, 0, down_weight=d.T)
    with pytest.raises(ValueError, match=r"\[T, 96\]"):
        coactivation_partition(torch.randn(10, 95), spec, 0)
    with pytest.raises(ValueError, match="NaN"):
        coactivation_partition(torch.full((10, 96), float("nan")), spec, 0)
    with pytest.raises(ValueError, match=r"\[T, 96\]"):
        activation_importance(torch.randn(10, 95), d)
    with pytest.raises(ValueError, match="importance must be"):
        kmeans_partition(g, u, SPECS["shared"], 0, importance=torch.rand(95))
    with pytest.raises(ValueError, match=r"hidden_states must be \[tokens, d\]"):
        router_init(g, random_partition(spec, 0), spec, hidden_states=torch.randn(10, 23))
    with pytest.raises(ValueError, match="exactly full"):
        router_init(g, torch.zeros(96, dtype=torch.long), spec)
    with pytest.raises(ValueError, match="must share T"):
        fit_router_lstsq(torch.randn(10, 4), torch.rand(9, 2))
    with pytest.raises(ValueError, match="confidence must be in"):
        beta_for_confidence(0.1, 8)


def test_importance_partition_fills_experts_by_rank_and_equals_pruning_under_fixed_routing():
    """Experts take the neurons in importance order (shared expert first); a router that always picks
    experts 0..k-1 keeps exactly the k*c most important neurons, i.e. structured pruning."""
    from dotmoe_ds.partition import importance_partition

    torch.manual_seed(3)
    importance = torch.rand(48)
    importance[5] = importance[7] = 2.0          # a tie: the lower index goes first
    spec = MoESpec.uniform(48, 4, top_k=2)
    part = importance_partition(importance, spec)
    order = torch.sort(-importance, stable=True).indices
    assert order[0] == 5 and order[1] == 7
    assert part[order[:12]].eq(0).all() and part[order[12:24]].eq(1).all() and part[order[36:]].eq(3).all()
    kept = torch.nonzero(part < spec.top_k).squeeze(1)
    assert sorted(kept.tolist()) == sorted(torch.topk(importance, 24).indices.tolist())
    shared_spec = MoESpec.custom(48, [10, 10, 10], top_k=1, shared=18)
    part = importance_partition(importance, shared_spec)
    assert sorted(torch.nonzero(part == 3).squeeze(1).tolist()) == sorted(order[:18].tolist())
    assert part[order[18:28]].eq(0).all()
    assert torch.bincount(part, minlength=4).tolist() == [10, 10, 10, 18]
    with pytest.raises(ValueError):
        importance_partition(importance[:40], spec)


# ---------------------------------------------------------------------- the trainer's default start

def test_default_start_with_a_shared_expert_is_importance_then_coactivation():
    from dotmoe_ds import train
    from dotmoe_ds.config import parse_args
    from dotmoe_ds.layer import DotMoEFFN
    from dotmoe_ds.tiny_models import tiny_model

    cfg = parse_args(["--shared_neurons", "32", "--num_experts", "8", "--top_k", "2"])
    assert cfg.partition == "coactivation"
    assert parse_args(["--num_experts", "8"]).partition == "importance"   # no shared expert: unchanged
    mlp = tiny_model("llama", seed=1).model.layers[0].mlp
    spec = MoESpec.uniform(96, 8, top_k=2, shared=32)
    layer = DotMoEFFN(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, spec)
    g, u, d = (w.detach().clone() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    part, router = train.init_layer(layer, 3, cfg, (g, u, d), x)
    with torch.no_grad():
        h = mlp.act_fn(x @ g.T) * (x @ u.T)
    imp = activation_importance(h, d, p=2)
    shared = set((part == spec.num_experts).nonzero().squeeze(1).tolist())
    assert shared == set(torch.topk(imp, 32).indices.tolist())          # the most important neurons
    expected = coactivation_partition(h, spec, cfg.train.seed * 1_000_003 + 3, importance=imp)
    assert torch.equal(part, expected)                                    # the rest by co-activation
    assert torch.bincount(part, minlength=spec.num_columns).tolist() == list(spec.column_capacities)
    assert router.shape == (8, 64) and torch.isfinite(router).all()
