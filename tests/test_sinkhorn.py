"""Balanced Sinkhorn, its implicit gradient, capacity-exact rounding and the STE
(dotmoe_ds/sinkhorn.py; METHOD.md section 2, DESIGN.md contracts 3-4)."""
import threading

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from dotmoe_ds.sinkhorn import (
    _cancel_cycles, _greedy_fill, assign_by_score, marginal_error, one_hot_assignment,
    round_to_assignment, sinkhorn, sinkhorn_potentials, ste_assignment)

import dotmoe_ds.sinkhorn as _sinkhorn_module

TAUS = (1.0, 0.1, 0.05, 0.01)
_KERNEL = _sinkhorn_module._kernel


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are small: with a second thread every parallel region waits for it, which
    on a busy 2-core machine costs milliseconds per op (measured: 15 ms for exp of 800 doubles)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def uneven_caps(n: int, E: int, seed: int = 0) -> list[int]:
    """Positive integer capacities summing to n, deliberately unequal."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(E, generator=g) + 0.5
    caps = (w / w.sum() * (n - E)).floor().long() + 1
    caps[0] += n - caps.sum()
    return caps.tolist()


def uniform_caps(n: int, E: int) -> list[int]:
    return [n // E + (1 if e < n % E else 0) for e in range(E)]


def pot_plan(scores: torch.Tensor, caps, tau: float, n_iters: int) -> torch.Tensor:
    """POT's log-domain Sinkhorn on the same problem, float64, exactly n_iters iterations."""
    plan = ot.bregman.sinkhorn_log(np.ones(scores.shape[0]), np.asarray(caps, dtype=np.float64),
                                   -scores.double().numpy(), tau, numItermax=n_iters, stopThr=0.0,
                                   warn=False)
    return torch.from_numpy(plan)


def unrolled_plan(scores: torch.Tensor, caps, tau: float, n_iters: int) -> torch.Tensor:
    """Reference: plain log-domain Sinkhorn, differentiated by autograd through every iteration."""
    log_k = scores / tau
    log_b = torch.as_tensor(caps, dtype=scores.dtype).log().unsqueeze(-2)
    f = torch.zeros_like(log_k[..., :1])
    for _ in range(n_iters):
        g = log_b - torch.logsumexp(log_k + f, -2, keepdim=True)
        f = -torch.logsumexp(log_k + g, -1, keepdim=True)
    return (log_k + f + g).exp()


# ----------------------------------------------------------------------------- marginals

@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("shape", [(1536, 8), (64, 4), (3, 200, 5)])
def test_marginals_within_tolerance(tau, shape):
    n, E = shape[-2:]
    caps = uneven_caps(n, E)
    scores = torch.randn(*shape)
    plan = sinkhorn(scores, caps, tau, n_iters=5000, tol=1e-4)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    # The stopping test uses the same sums up to float32 rounding of the explicit plan.
    assert marginal_error(plan, caps).item() <= 1.2e-4
    assert (plan.sum(-1) - 1).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tau", TAUS)
def test_realistic_batched_size_stays_finite_and_converges(tau):
    scores = torch.randn(4, 1536, 8)
    caps = torch.tensor([uniform_caps(1536, 8), uneven_caps(1536, 8, 1)] * 2)   # per layer [L, E]
    plan = sinkhorn(scores, caps, tau, n_iters=5000, tol=1e-4)
    assert torch.isfinite(plan).all()
    assert marginal_error(plan, caps).item() <= 1.2e-4
    for layer in range(4):
        assert ((plan[layer].sum(0) - caps[layer]).abs() / caps[layer]).max() <= 1.2e-4


