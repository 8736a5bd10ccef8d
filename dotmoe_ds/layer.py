"""The conversion-time DOT-MoE FFN (METHOD.md sections 3, 4 and 6).

`DotMoEFFN` wraps one dense SwiGLU MLP. It keeps the dense `gate_proj`, `up_proj` and `down_proj`
modules as they are (so parameter names, checkpoint loading and ZeRO-3 partitioning are untouched)
and adds the learnable assignment scores `scores` (Theta, `[d_ff, E']`) and the token router.

    y = W_d ( h(x) * m(x) ),   h(x) = act(W_g x) * (W_u x),   m(x) = A g(x)

`A` (`[d_ff, E']`) says which expert each neuron belongs to and `g(x)` (`[E']`) how strongly each
expert is used by token x; the shared expert, if any, is the last column with a gate of 1.
With hard `A` and hard `g` this equals the materialised MoE (`materialise()`) to float precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .objectives import relative_reconstruction_error
from .reference import ReferenceFFN, dense_output
from .sinkhorn import (DEFAULT_REFINE_ROUNDS, DEFAULT_TOL, assign_by_score, one_hot_assignment,
                       sinkhorn, ste_assignment)
from .spec import MoESpec

MODES = ("dense", "soft", "ste", "hard")
ASSIGNERS = ("sinkhorn", "softmax")


@dataclass
class ExpertWeights:
    """One layer's materialised experts (METHOD.md section 6), ready for an exporter."""

    spec: MoESpec
    expert_neurons: list[Tensor]      # per routed expert, ascending dense neuron indices
    shared_neurons: Tensor | None     # ascending dense neuron indices of the shared expert
    gate: list[Tensor]                # per expert [c_e, d] = W_g[S_e]
    up: list[Tensor]                  # per expert [c_e, d] = W_u[S_e]
    down: list[Tensor]                # per expert [d, c_e] = top_k * W_d[:, S_e]
    router: Tensor                    # [E, d]
    shared_gate: Tensor | None = None  # [c_0, d]
    shared_up: Tensor | None = None    # [c_0, d]
    shared_down: Tensor | None = None  # [d, c_0], unscaled: the exporter applies its target's factor


@dataclass
class RouterStats:
    """What one forward pass's routing did, kept for the objective and monitoring."""

    load_balance: Tensor   # Switch-style E * sum_e f_e * P_e (1 when perfectly balanced)
    z_loss: Tensor         # mean logsumexp(router logits)^2
    load: Tensor           # [E] share of routed slots per expert (sums to 1), detached
    entropy: Tensor        # mean entropy of the router softmax, detached


