"""Sinkhorn sharded by rows over the ranks of a process group, and layer-parallel helpers
(DESIGN.md, "Distributed design"; contract 3).

`sharded_sinkhorn(scores, capacities, tau, group=...)` gives the same plan and the same gradient
as `sinkhorn.sinkhorn` on one process, while each rank iterates over only its own block of the
`d_ff` rows (neurons) of every layer:

    rows       contiguous blocks in rank order, `row_bounds(n, world)` (the first n % world ranks
               hold one row more);
    iterations the pure Sinkhorn of `sinkhorn.py` on the local rows, its `E` column partials
               (sums, maxima) all-reduced through the `col_reduce` hook: every rank takes the same
               branches and stops at the same iteration;
    forward    the local plan rows are all-gathered: every rank returns the whole plan, because its
               consumer (the layer's mask `g @ A^T` for the rank's own tokens) needs all neurons;
    backward   the mirror: the plan's gradient is reduce-scattered (SUM) to the row owners, the
               implicit backward runs on the local rows with its column reductions all-reduced, and
               the scores' gradient is non-zero only on the rank's own rows.

Gradient semantics under data parallelism (why reduce-scatter and not slicing).
Rank r (of R in the data-parallel group) runs its own micro-batch: loss l_r, upstream gradient
G_r = dl_r/dP, all different. The objective is the mean loss (1/R) sum_r l_r, and DeepSpeed (like
DDP) obtains its gradient by AVERAGING what each rank's backward leaves in `Theta.grad`:
    grad = (1/R) sum_r Theta.grad_r.
Replicated Sinkhorn: Theta.grad_r = J^T G_r (J: the plan's Jacobian), so grad = J^T mean_r G_r.
Sharded: the forward is `P = all_gather_r(P_r(Theta[rows_r]))`, a function of every rank's rows,
so the backward of the all-gather is a SUM over the ranks' upstream gradients, delivered to the
owner: rank r receives S_r = sum_q G_q[rows_r], and since J^T's only coupling between rows is the
E-sized column step (all-reduced), the implicit backward on rank r gives exactly
(J^T sum_q G_q)[rows_r] on its rows and zero elsewhere. So Theta.grad_r is the gradient of the
SUM of the ranks' losses restricted to rank r's rows; the supports are disjoint, and DeepSpeed's
average gives (1/R) sum_r (J^T sum_q G_q)[rows_r] = J^T mean_q G_q: the replicated result, with no
double counting (each row is owned once) and no missing factor (the 1/R is DeepSpeed's).
Slicing instead (rank r keeping G_r[rows_r]) would be wrong twice: the column step would mix
rows of different ranks' gradients, and even when every rank had the same G, the average would
then be J^T G / R. The same holds with gradient accumulation (each micro-step's backward is
linear) and when the Sinkhorn group is a sub-group of the data-parallel group (each group owns
every row once and sums its members' gradients; the global average divides by the global size).
With `local_rows=True` (the caller holds only its block of Theta) the gradient is likewise that
of the SUM of the losses: divide by R if that block's optimizer does not average over ranks.

All of it is collective: every rank of the group must call it (and run its backward) in the same
order with the same shapes and arguments, as data-parallel training does.

Layer-parallel work (`layer_owner`, `broadcast_from_owners`, `assign_layers_by_owner`): whole-layer
steps (rounding, clustering) run on rank `l mod world` and are broadcast to the others.

torch.distributed only (no DeepSpeed); a world of one (or no process group) is plain `sinkhorn`.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .sinkhorn import DEFAULT_CHECK_EVERY, DEFAULT_ITERS, DEFAULT_REFINE_ROUNDS, DEFAULT_TOL, assign_by_score, sinkhorn

log = logging.getLogger(__name__)

PLAN_MODES = ("auto", "sharded", "replicated")
# The signature the layer calls its plan function with (DotMoEFFN.plan): that of `sinkhorn`.
PlanFn = Callable[..., Tensor]


# ----------------------------------------------------------------------------- groups and rows

def group_size(group=None) -> int:
    """Ranks in `group` (the default group when None); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def row_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous row blocks `[lo, hi)` per rank; the first `n % world` ranks hold one row more."""
    if world < 1:
        raise ValueError(f"world size must be positive, got {world}")
    if n < world:
        raise ValueError(f"cannot shard {n} rows over {world} ranks: every rank needs at least one row "
                         "(use the replicated Sinkhorn, or a smaller group)")
    base, extra = divmod(n, world)
    bounds, lo = [], 0
    for r in range(world):
        hi = lo + base + (1 if r < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _col_reduce(group) -> Callable[[Tensor, str], Tensor]:
    """The `col_reduce` hook of `sinkhorn`: all-reduce of per-column partials over the group."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def reduce(t: Tensor, op: str) -> Tensor:
        out = t.detach().contiguous().clone()       # the caller's tensor is left as it was
        dist.all_reduce(out, op=ops[op], group=group)
        return out
    return reduce