def test_extreme_scores_stay_finite_and_match_pot():
    """Scores / tau of order 1e4 and a column that every row dislikes by a wide margin."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(300, 6, generator=g, dtype=torch.float64) * 30
    scores[:, 0] -= 200
    caps = uneven_caps(300, 6)
    ours = sinkhorn(scores, caps, 0.01, n_iters=300, tol=None)
    assert torch.isfinite(ours).all()
    assert (ours - pot_plan(scores, caps, 0.01, 300)).abs().max().item() <= 1e-10
    f32 = sinkhorn(scores.float(), caps, 0.01, n_iters=300, tol=None)
    assert torch.isfinite(f32).all() and (f32.double() - ours).abs().max().item() <= 1e-4


@pytest.mark.parametrize("limits", [
    dict(col_floor=float("inf")),                  # every iteration in the log domain
    dict(row_floor=0.9),                           # frequent log-domain row updates
    dict(col_floor=5.0, row_floor=0.5),            # a mix of both
    dict(bound=1.05),                              # scalings absorbed almost every iteration
])
def test_every_safeguard_branch_computes_the_same_iterates(limits, monkeypatch):
    """The scaling-domain shortcuts (absorption, log-domain fallbacks) are exact rewrites of the
    log-domain iteration: forcing each of them still gives POT's plan."""
    import dotmoe_ds.sinkhorn as module
    calls = []
    monkeypatch.setattr(module, "_kernel", lambda *a: calls.append(1) or kernel(*a))
    kernel = _KERNEL
    scores = torch.randn(2, 80, 5, dtype=torch.float64) * 3
    caps = uneven_caps(80, 5)
    log_bT = torch.tensor(caps, dtype=torch.float64).log().view(1, 5, 1)
    log_kT = (scores / 0.05).mT.contiguous()                     # _iterate's layout: [L, E, n]
    plan_T, f, g, it = module._iterate(log_kT, log_bT, 60, None, 1, None, **limits)
    assert it == 60 and len(calls) > 10           # the forced branch was taken many times
    for layer in range(2):
        assert (plan_T[layer].T - pot_plan(scores[layer], caps, 0.05, 60)).abs().max().item() <= 1e-10
    assert (plan_T - (log_kT + f + g).exp()).abs().max().item() <= 1e-12


def test_tolerance_stops_early_and_potentials_reproduce_the_plan():
    scores = torch.randn(500, 7, dtype=torch.float64)
    caps = uneven_caps(500, 7)
    log_b = torch.tensor(caps, dtype=torch.float64).log().unsqueeze(0)
    f, g, it = sinkhorn_potentials(scores / 0.1, log_b, n_iters=10000, tol=1e-8)
    assert 1 < it < 10000
    plan = (scores / 0.1 + f + g).exp()
    assert marginal_error(plan, caps).item() <= 1e-8
    direct = sinkhorn(scores, caps, 0.1, n_iters=10000, tol=1e-8)
    assert (plan - direct).abs().max().item() <= 1e-12
    _, _, every_7 = sinkhorn_potentials(scores / 0.1, log_b, n_iters=10000, tol=1e-8, check_every=7)
    assert every_7 % 7 == 0 and it <= every_7 < it + 7


# ----------------------------------------------------------------------------- equality with POT

@pytest.mark.parametrize("tau", TAUS)
def test_plan_equals_pot_float64(tau):
    scores = torch.randn(1536, 8, dtype=torch.float64)
    caps = uneven_caps(1536, 8)
    diff = (sinkhorn(scores, caps, tau, n_iters=200, tol=None) - pot_plan(scores, caps, tau, 200)).abs().max()
    assert diff.item() <= 1e-10


@pytest.mark.parametrize("tau", (1.0, 0.1, 0.05))
@pytest.mark.parametrize("shape", [(1536, 8), (96, 5)])
def test_plan_equals_pot_float32(tau, shape):
    scores = torch.randn(*shape)
    caps = uniform_caps(*shape)
    diff = (sinkhorn(scores, caps, tau, n_iters=100, tol=None).double() - pot_plan(scores, caps, tau, 100)).abs().max()
    assert diff.item() <= 1e-5


# ----------------------------------------------------------------------------- batching