class DotMoEFFN(nn.Module):
    """A dense SwiGLU MLP seen as a DOT-MoE: learnable neuron-to-expert plan plus token router.

    Modes:
      dense  the original MLP (the distillation teacher, and the reference): `reference` when the
             trainer keeps one (the FFN weights train), else the layer's own weights;
      soft   the soft Sinkhorn plan as assignment (for analysis);
      ste    training: hard assignment forward, soft plan's gradient backward;
      hard   evaluation/export: hard assignment and hard routing, equal to the materialised MoE.
    Routing always uses the hard top-k gates in the forward pass; in training (`module.train()`)
    with `routing_ste` (default) the backward pass also reaches non-selected experts through the
    soft gates k * p. A fixed partition (the random/cluster baselines) is mode 'hard' with
    `scores.requires_grad_(False)`: its router trains exactly as DOT's does.

    Two switches the trainer sets (both off by default):
      recon         in training, also compute the dense output of the same input (one more down
                    projection, no gradient; a whole frozen FFN with `reference`) and keep the
                    relative reconstruction error of the
                    layer's output in `last_recon` (objectives.relative_reconstruction_error);
      learn_scores  the scores' gradient is collected into `score_grad` (fp32, summed over the
                    backward passes) instead of `scores.grad`, for an optimizer outside the
                    DeepSpeed engine (score_optim.ScoreOptimizer); `scores` itself then needs no
                    requires_grad, so DeepSpeed neither holds nor clips it.
    And one the ScoreOptimizer sets under its flip check: `judged_assignment`, the assignment before
    the last step's flips; with `recon` on, each training forward then also computes the
    reconstruction error under it (one more down projection, no gradient) and adds
    [error now, error under the judged assignment, 1] to `judge_sums`.
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear,
                 act_fn: Callable[[Tensor], Tensor], spec: MoESpec, *,
                 init_assignment: Tensor | None = None, router_weight: Tensor | None = None,
                 beta: float = 3.0, tau: float = 1.0, sinkhorn_iters: int = 200,
                 sinkhorn_tol: float | None = DEFAULT_TOL, refine_rounds: int = DEFAULT_REFINE_ROUNDS,
                 assigner: str = "sinkhorn", routing_ste: bool = True, mode: str = "ste",
                 plan_fn: Callable[..., Tensor] | None = None):
        super().__init__()
        _check_swiglu(gate_proj, up_proj, down_proj, act_fn, spec)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.spec = spec
        hidden = gate_proj.in_features
        weight = gate_proj.weight
        factory = {"device": weight.device, "dtype": torch.float32}

        scores = torch.zeros(spec.d_ff, spec.num_columns, **factory)
        if init_assignment is not None:
            init_assignment = torch.as_tensor(init_assignment, device=weight.device).long()
            _check_assignment(init_assignment, spec)
            scores = beta * one_hot_assignment(init_assignment, spec.num_columns, torch.float32)
        # Theta stays fp32 whatever the model dtype: Sinkhorn at small tau needs the range.
        self.scores = nn.Parameter(scores)
        self.router = nn.Linear(hidden, spec.num_experts, bias=False, device=weight.device,
                                dtype=weight.dtype)
        with torch.no_grad():
            if router_weight is None:
                self.router.weight.zero_()
            else:
                if tuple(router_weight.shape) != (spec.num_experts, hidden):
                    raise ValueError(f"router_weight must be [{spec.num_experts}, {hidden}], "
                                     f"got {tuple(router_weight.shape)}")
                self.router.weight.copy_(router_weight)

        if assigner not in ASSIGNERS:
            raise ValueError(f"assigner must be one of {ASSIGNERS}, got {assigner!r}")
        self.assigner = assigner
        self.tau = float(tau)
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_tol = sinkhorn_tol
        self.refine_rounds = refine_rounds
        self.routing_ste = routing_ste
        self.mode = mode
        # The Sinkhorn solver, called like `sinkhorn`: None is `sinkhorn` on this process (every
        # rank the whole plan); the trainer may set e.g. sharded_sinkhorn.ShardedPlan(group).
        self.plan_fn = plan_fn
        self.last_router_stats: RouterStats | None = None
        self.recon = False
        self.last_recon: Tensor | None = None      # relative reconstruction error of the last forward
        # The original weights, frozen (reference.py), set by the trainer when the FFN weights train:
        # then 'dense' mode and the reconstruction target are the dense model, not the trained weights.
        self.reference: ReferenceFFN | None = None
        self.learn_scores = False
        self.score_grad: Tensor | None = None      # collected gradient of the scores (learn_scores)
        self.last_assignment: Tensor | None = None   # hard assignment of the last forward (monitoring)
        self.judged_assignment: Tensor | None = None  # before the last flips, under the flip check
        self.judge_sums: Tensor | None = None         # float64 [error now, error judged, forwards], on device
        self._hard_cache: tuple[tuple, Tensor] | None = None
        # The last hard assignment known (rounded or pinned): where the next rounding starts, since
        # the scores move a few flips between roundings (sinkhorn.assign_by_score's `start`).
        self._rounding_start: Tensor | None = None
        # Set by the trainer when it rounded this layer elsewhere (layer-parallel, see
        # pin_hard_assignment); wins over the cache until unpinned.
        self._pinned_assignment: Tensor | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._mode = mode

    def extra_repr(self) -> str:
        s = self.spec
        return (f"d_ff={s.d_ff}, experts={s.num_experts}, top_k={s.top_k}, shared={s.shared}, "
                f"mode={self.mode}, tau={self.tau:g}, assigner={self.assigner}")

    # ------------------------------------------------------------------ assignment
    def plan(self) -> Tensor:
        """The soft plan `[d_ff, E']` at the current temperature (rows sum to 1, columns to capacity)."""
        theta = self._theta()
        if self.assigner == "softmax":   # ablation: no optimal transport, rows only
            return torch.softmax(theta / self.tau, dim=-1)
        solve = sinkhorn if self.plan_fn is None else self.plan_fn
        return solve(theta, self.spec.column_capacities, tau=self.tau,
                     n_iters=self.sinkhorn_iters, tol=self.sinkhorn_tol)

    def _theta(self) -> Tensor:
        """The scores in fp32; with `learn_scores` (and autograd on) a fresh leaf whose gradient is
        added to `score_grad`."""
        theta = self.scores.float()
        if self.learn_scores and torch.is_grad_enabled():
            theta = theta.detach().clone().requires_grad_(True)
            theta.register_hook(self._collect_score_grad)
        return theta

    def _collect_score_grad(self, grad: Tensor) -> None:
        if self.score_grad is None:
            self.score_grad = grad.detach().float().clone()
        else:
            self.score_grad += grad.detach().float()

    @torch.no_grad()
    def hard_assignment(self) -> Tensor:
        """Column index per neuron `[d_ff]`, capacity-exact, maximising sum(H * log P).

        log P = Theta / tau + f + g for the Sinkhorn plan (and Theta / tau - lse for the softmax
        ablation), and under exact capacities the potentials add the same constant to every
        candidate, so the optimal rounding of P is the optimal assignment by Theta itself: the
        same answer at any temperature, without the underflow ties a cold plan has in fp32.
        Cached until the scores change, or the pinned assignment (`pin_hard_assignment`).
        """
        if self._pinned_assignment is not None:
            return self._pinned_assignment
        key = (self.scores.data_ptr(), self.scores._version)
        if self._hard_cache is None or self._hard_cache[0] != key:
            assign = assign_by_score(self.scores.detach().float(), self.spec.column_capacities,
                                     self.refine_rounds, start=self._rounding_start)
            self._hard_cache = (key, assign)
            self._rounding_start = assign
        return self._hard_cache[1]

    @torch.no_grad()
    def pin_hard_assignment(self, assign: Tensor | None) -> None:
        """Use `assign` (`[d_ff]` column per neuron) as the hard assignment until the next pin;
        None unpins (back to rounding the scores, cached).

        For the distributed trainer: rounding a 28672-neuron layer takes a few hundred ms, so rank
        `l mod world` rounds layer l once per optimizer step and broadcasts it, instead of every
        rank rounding every layer (and, under ZeRO-3, whose gathers give the scores a new storage
        each time, at every forward). The caller guarantees `assign` is the rounding of the
        current scores and re-pins whenever the scores change.
        """
        if assign is None:
            self._pinned_assignment = None
            return
        assign = torch.as_tensor(assign).long()
        _check_assignment(assign, self.spec, "pinned assignment")
        self._pinned_assignment = assign.to(self.scores.device)
        self._rounding_start = self._pinned_assignment

    def assignment_matrix(self) -> Tensor:
        """`A` of METHOD.md section 4 for the current mode, `[d_ff, E']`, fp32."""
        if self.mode == "hard":
            return one_hot_assignment(self.hard_assignment(), self.spec.num_columns)
        plan = self.plan()
        if self.mode == "soft":
            return plan
        A, assign = ste_assignment(plan, self.spec.column_capacities, assign=self.hard_assignment())
        self.last_assignment = assign
        return A

    # ------------------------------------------------------------------ routing
    def gates(self, x: Tensor) -> Tensor:
        """Per-token expert gates `[..., E]`: k * p_e / sum_topk(p) on the top-k, else 0."""
        k = self.spec.top_k
        logits = self.router(x).float()
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = probs.topk(k, dim=-1)
        hard = torch.zeros_like(probs).scatter(-1, top_i, k * top_p / top_p.sum(-1, keepdim=True))
        if self.training:
            self.last_router_stats = _router_stats(logits, probs, top_i)
        if self.routing_ste and self.training:
            soft = k * probs
            return hard + (soft - soft.detach())
        return hard

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "dense":
            return dense_output(self, x)
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        g = self.gates(x)
        if self.spec.has_shared:
            g = torch.cat([g, torch.ones_like(g[..., :1])], dim=-1)
        if self.mode == "hard":
            # A is one-hot: m_j = g[assign_j] exactly, and a gather is cheaper than the product.
            mask = g[..., self.hard_assignment()]
        else:
            mask = g @ self.assignment_matrix().T
        y = self.down_proj(h * mask.to(h.dtype))
        if self.recon and self.training and torch.is_grad_enabled():
            with torch.no_grad():   # the target: the dense output of the same input
                dense = dense_output(self, x, h)
            self.last_recon = relative_reconstruction_error(y, dense)
            if self.judged_assignment is not None:
                self._judge(h, g, dense)
        return y

    @torch.no_grad()
    def _judge(self, h: Tensor, g: Tensor, dense: Tensor) -> None:
        """The same forward's reconstruction error under `judged_assignment`, next to the current one.
        A forward recomputed in the backward (gradient checkpointing) adds to both sums alike: the
        verdict (which sum is larger) is the same."""
        before = self.down_proj(h * g[..., self.judged_assignment.to(g.device)].to(h.dtype))
        # kept on the device (no sync per layer); the ScoreOptimizer reads the sums once per step
        row = torch.stack([self.last_recon.detach(), relative_reconstruction_error(before, dense),
                           torch.ones_like(self.last_recon)]).double()
        self.judge_sums = row if self.judge_sums is None else self.judge_sums + row

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def materialise(self) -> ExpertWeights:
        """Real experts from the hard assignment (METHOD.md section 6); tensors are fresh copies."""
        spec = self.spec
        assign = self.hard_assignment()
        Wg, Wu, Wd = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        neurons = [torch.nonzero(assign == e).squeeze(1).cpu() for e in range(spec.num_columns)]
        routed = neurons[: spec.num_experts]
        shared = neurons[spec.num_experts] if spec.has_shared else None
        out = ExpertWeights(
            spec=spec, expert_neurons=routed, shared_neurons=shared,
            gate=[Wg[idx].detach().clone() for idx in routed],
            up=[Wu[idx].detach().clone() for idx in routed],
            down=[(spec.top_k * Wd[:, idx]).detach().clone() for idx in routed],
            router=self.router.weight.detach().clone())
        if shared is not None:
            out.shared_gate = Wg[shared].detach().clone()
            out.shared_up = Wu[shared].detach().clone()
            out.shared_down = Wd[:, shared].detach().clone()
        return out


# ---------------------------------------------------------------------- helpers

def _check_swiglu(gate_proj, up_proj, down_proj, act_fn, spec: MoESpec) -> None:
    for name, mod in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"DOT-MoE needs a SwiGLU MLP (gate_proj, up_proj, down_proj linear layers); "
                            f"{name} is {type(mod).__name__}")
        if mod.bias is not None:
            raise ValueError(f"the MLP's {name} has a bias (mlp_bias=True): DOT-MoE exports bias-free "
                             "experts, so models with MLP biases are not supported")
    if not callable(act_fn):
        raise TypeError("DOT-MoE needs the MLP's activation function (act_fn)")
    d_ff, d = gate_proj.out_features, gate_proj.in_features
    if (up_proj.out_features, up_proj.in_features) != (d_ff, d) or \
            (down_proj.out_features, down_proj.in_features) != (d, d_ff):
        raise ValueError(
            f"not a SwiGLU MLP: gate_proj is {d}->{d_ff}, up_proj {up_proj.in_features}->"
            f"{up_proj.out_features}, down_proj {down_proj.in_features}->{down_proj.out_features}")
    if spec.d_ff != d_ff:
        raise ValueError(f"the MoE budget is for d_ff={spec.d_ff} but this MLP has {d_ff} neurons")


def _check_assignment(assign: Tensor, spec: MoESpec, name: str = "init_assignment") -> None:
    if assign.shape != (spec.d_ff,):
        raise ValueError(f"{name} must have shape [{spec.d_ff}], got {tuple(assign.shape)}")
    if assign.min() < 0 or assign.max() >= spec.num_columns:
        raise ValueError(f"{name} values must lie in [0, {spec.num_columns})")
    counts = torch.bincount(assign, minlength=spec.num_columns).tolist()
    if tuple(counts) != spec.column_capacities:
        raise ValueError(f"{name} fills columns {counts}, expected capacities "
                         f"{list(spec.column_capacities)}")


def _router_stats(logits: Tensor, probs: Tensor, top_i: Tensor) -> RouterStats:
    E = probs.shape[-1]
    flat_p = probs.reshape(-1, E)
    counts = torch.bincount(top_i.reshape(-1), minlength=E).to(probs.dtype)
    load = counts / counts.sum()
    return RouterStats(
        load_balance=E * (load * flat_p.mean(0)).sum(),
        z_loss=torch.logsumexp(logits, dim=-1).pow(2).mean(),
        load=load.detach(),
        entropy=-(flat_p * flat_p.clamp_min(1e-20).log()).sum(-1).mean().detach())


def dotmoe_layers(model: nn.Module) -> Iterator[DotMoEFFN]:
    """Every DotMoEFFN of a model, in module order (= layer order)."""
    return (m for m in model.modules() if isinstance(m, DotMoEFFN))


def set_mode(model: nn.Module, mode: str) -> None:
    for layer in dotmoe_layers(model):
        layer.mode = mode


def set_plan_fn(model: nn.Module, plan_fn: Callable[..., Tensor] | None) -> None:
    """The Sinkhorn solver of every layer (None: the replicated `sinkhorn`). A sharded solver is
    collective: set the same kind on every rank."""
    for layer in dotmoe_layers(model):
        layer.plan_fn = plan_fn


def set_tau(model: nn.Module, tau: float) -> None:
    for layer in dotmoe_layers(model):
        layer.tau = float(tau)