def _check_same_everywhere(values: Sequence[int], what: str, group, device: torch.device) -> None:
    """Fail on every rank (instead of hanging or mixing shapes) when ranks disagree on `values`.
    `device`: where the group's backend takes tensors (the scores' device: NCCL needs CUDA)."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        raise ValueError(f"sharded Sinkhorn: the ranks disagree on {what} (min {lo.tolist()}, max "
                         f"{hi.tolist()}, this rank {mine.tolist()}); every rank must call it with the "
                         "same layers and shapes")


def _local_bounds(local_rows: int, group, device: torch.device) -> list[tuple[int, int]]:
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local_rows], dtype=torch.int64, device=device), group=group)
    bounds, lo = [], 0
    for s in sizes:
        bounds.append((lo, lo + int(s.item())))
        lo += int(s.item())
    if any(hi == lo for lo, hi in bounds):
        raise ValueError(f"sharded Sinkhorn: a rank holds no rows (row blocks {bounds}); every rank needs "
                         "at least one row")
    return bounds


# ----------------------------------------------------------------------------- row collectives

# torch 2.13 renamed the single-tensor collectives (the old names warn); older versions have only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_rows(local: Tensor, bounds: list[tuple[int, int]], group) -> Tensor:
    """[L, m_r, E] row blocks in rank order -> [L, n, E] on every rank. One collective per layer, so
    the only full-size tensor is the result (even blocks are gathered straight into it)."""
    L, _, E = local.shape
    n = bounds[-1][1]
    sizes = [hi - lo for lo, hi in bounds]
    m_max = max(sizes)
    out = local.new_empty(L, n, E)
    even = min(sizes) == m_max
    send = None if even else local.new_zeros(m_max, E)
    buf = None if even else local.new_empty(len(bounds) * m_max, E)
    for l in range(L):
        if even:
            _all_gather_single(out[l], local[l].contiguous(), group=group)
            continue
        # gloo's all-gather needs equal sizes: pad every block to the largest.
        send[: local.shape[1]].copy_(local[l])
        _all_gather_single(buf, send, group=group)
        for q, (lo, hi) in enumerate(bounds):
            out[l, lo:hi].copy_(buf[q * m_max: q * m_max + hi - lo])
    return out


def _reduce_scatter_rows(full: Tensor, bounds: list[tuple[int, int]], rank: int, group) -> Tensor:
    """[L, n, E] on every rank -> this rank's rows [L, m_r, E] summed over the ranks."""
    L, _, E = full.shape
    lo, hi = bounds[rank]
    out = full.new_empty(L, hi - lo, E)
    sizes = [b - a for a, b in bounds]
    even = min(sizes) == max(sizes)
    for l in range(L):
        if even:
            _reduce_scatter_single(out[l], full[l], group=group)
        else:   # row blocks of one layer are contiguous views: no copies on our side
            dist.reduce_scatter(out[l], [full[l, a:b] for a, b in bounds], group=group)
    return out


