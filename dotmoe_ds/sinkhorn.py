"""Balanced optimal transport of neurons onto experts (METHOD.md section 2). Pure torch.

- `sinkhorn`: log-domain Sinkhorn-Knopp with row marginals 1 and column marginals `capacities`,
  on `[n, E]` or batched `[L, n, E]` scores. The backward pass is implicit differentiation at the
  fixed point, so its memory is that of one plan whatever the iteration count.
- `round_to_assignment`: capacity-exact hard assignment maximising the plan's log-likelihood.
- `ste_assignment`: the straight-through combination, hard forward and soft backward.

No distributed or DeepSpeed code lives here: `distributed.py` wraps these functions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Row updates come last, so every row (neuron) of the plan sums to exactly 1; the column error
# (expert fill) is what `tol` bounds, relative to each column's capacity.
DEFAULT_ITERS = 100
DEFAULT_TOL = 1e-4


def _capacity_tensor(capacities: Sequence[int] | Tensor, scores: Tensor) -> Tensor:
    """Capacities as a float tensor broadcastable to `scores[..., 0, :]`, checked against `scores`."""
    caps = torch.as_tensor(capacities, dtype=torch.float64, device=scores.device)
    n, E = scores.shape[-2], scores.shape[-1]
    if caps.shape[-1] != E:
        raise ValueError(f"capacities has {caps.shape[-1]} entries but scores has {E} columns (experts)")
    if caps.dim() == 2 and (scores.dim() != 3 or caps.shape[0] != scores.shape[0]):
        raise ValueError(f"per-layer capacities of shape {tuple(caps.shape)} need scores [L, n, E] "
                         f"with the same L, got {tuple(scores.shape)}")
    if (caps <= 0).any():
        raise ValueError(f"capacities must be positive, got {caps.tolist()}")
    if (caps != caps.round()).any():
        raise ValueError(f"capacities must be integers, got {caps.tolist()}")
    sums = caps.sum(-1)
    if (sums != n).any():
        raise ValueError(f"capacities sum to {sums.tolist()} but there are {n} neurons (rows): "
                         "they must sum to the number of rows exactly")
    return caps.to(scores.dtype if scores.is_floating_point() else torch.float32)


def _check_scores(scores: Tensor) -> None:
    if scores.dim() not in (2, 3):
        raise ValueError(f"scores must be [n, E] or [L, n, E], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).sum().item()
        raise ValueError(f"scores contain {bad} non-finite values (NaN or inf); the assignment "
                         "scores diverged or were loaded wrongly")


def sinkhorn_potentials(log_k: Tensor, log_b: Tensor, n_iters: int, tol: float | None,
                        check_every: int = 10) -> tuple[Tensor, Tensor, int]:
    """Dual potentials `(f, g)` of the balanced problem on log-kernel `log_k` ([..., n, E]).

    `log_b` is `[..., 1, E]` (log capacities). The plan is `exp(log_k + f + g)`. Updates columns
    then rows (the order POT's `sinkhorn_log` uses), so rows are exact on return. Returns the
    potentials and the number of iterations run.
    """
    f = torch.zeros_like(log_k[..., :, :1])
    g = torch.zeros_like(log_k[..., :1, :])
    it = 0
    for it in range(1, n_iters + 1):
        g = log_b - torch.logsumexp(log_k + f, dim=-2, keepdim=True)
        f = -torch.logsumexp(log_k + g, dim=-1, keepdim=True)
        if tol is not None and it % check_every == 0:
            col = torch.logsumexp(log_k + f + g, dim=-2, keepdim=True)
            if ((col - log_b).exp() - 1).abs().max() < tol:
                break
    return f, g, it


class _Sinkhorn(torch.autograd.Function):
    """Plan forward; implicit-function-theorem backward (memory independent of iterations).

    At the fixed point P = exp(S + f 1^T + 1 g^T) with P 1 = a, P^T 1 = b. For an upstream
    gradient G, the gradient w.r.t. S is P * (G - lam_f 1^T - 1 lam_g^T), where (lam_f, lam_g)
    solve [[diag(a), P], [P^T, diag(b)]] lam = (rowsum(P*G), colsum(P*G)). Eliminating lam_f
    leaves an E x E system (diag(b) - P^T diag(1/a) P) lam_g = c - P^T (r / a), singular only
    along the gauge direction 1 (f + t, g - t give the same plan), fixed by adding 1 1^T.
    """

    @staticmethod
    def forward(ctx, log_k: Tensor, log_b: Tensor, n_iters: int, tol: float | None) -> Tensor:
        f, g, _ = sinkhorn_potentials(log_k, log_b, n_iters, tol)
        plan = (log_k + f + g).exp()
        ctx.save_for_backward(plan)
        return plan

    @staticmethod
    def backward(ctx, grad_plan: Tensor):
        (plan,) = ctx.saved_tensors
        # float64: near-hard plans make the Schur complement a difference of close numbers.
        P = plan.double()
        G = grad_plan.double()
        PG = P * G
        r = PG.sum(-1)                        # [..., n]
        c = PG.sum(-2)                        # [..., E]
        a = P.sum(-1)                         # [..., n]  (1 at convergence)
        b = P.sum(-2)                         # [..., E]  (capacities at convergence)
        P_over_a = P / a.unsqueeze(-1)
        schur = torch.diag_embed(b) - P.transpose(-1, -2) @ P_over_a
        schur = schur + 1.0                   # gauge fix: + 1 1^T
        rhs = c - (P_over_a.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
        lam_g = torch.linalg.solve(schur, rhs.unsqueeze(-1)).squeeze(-1)
        lam_f = (r - (P @ lam_g.unsqueeze(-1)).squeeze(-1)) / a
        grad = P * (G - lam_f.unsqueeze(-1) - lam_g.unsqueeze(-2))
        return grad.to(grad_plan.dtype), None, None, None


def sinkhorn(scores: Tensor, capacities: Sequence[int] | Tensor, tau: float = 1.0,
             n_iters: int = DEFAULT_ITERS, tol: float | None = DEFAULT_TOL) -> Tensor:
    """Soft plan of the balanced transport of neurons (rows) onto experts (columns).

    scores:     `[n, E]` or `[L, n, E]` (a batch of layers); larger means "belongs more".
    capacities: `[E]` integers summing to n (or `[L, E]` per layer).
    tau:        temperature; the plan is Sinkhorn(scores / tau).
    n_iters:    maximum iterations; `tol`: stop early once every column sum is within `tol`
                (relative to its capacity). Rows always sum to exactly 1.
    Differentiable w.r.t. `scores` by implicit differentiation at the fixed point.
    """
    _check_scores(scores)
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be at least 1, got {n_iters}")
    caps = _capacity_tensor(capacities, scores)
    log_b = caps.log().unsqueeze(-2)          # [1, E] or [L, 1, E]
    return _Sinkhorn.apply(scores / tau, log_b, n_iters, tol)


def marginal_error(plan: Tensor, capacities: Sequence[int] | Tensor) -> Tensor:
    """Largest relative column-sum error of a plan (rows are exact by construction)."""
    caps = torch.as_tensor(capacities, dtype=plan.dtype, device=plan.device)
    return ((plan.sum(-2) - caps).abs() / caps).max()


# ----------------------------------------------------------------------------- rounding

def _greedy_fill(scores: Tensor, caps: Tensor) -> Tensor:
    """Capacity-exact assignment by rounds of proposals: each unplaced row proposes to its best
    open column; each column keeps its best proposals up to its free room. At most E rounds."""
    n, E = scores.shape
    assign = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    room = caps.clone().long()
    open_cols = torch.ones(E, dtype=torch.bool, device=scores.device)
    neg_inf = torch.finfo(scores.dtype).min
    for _ in range(E + 1):
        free = assign < 0
        if not free.any():
            break
        rows = free.nonzero().squeeze(1)
        masked = scores[rows].masked_fill(~open_cols, neg_inf)
        choice = masked.argmax(1)
        best = masked.gather(1, choice[:, None]).squeeze(1)
        # Within each column, rank proposals by score; accept the first `room` of them.
        order = torch.argsort(best, descending=True, stable=True)
        choice_o, rows_o = choice[order], rows[order]
        order2 = torch.argsort(choice_o, stable=True)
        choice_s, rows_s = choice_o[order2], rows_o[order2]
        counts = torch.bincount(choice_s, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(choice_s.numel(), device=scores.device) - starts[choice_s]
        accept = rank < room[choice_s]
        assign[rows_s[accept]] = choice_s[accept]
        room -= torch.bincount(choice_s[accept], minlength=E)
        open_cols = room > 0
    assert (assign >= 0).all() and (torch.bincount(assign, minlength=E) == caps.long()).all()
    return assign


def _refine_by_swaps(scores: Tensor, assign: Tensor, max_rounds: int) -> Tensor:
    """2-exchange local search: swap a neuron of column a with one of column b whenever that
    raises the total score. Capacities are preserved by construction."""
    n, E = scores.shape
    if E < 2:
        return assign
    idx = torch.arange(n, device=scores.device)
    for _ in range(max_rounds):
        cur = scores[idx, assign]
        delta = scores - cur[:, None]                       # gain of moving row i to column b
        best = torch.full((E, E), float("-inf"), dtype=scores.dtype, device=scores.device)
        best = best.scatter_reduce(0, assign[:, None].expand(n, E), delta, "amax")
        gain = best + best.T
        gain.fill_diagonal_(float("-inf"))
        if not (gain > 1e-9 * (1 + cur.abs().max())).any():
            break
        flat = torch.argsort(gain.flatten(), descending=True)
        used = torch.zeros(E, dtype=torch.bool, device=scores.device)
        swapped = False
        for f in flat[: E * E].tolist():
            a, b = divmod(f, E)
            if gain[a, b] <= 0:
                break
            if used[a] or used[b]:
                continue
            i = torch.where(assign == a, delta[:, b], float("-inf")).argmax()
            j = torch.where(assign == b, delta[:, a], float("-inf")).argmax()
            assign[i], assign[j] = b, a
            used[a] = used[b] = True
            swapped = True
        if not swapped:
            break
    return assign


def assign_by_score(scores: Tensor, capacities: Sequence[int] | Tensor, refine_rounds: int = 50) -> Tensor:
    """Column index per row, with exactly `capacities[e]` rows in column e, approximately
    maximising `sum_i scores[i, assign[i]]` (greedy proposals, then 2-exchange refinement).

    `scores` is `[n, E]` or `[L, n, E]`; returns `[n]` or `[L, n]` (long)."""
    if scores.dim() == 3:
        caps = torch.as_tensor(capacities)
        per_layer = caps if caps.dim() == 2 else caps.expand(scores.shape[0], -1)
        return torch.stack([assign_by_score(s, c, refine_rounds) for s, c in zip(scores, per_layer)])
    _check_scores(scores)
    caps = _capacity_tensor(capacities, scores)
    with torch.no_grad():
        s = scores.detach()
        assign = _greedy_fill(s, caps)
        return _refine_by_swaps(s, assign, refine_rounds)


def round_to_assignment(plan: Tensor, capacities: Sequence[int] | Tensor, refine_rounds: int = 50) -> Tensor:
    """Capacity-exact hard assignment of a plan: expert index per neuron maximising sum(H * log P)."""
    tiny = torch.finfo(plan.dtype).tiny
    return assign_by_score(plan.detach().clamp_min(tiny).log(), capacities, refine_rounds)


def one_hot_assignment(assign: Tensor, num_columns: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """`[..., n]` column indices to a 0/1 matrix `[..., n, E]`."""
    return torch.nn.functional.one_hot(assign, num_columns).to(dtype)


def ste_assignment(plan: Tensor, capacities: Sequence[int] | Tensor,
                   assign: Tensor | None = None, refine_rounds: int = 50) -> tuple[Tensor, Tensor]:
    """Straight-through assignment `A = H + (P - stopgrad(P))`: exactly the hard 0/1 plan in the
    forward pass, the soft plan's gradient in the backward pass. Returns `(A, assign)`."""
    if assign is None:
        assign = round_to_assignment(plan, capacities, refine_rounds)
    hard = one_hot_assignment(assign, plan.shape[-1], plan.dtype)
    return hard + (plan - plan.detach()), assign