@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("tau", (1.0, 0.05))
def test_batched_equals_looped(per_layer, tau):
    L, n, E = 4, 120, 6
    scores = torch.randn(L, n, E, dtype=torch.float64)
    caps = torch.tensor([uneven_caps(n, E, seed) for seed in range(L)]) if per_layer else uneven_caps(n, E)
    batched = sinkhorn(scores, caps, tau, n_iters=150, tol=None)
    for layer in range(L):
        c = caps[layer] if per_layer else caps
        alone = sinkhorn(scores[layer], c, tau, n_iters=150, tol=None)
        assert (batched[layer] - alone).abs().max().item() <= 1e-12
        assert (batched[layer] - pot_plan(scores[layer], c, tau, 150)).abs().max().item() <= 1e-10


def test_batched_gradient_equals_looped():
    L, n, E = 3, 40, 4
    scores = torch.randn(L, n, E, dtype=torch.float64, requires_grad=True)
    caps = torch.tensor([uneven_caps(n, E, seed) for seed in range(L)])
    weight = torch.randn(L, n, E, dtype=torch.float64)
    (grad,) = torch.autograd.grad((sinkhorn(scores, caps, 0.2, 3000, 1e-12) * weight).sum(), scores)
    for layer in range(L):
        s = scores[layer].detach().requires_grad_()
        (g,) = torch.autograd.grad((sinkhorn(s, caps[layer], 0.2, 3000, 1e-12) * weight[layer]).sum(), s)
        assert (grad[layer] - g).abs().max().item() <= 1e-10


# ----------------------------------------------------------------------------- gradient

# Unrolled iterations: a few times what these problems need to converge to 1e-13.
@pytest.mark.parametrize("tau,unrolled_iters", [(1.0, 150), (0.3, 400), (0.1, 1500)])
@pytest.mark.parametrize("shape,caps", [((12, 3), [4, 5, 3]), ((3, 10, 4), [[2, 3, 1, 4], [1, 2, 3, 4], [4, 2, 2, 2]])])
def test_implicit_gradient_equals_unrolled_autograd(tau, unrolled_iters, shape, caps):
    scores = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(*shape, dtype=torch.float64)
    plan = sinkhorn(scores, caps, tau, n_iters=10000, tol=1e-13)
    (ours,) = torch.autograd.grad((plan * weight).sum(), scores)
    ref_plan = unrolled_plan(scores, caps, tau, unrolled_iters)
    (ref,) = torch.autograd.grad((ref_plan * weight).sum(), scores)
    assert (plan - ref_plan).abs().max().item() <= 1e-11
    assert (ours - ref).abs().max().item() <= 1e-9 * max(1.0, ref.abs().max().item())
    assert ref.abs().max().item() > 1e-3     # the comparison is not between two zeros