class _GatherRows(torch.autograd.Function):
    """Forward: all-gather of row blocks. Backward: reduce-scatter (SUM) of the full gradient to the
    row owners: the exact adjoint of the all-gather when every rank's output feeds its own loss."""

    @staticmethod
    def forward(ctx, local: Tensor, bounds: list[tuple[int, int]], rank: int, group) -> Tensor:
        ctx.bounds, ctx.rank, ctx.group = bounds, rank, group
        return _all_gather_rows(local.detach(), bounds, group)

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        return _reduce_scatter_rows(grad_full.contiguous(), ctx.bounds, ctx.rank, ctx.group), None, None, None


# ----------------------------------------------------------------------------- the sharded Sinkhorn

def sharded_sinkhorn(scores: Tensor, capacities: Sequence[int] | Tensor, tau: float = 1.0,
                     n_iters: int = DEFAULT_ITERS, tol: float | None = DEFAULT_TOL, *, group=None,
                     check_every: int = DEFAULT_CHECK_EVERY, local_rows: bool = False) -> Tensor:
    """`sinkhorn(scores, capacities, tau, n_iters, tol)` computed row-sharded over `group`.

    scores:     `[n, E]` or `[L, n, E]`, the same on every rank (a replicated parameter such as the
                layer's Theta); this rank works on rows `row_bounds(n, world)[rank]`. With
                `local_rows=True`, `scores` is instead this rank's own row block (`[m_r, E]` /
                `[L, m_r, E]`, blocks in rank order form the whole matrix).
    capacities: over all `n` rows, as for `sinkhorn`.
    group:      the process group (None: the default group). Without torch.distributed, or in a
                group of one, this is `sinkhorn` itself.
    Returns the whole plan (`[n, E]` / `[L, n, E]`) on every rank. The gradient reaching `scores`
    is the gradient of the SUM over ranks of their losses, on this rank's rows only (zero on
    the others); DeepSpeed's data-parallel average then gives the gradient of the mean loss, as
    the replicated computation does (module docstring). Collective: call it on every rank.
    """
    world = group_size(group)
    if world == 1:
        return sinkhorn(scores, capacities, tau, n_iters, tol, check_every=check_every)
    if world < 1:
        raise ValueError("sharded Sinkhorn: this rank is not a member of the process group it was given")
    if not isinstance(scores, Tensor) or scores.dim() not in (2, 3):
        raise ValueError(f"scores must be a tensor [n, E] or [L, n, E], got "
                         f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}")
    rank = dist.get_rank(group)
    batched = scores if scores.dim() == 3 else scores.unsqueeze(0)
    if local_rows:
        _check_same_everywhere([scores.dim(), batched.shape[0], batched.shape[2]], "the number of layers and columns",
                               group, scores.device)
        bounds = _local_bounds(batched.shape[1], group, scores.device)
        local = batched
    else:
        _check_same_everywhere(list(scores.shape), "the shape of scores", group, scores.device)
        bounds = row_bounds(batched.shape[1], world)
        lo, hi = bounds[rank]
        local = batched[:, lo:hi]     # autograd: the gradient of the other rows stays zero
    plan_local = sinkhorn(local, capacities, tau, n_iters, tol, check_every=check_every,
                          col_reduce=_col_reduce(group))
    plan = _GatherRows.apply(plan_local, bounds, rank, group)
    return plan if scores.dim() == 3 else plan.squeeze(0)