def test_gradcheck_small_float64():
    scores = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: sinkhorn(s, [1, 2, 3], 0.5, 3000, 1e-14), (scores,))
    batched = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: sinkhorn(s, [[1, 2, 2], [3, 1, 1]], 0.3, 3000, 1e-14), (batched,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_finite_at_low_temperature(dtype):
    scores = torch.randn(1536, 8, dtype=dtype, requires_grad=True)
    plan = sinkhorn(scores, uniform_caps(1536, 8), 0.01, n_iters=100)
    (grad,) = torch.autograd.grad((plan * torch.randn_like(plan)).sum(), scores)
    assert torch.isfinite(grad).all()
    assert grad.abs().max() > 0


def test_gradient_of_a_hard_plan_is_zero_and_finite():
    """A plan that is exactly 0/1 in float64 is locally constant: its gradient is 0, not NaN
    (the E x E system is then singular beyond the gauge direction)."""
    assign = torch.arange(12) % 3
    scores = (one_hot_assignment(assign, 3, torch.float64) * 50).requires_grad_()
    plan = sinkhorn(scores, [4, 4, 4], 0.01, n_iters=50)
    assert torch.equal(plan, one_hot_assignment(assign, 3, torch.float64))
    (grad,) = torch.autograd.grad((plan * torch.randn_like(plan)).sum(), scores)
    assert torch.isfinite(grad).all() and grad.abs().max().item() <= 1e-12


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_backward_memory_does_not_grow_with_iterations():
    scores = torch.randn(256, 8, requires_grad=True)
    caps = uniform_caps(256, 8)
    plan_bytes = scores.numel() * scores.element_size()
    short = _saved_bytes(lambda: sinkhorn(scores, caps, 0.05, n_iters=10, tol=None))
    long = _saved_bytes(lambda: sinkhorn(scores, caps, 0.05, n_iters=500, tol=None))
    assert short == long == plan_bytes
    # The measure does see growth: unrolled autograd saves per iteration.
    assert _saved_bytes(lambda: unrolled_plan(scores, caps, 0.05, 50)) > 20 * _saved_bytes(
        lambda: unrolled_plan(scores, caps, 0.05, 2))


# ----------------------------------------------------------------------------- row-sharded use

class _ThreadAllReduce:
    """Stand-in for torch.distributed.all_reduce between threads (one per 'rank')."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=60)
        self.parts = [None] * world

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack(self.parts)
            out = stacked.sum(0) if op == "sum" else stacked.amax(0)
            self.barrier.wait()
            return out
        return reduce


@pytest.mark.parametrize("tau", (0.5, 0.01))
def test_row_sharded_equals_single_process(tau):
    """Rows split over 2 'ranks' with column sums all-reduced: same plan and gradient."""
    L, n, E = 2, 90, 5
    scores = torch.randn(L, n, E, dtype=torch.float64) * 3
    caps = uneven_caps(n, E)
    weight = torch.randn(L, n, E, dtype=torch.float64)
    full = scores.clone().requires_grad_()
    plan = sinkhorn(full, caps, tau, n_iters=400, tol=1e-9)
    (grad,) = torch.autograd.grad((plan * weight).sum(), full)
    bounds = [(0, 37), (37, n)]
    comm = _ThreadAllReduce(2)
    results, errors = [None, None], []

    def rank_main(rank: int):
        try:
            lo, hi = bounds[rank]
            part = scores[:, lo:hi].clone().requires_grad_()
            p = sinkhorn(part, caps, tau, n_iters=400, tol=1e-9, col_reduce=comm.for_rank(rank))
            (g,) = torch.autograd.grad((p * weight[:, lo:hi]).sum(), part)
            results[rank] = (p.detach(), g)
        except Exception as err:   # reported below; a hung partner fails on the barrier timeout
            errors.append(err)
            comm.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    sharded_plan = torch.cat([results[0][0], results[1][0]], dim=1)
    sharded_grad = torch.cat([results[0][1], results[1][1]], dim=1)
    assert (sharded_plan - plan).abs().max().item() <= 1e-10
    assert (sharded_grad - grad).abs().max().item() <= 1e-8


# ----------------------------------------------------------------------------- rounding

def _is_capacity_exact(assign: torch.Tensor, caps) -> bool:
    caps = torch.as_tensor(caps)
    if assign.dim() == 2:
        per_layer = caps if caps.dim() == 2 else caps.expand(assign.shape[0], -1)
        return all(_is_capacity_exact(a, c) for a, c in zip(assign, per_layer))
    return torch.equal(torch.bincount(assign, minlength=caps.numel()), caps.long())


def _objective(logp: np.ndarray, assign) -> float:
    return float(logp[np.arange(logp.shape[0]), np.asarray(assign)].sum())


def _exact_optimum(logp: np.ndarray, caps) -> float:
    """The true maximum of sum(log P[i, a(i)]) by linear assignment on the expanded matrix."""
    cols = np.repeat(np.arange(len(caps)), caps)
    rows, picked = linear_sum_assignment(-logp[:, cols])
    return float(logp[rows, cols[picked]].sum())


@pytest.mark.parametrize("shape", [(48, 4), (1536, 8), (5, 300, 7), (2000, 64)])
def test_rounding_is_capacity_exact_on_random_plans(shape):
    n, E = shape[-2:]
    caps = uneven_caps(n, E)
    plan = sinkhorn(torch.randn(*shape), caps, 0.3)
    assign = round_to_assignment(plan, caps)
    assert assign.shape == shape[:-1] and assign.dtype == torch.long
    assert _is_capacity_exact(assign, caps)


def test_rounding_is_capacity_exact_with_per_layer_capacities():
    caps = torch.tensor([uneven_caps(300, 6, seed) for seed in range(3)])
    assign = round_to_assignment(sinkhorn(torch.randn(3, 300, 6), caps, 0.1), caps)
    assert _is_capacity_exact(assign, caps)


def _degenerate_plans():
    n, E = 60, 4
    caps = [10, 20, 25, 5]
    hard = torch.arange(n) % E
    hard_caps = torch.bincount(hard, minlength=E).tolist()
    duplicated = torch.rand(1, E).expand(n, E).clone()
    every_row_prefers_0 = torch.full((n, E), 0.1)
    every_row_prefers_0[:, 0] = 0.7
    with_zeros = torch.rand(n, E) * (torch.rand(n, E) > 0.5)
    with_zeros[:, 1] = 0.0
    return {
        "all_equal": (torch.full((n, E), 0.25), caps),
        "one_hot": (one_hot_assignment(hard, E), hard_caps),
        "duplicated_rows_ties": (duplicated, caps),
        "column_every_row_prefers": (every_row_prefers_0, caps),
        "zeros_and_an_empty_column": (with_zeros, caps),
        "capacity_one_permutation": (torch.rand(9, 9), [1] * 9),
        "single_column": (torch.ones(7, 1), [7]),
        "tiny_values": (torch.rand(n, E) * 1e-30, caps),
    }


@pytest.mark.parametrize("name", list(_degenerate_plans()))
def test_rounding_is_capacity_exact_and_optimal_on_degenerate_plans(name):
    plan, caps = _degenerate_plans()[name]
    assign = round_to_assignment(plan, caps)
    assert _is_capacity_exact(assign, caps)
    logp = plan.double().clamp_min(torch.finfo(plan.dtype).tiny).log().numpy()
    assert _objective(logp, assign) >= _exact_optimum(logp, caps) - 1e-9 * (1 + abs(_exact_optimum(logp, caps)))
    if name == "one_hot":
        assert torch.equal(assign, torch.arange(60) % 4)


def test_rounding_on_adversarial_plans():
    """Plans built so that the greedy pass goes wrong: many rows with a slight preference for a
    small column and a few rows that need it badly; the exchange step must repair it."""
    n, E = 40, 4
    caps = [4, 12, 12, 12]
    plan = torch.full((n, E), 0.2)
    plan[:, 0] = 0.21                     # every row slightly prefers column 0 ...
    plan[:4, 0] = 0.202                   # ... the rows that lose nothing by staying there ...
    plan[4:8, 1:] = 1e-6                  # ... and the rows that lose a lot anywhere else
    assign = round_to_assignment(plan, caps)
    assert _is_capacity_exact(assign, caps)
    assert (assign[4:8] == 0).all()
    logp = plan.double().log().numpy()
    assert abs(_objective(logp, assign) - _exact_optimum(logp, caps)) <= 1e-9
    # An anti-greedy plan: rows sorted so the highest scores sit in the rows that must give way.
    g = torch.Generator().manual_seed(7)
    base = torch.rand(n, E, generator=g)
    anti = torch.softmax(base * 10 + torch.linspace(5, 0, n)[:, None] * (torch.arange(E) == 2), -1)
    assign = round_to_assignment(anti, caps)
    assert _is_capacity_exact(assign, caps)
    logp = anti.double().log().numpy()
    assert _objective(logp, assign) >= _exact_optimum(logp, caps) - 1e-6


def test_rounding_matches_the_exact_optimum_on_small_problems():
    """Against linear_sum_assignment on the expanded matrix (columns repeated capacity times):
    Sinkhorn plans at several temperatures, uneven capacities and raw random plans."""
    g = torch.Generator().manual_seed(0)
    gaps, greedy_gaps = [], []
    for trial in range(60):
        n, E = (48, 4) if trial < 40 else (60, 6)
        caps = uniform_caps(n, E) if trial % 2 else uneven_caps(n, E, trial)
        if trial % 4 == 3:
            plan = torch.distributions.Dirichlet(torch.ones(E)).sample((n,)).double()
        else:
            tau = (1.0, 0.3, 0.1)[trial % 3]
            plan = sinkhorn(torch.randn(n, E, generator=g, dtype=torch.float64), caps, tau)
        logp = plan.clamp_min(1e-300).log().numpy()
        best = _exact_optimum(logp, caps)
        assign = round_to_assignment(plan, caps)
        assert _is_capacity_exact(assign, caps)
        gaps.append((best - _objective(logp, assign)) / abs(best))
        greedy_gaps.append((best - _objective(logp, _greedy_fill(logp, np.asarray(caps)))) / abs(best))
    print(f"\nrounding vs exact optimum on 60 small problems: worst relative gap {max(gaps):.2e} "
          f"(greedy alone: {max(greedy_gaps):.2e})")
    assert max(gaps) <= 0.01                 # the contract's margin
    assert max(gaps) <= 1e-9                 # cycle-cancelling ran to its optimality certificate


def test_cycle_cancelling_reports_optimality_and_respects_the_round_limit():
    logp = sinkhorn(torch.randn(400, 8, dtype=torch.float64), uniform_caps(400, 8), 0.3).log().numpy()
    caps = np.asarray(uniform_caps(400, 8))
    start = _greedy_fill(logp, caps)
    _, optimal = _cancel_cycles(logp, start.copy(), 10000)
    assert optimal
    limited, optimal = _cancel_cycles(logp, start.copy(), 0)
    assert not optimal and np.array_equal(limited, start)


def test_rounding_a_plan_equals_assigning_by_its_scores():
    """log P = scores/tau + f + g and sum_j c_j g_j is fixed, so both objectives pick the same
    optimum (compared by value: ties may pick different but equally good assignments)."""
    scores = torch.randn(200, 5, dtype=torch.float64)
    caps = uneven_caps(200, 5)
    from_plan = round_to_assignment(sinkhorn(scores, caps, 0.2, 2000, 1e-12), caps)
    from_scores = assign_by_score(scores, caps)
    s = scores.numpy()
    assert abs(_objective(s, from_plan) - _objective(s, from_scores)) <= 1e-9


def test_rounding_from_a_start_reaches_the_same_optimum():
    """`start` (the rounding of nearby scores) replaces the greedy proposals: the same assignment as
    from scratch, for small and large moves of the scores, per layer too; a start that is not
    capacity-exact, or of the wrong shape, is refused."""
    g = torch.Generator().manual_seed(3)
    caps = [64] * 16 + [512]
    scores = torch.randn(1536, 17, generator=g, dtype=torch.float64)
    start = assign_by_score(scores, caps)
    for scale in (1e-3, 0.05, 0.5, 5.0):
        moved = scores + scale * torch.randn(1536, 17, generator=g, dtype=torch.float64)
        cold = assign_by_score(moved, caps)
        assert torch.equal(assign_by_score(moved, caps, start=start), cold)
        assert _is_capacity_exact(cold, caps)
    batched = torch.randn(3, 200, 5, generator=g, dtype=torch.float64)
    bcaps = uneven_caps(200, 5)
    starts = assign_by_score(batched, bcaps)
    again = batched + 0.1 * torch.randn(3, 200, 5, generator=g, dtype=torch.float64)
    assert torch.equal(assign_by_score(again, bcaps, start=starts), assign_by_score(again, bcaps))
    # a round limit that leaves the start uncertified: the answer from scratch, not the start
    far = torch.randn(1536, 17, generator=g, dtype=torch.float64)
    assert torch.equal(assign_by_score(far, caps, refine_rounds=0, start=start), assign_by_score(far, caps, 0))
    assert not torch.equal(assign_by_score(far, caps, 0), start)
    bad = start.clone()
    bad[0] = (bad[0] + 1) % 17                       # one column one short, another one over
    with pytest.raises(ValueError, match="start is not capacity-exact"):
        assign_by_score(scores, caps, start=bad)
    with pytest.raises(ValueError, match="start has shape"):
        assign_by_score(scores, caps, start=start[:10])


def test_rounding_large_problem_is_capacity_exact():
    caps = uniform_caps(28672, 64)
    plan = sinkhorn(torch.randn(28672, 64), caps, 0.1)
    assert _is_capacity_exact(round_to_assignment(plan, caps), caps)


# ----------------------------------------------------------------------------- STE

def test_ste_forward_is_exactly_hard_and_backward_is_the_plans():
    scores = torch.randn(2, 50, 4, requires_grad=True)
    caps = [10, 15, 5, 20]
    weight = torch.randn(2, 50, 4)
    plan = sinkhorn(scores, caps, 0.2)
    A, assign = ste_assignment(plan, caps)
    assert torch.equal(A.detach(), one_hot_assignment(assign, 4))
    assert _is_capacity_exact(assign, caps)
    (g_ste,) = torch.autograd.grad((A * weight).sum(), scores, retain_graph=True)
    (g_soft,) = torch.autograd.grad((plan * weight).sum(), scores)
    assert torch.equal(g_ste, g_soft) and g_soft.abs().max() > 0
    # A given assignment is used as is.
    A2, same = ste_assignment(plan, caps, assign=assign)
    assert same is assign and torch.equal(A2.detach(), A.detach())


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("scores,caps,tau,message", [
    (torch.randn(10, 3), [3, 3, 3], 1.0, "sum to"),
    (torch.randn(10, 3), [5, 5], 1.0, "2 entries but scores has 3 columns"),
    (torch.randn(10, 3), [5, 5, 0], 1.0, "positive"),
    (torch.randn(10, 3), [6, 5, -1], 1.0, "positive"),
    (torch.randn(10, 3), [3.5, 3.5, 3], 1.0, "integers"),
    (torch.randn(10, 3), [3, 3, float("nan")], 1.0, "finite"),
    (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), [1, 1], 1.0, "non-finite"),
    (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), [1, 1], 1.0, "non-finite"),
    (torch.randn(10, 3), [3, 3, 4], 0.0, "tau must be a positive"),
    (torch.randn(10, 3), [3, 3, 4], -0.5, "tau must be a positive"),
    (torch.randn(10, 3), [3, 3, 4], float("nan"), "tau must be a positive"),
    (torch.randn(10, 3), [3, 3, 4], float("inf"), "tau must be a positive"),
    (torch.randn(10), [10], 1.0, r"\[n, E\] or \[L, n, E\]"),
    (torch.randint(0, 5, (10, 3)), [3, 3, 4], 1.0, "floating-point"),
    (torch.randn(2, 10, 3), [[3, 3, 4]] * 3, 1.0, "same L"),
])
def test_bad_input_fails_fast_with_a_clear_message(scores, caps, tau, message):
    with pytest.raises(ValueError, match=message):
        sinkhorn(scores, caps, tau)


def test_bad_iteration_arguments_and_rounding_input():
    scores = torch.randn(10, 3)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(scores, [3, 3, 4], n_iters=0)
    with pytest.raises(ValueError, match="tol"):
        sinkhorn(scores, [3, 3, 4], tol=-1.0)
    with pytest.raises(ValueError, match="sum to"):
        round_to_assignment(torch.rand(10, 3), [3, 3, 3])
    with pytest.raises(ValueError, match="negative"):
        round_to_assignment(-torch.rand(10, 3), [3, 3, 4])
    with pytest.raises(ValueError, match="non-finite"):
        assign_by_score(torch.tensor([[float("nan"), 0.0], [1.0, 2.0]]), [1, 1])
    with pytest.raises(ValueError, match="refine_rounds"):
        assign_by_score(scores, [3, 3, 4], refine_rounds=-1)
    with pytest.raises(ValueError, match="assign has shape"):
        ste_assignment(torch.rand(10, 3), [3, 3, 4], assign=torch.zeros(9, dtype=torch.long))