class ShardedPlan:
    """A plan function for `DotMoEFFN(plan_fn=...)` / `layer.set_plan_fn`: `sinkhorn`'s signature,
    computed by `sharded_sinkhorn` over `group`."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, scores: Tensor, capacities, tau: float = 1.0, n_iters: int = DEFAULT_ITERS,
                 tol: float | None = DEFAULT_TOL, *, check_every: int = DEFAULT_CHECK_EVERY) -> Tensor:
        return sharded_sinkhorn(scores, capacities, tau, n_iters, tol, group=self.group, check_every=check_every)

    def __deepcopy__(self, memo) -> "ShardedPlan":
        return ShardedPlan(self.group)        # a process group is a handle, shared, never copied

    def __repr__(self) -> str:
        return f"ShardedPlan(ranks={group_size(self.group)})"


def select_plan_fn(mode: str = "auto", group=None, d_ff: int | None = None) -> tuple[PlanFn | None, str]:
    """The plan function for the layers and a one-line description for the run log.

    mode: 'auto' (sharded when the group has more than one rank), 'sharded' or 'replicated'.
    Returns `(None, ...)` for the replicated Sinkhorn (the layer's default) or a `ShardedPlan`.
    """
    if mode not in PLAN_MODES:
        raise ValueError(f"sinkhorn mode must be one of {PLAN_MODES}, got {mode!r}")
    world = group_size(group)
    if mode == "replicated" or world == 1:
        why = "requested" if mode == "replicated" else "one rank"
        msg = f"Sinkhorn: replicated ({why}; every rank computes every layer's whole plan)"
        log.info(msg)
        return None, msg
    rows = ""
    if d_ff is not None:
        bounds = row_bounds(d_ff, world)
        sizes = sorted({hi - lo for lo, hi in bounds})
        rows = f", {'-'.join(map(str, sizes))} of {d_ff} rows per rank"
    msg = f"Sinkhorn: sharded over {world} ranks ({mode}{rows}; column sums all-reduced, plan all-gathered)"
    log.info(msg)
    return ShardedPlan(group), msg


# ----------------------------------------------------------------------------- layer-parallel work

def layer_owner(layer: int, world: int) -> int:
    """The rank that does whole-layer work for `layer` (the same rule as distributed.owner_of)."""
    if world < 1 or layer < 0:
        raise ValueError(f"layer_owner needs layer >= 0 and world >= 1, got layer={layer}, world={world}")
    return layer % world


def broadcast_from_owners(per_layer: Sequence[Tensor], group=None) -> list[Tensor]:
    """Entry l of `per_layer` as computed on rank `layer_owner(l, world)`, on every rank, in place.

    Every rank passes tensors of the same shapes and dtypes (non-owners: buffers to receive into).
    Collective: one broadcast per layer, in layer order.
    """
    world = group_size(group)
    tensors = list(per_layer)
    if world == 1:
        return tensors
    for l, t in enumerate(tensors):
        src = dist.get_global_rank(group, layer_owner(l, world)) if group is not None else layer_owner(l, world)
        if not t.is_contiguous():
            raise ValueError(f"broadcast_from_owners: layer {l}'s tensor must be contiguous (it is received in place)")
        dist.broadcast(t, src=src, group=group)
    return tensors


@torch.no_grad()
def assign_layers_by_owner(scores: Sequence[Tensor] | Tensor, capacities: Sequence[int] | Tensor,
                           group=None, refine_rounds: int = DEFAULT_REFINE_ROUNDS) -> list[Tensor]:
    """`assign_by_score` of every layer (`scores[l]`: `[n, E]`), each computed only on its owner and
    broadcast: the same assignments as one process computing them all, in about 1/world the time.
    `capacities` is `[E]` or per layer `[L, E]`. Returns one `[n]` long tensor per layer."""
    layers = list(scores)
    world, me = group_size(group), group_rank(group)
    caps = torch.as_tensor(capacities)
    out = []
    for l, s in enumerate(layers):
        c = caps[l] if caps.dim() == 2 else caps
        if layer_owner(l, world) == me:
            out.append(assign_by_score(s.detach(), c, refine_rounds).contiguous())
        else:
            out.append(torch.empty(s.shape[0], dtype=torch.int64, device=s.device))
    return broadcast_from_owners(out, group)
