"""The scores' own optimizer (score_optim.py): its schedule, the flip bound, and that it learns a
known better partition under a loss that rewards it (and reaches that loss's optimum)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dotmoe_ds.layer import DotMoEFFN
from dotmoe_ds.score_optim import ScoreOptimizer, ScoreSchedule, bounded_step, count_flips, cycle_moves
from dotmoe_ds.sinkhorn import assign_by_score
from dotmoe_ds.spec import MoESpec

E, PER, D = 4, 4, 16       # 4 experts of 4 neurons; hidden size 16
D_FF = E * PER


def test_schedule_peaks_at_step_zero_and_settles():
    s = ScoreSchedule(lr=0.5, steps=20, schedule="cosine", settle_frac=0.5)
    assert s.settle_step == 10
    lrs = [s.at(i) for i in range(20)]
    assert lrs[0] == 0.5 and all(a > b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[5] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(lr == 0.0 for lr in lrs[10:])
    lin = ScoreSchedule(lr=1.0, steps=10, schedule="linear", settle_frac=1.0)
    assert [lin.at(i) for i in (0, 5, 9, 10)] == pytest.approx([1.0, 0.5, 0.1, 0.0])
    const = ScoreSchedule(lr=0.3, steps=8, schedule="constant", settle_frac=0.75)
    assert [const.at(i) for i in range(8)] == [0.3] * 6 + [0.0] * 2
    with pytest.raises(ValueError):
        ScoreSchedule(lr=1.0, steps=10, settle_frac=0.0)
    with pytest.raises(ValueError):
        ScoreSchedule(lr=1.0, steps=10, schedule="step")


def test_bounded_step_moves_at_most_the_bound():
    torch.manual_seed(0)
    caps = [8, 8, 8, 8]
    old = 3.0 * F.one_hot(torch.arange(32) % 4, 4).float()
    delta = 6.0 * torch.randn(32, 4)
    assign = assign_by_score(old, caps)
    full = count_flips(assign, assign_by_score(old + delta, caps))
    assert full > 6
    new, scale, flips = bounded_step(old, delta, assign, caps, max_flips=6, refine_rounds=8)
    assert 0.0 < scale < 1.0 and 0 < flips <= 6
    assert flips == count_flips(assign, assign_by_score(new, caps))
    # every row moved along its own delta by a factor in [0, 1]
    r = ((new - old) * delta).sum(1) / delta.pow(2).sum(1)
    torch.testing.assert_close(new, old + r[:, None] * delta)
    assert r.min() >= 0 and r.max() <= 1 + 1e-6 and r.mean().item() == pytest.approx(scale)
    # within the bound: the whole step
    new, alpha, flips = bounded_step(old, delta, assign, caps, max_flips=32, refine_rounds=8)
    assert alpha == 1.0 and flips == full


def test_cycle_moves_keep_capacities_and_the_budget():
    torch.manual_seed(1)
    caps = [6, 6, 6, 6]
    for trial in range(20):
        old = assign_by_score(torch.randn(24, 4), caps)
        scores = torch.randn(24, 4)
        new = assign_by_score(scores, caps)
        for budget in (2, 3, 5, 24):
            chosen = cycle_moves(old, new, scores, budget)
            assert len(chosen) <= budget and bool((old[chosen] != new[chosen]).all())
            part = old.clone()
            part[chosen] = new[chosen]
            assert torch.bincount(part, minlength=4).tolist() == caps
        # with the whole budget, every move is made
        assert len(cycle_moves(old, new, scores, 24)) == count_flips(old, new)


def _grouped_layer(target: torch.Tensor, start: torch.Tensor) -> DotMoEFFN:
    """A SwiGLU layer whose neuron j fires only on tokens of type target[j] (token type t is
    3 * e_t), with orthogonal down-projection columns, and a fixed router sending type t to expert t
    (k = 1, gate 1). Its reconstruction error is 0 exactly when every neuron sits in expert
    target[j]: the known best partition, and the unique optimum of the loss."""
    gate = torch.nn.Linear(D, D_FF, bias=False)
    up = torch.nn.Linear(D, D_FF, bias=False)
    down = torch.nn.Linear(D_FF, D, bias=False)
    router = torch.zeros(E, D)
    router[:, :E] = 5.0 * torch.eye(E)
    with torch.no_grad():
        gate.weight.copy_(2.0 * F.one_hot(target, D).float())
        up.weight.copy_(F.one_hot(target, D).float())
        down.weight.copy_(torch.eye(D_FF)[:D] if D == D_FF else torch.eye(D, D_FF))
    layer = DotMoEFFN(gate, up, down, F.silu, MoESpec.uniform(D_FF, E, top_k=1), init_assignment=start,
                      router_weight=router, beta=1.0, tau=1.0, mode="ste")
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.recon = True
    return layer.train()


def _tokens():
    types = torch.arange(E).repeat(8)
    return 3.0 * F.one_hot(types, D).float()


def _train(layer, steps, max_flip_frac=0.0, lr=0.2):
    opt = ScoreOptimizer([layer], ScoreSchedule(lr=lr, steps=steps, schedule="cosine", settle_frac=0.8),
                         max_flip_frac=max_flip_frac)
    x = _tokens()
    flips, losses = [], []
    for step in range(steps):
        layer(x)
        losses.append(layer.last_recon.item())
        layer.last_recon.backward()
        before = layer.hard_assignment().clone()
        opt.step(step)
        flips.append(count_flips(before, layer.hard_assignment()))
    with torch.no_grad():
        layer.mode = "hard"
        y, dense = layer(x), layer.down_proj(layer.act_fn(layer.gate_proj(x)) * layer.up_proj(x))
    return flips, losses, float(((y - dense) ** 2).sum() / (dense ** 2).sum())


def _target_and_start():
    g = torch.Generator().manual_seed(0)
    target = (torch.arange(D_FF) % E)[torch.randperm(D_FF, generator=g)]
    start = (torch.arange(D_FF) % E)[torch.randperm(D_FF, generator=g)]
    return target, start


def test_scores_optimizer_learns_the_known_best_partition():
    target, start = _target_and_start()
    layer = _grouped_layer(target, start)
    assert count_flips(layer.hard_assignment(), target) >= D_FF // 2      # starts far from it
    flips, losses, final = _train(layer, steps=60)
    assert sum(flips) > 0                                                 # the assignment moved
    assert torch.equal(layer.hard_assignment(), target)                   # to the best partition
    assert final < 1e-12 and losses[0] > 0.3                              # the loss's optimum (0)
    assert flips[-12:] == [0] * 12                                        # settled (lr 0 from 80%)
    # the scores were DeepSpeed-free: no .grad, the collected gradient is consumed by each step
    assert layer.scores.grad is None and layer.score_grad is None


def test_flip_bound_holds_every_step_and_still_reaches_the_optimum():
    target, start = _target_and_start()
    layer = _grouped_layer(target, start)
    opt = ScoreOptimizer([layer], ScoreSchedule(lr=0.1, steps=1), max_flip_frac=1 / D_FF)
    assert opt.max_flips(layer) == E      # never below E': a cycle over every expert must fit
    flips, _, final = _train(layer, steps=80, max_flip_frac=E / D_FF)   # at most 4 neurons a step
    assert max(flips) <= E and sum(flips) >= count_flips(start, target)
    assert torch.equal(layer.hard_assignment(), target) and final < 1e-12


def test_state_dict_round_trip_continues_identically():
    target, start = _target_and_start()
    a, b = _grouped_layer(target, start), _grouped_layer(target, start)
    sched = ScoreSchedule(lr=0.2, steps=10)
    opt_a = ScoreOptimizer([a], sched)
    x = _tokens()
    for step in range(3):
        a(x)
        a.last_recon.backward()
        opt_a.step(step)
    with torch.no_grad():
        b.scores.copy_(a.scores)
    opt_b = ScoreOptimizer([b], sched)
    opt_b.load_state_dict(opt_a.state_dict())
    for step in range(3, 6):
        for layer, opt in ((a, opt_a), (b, opt_b)):
            layer(x)
            layer.last_recon.backward()
            opt.step(step)
    assert torch.equal(a.scores, b.scores)


# ---------------------------------------------------------------------- the flip check

def _hard_recon(layer, x, assign):
    """The layer's relative reconstruction error with `assign` as its hard assignment, computed apart."""
    with torch.no_grad():
        h = layer.act_fn(layer.gate_proj(x)) * layer.up_proj(x)
        probs = torch.softmax(layer.router(x), -1)
        top_p, top_i = probs.topk(layer.spec.top_k, -1)
        g = torch.zeros_like(probs).scatter(-1, top_i, layer.spec.top_k * top_p / top_p.sum(-1, keepdim=True))
        y, dense = layer.down_proj(h * g[:, assign]), layer.down_proj(h)
        return float((((y - dense) ** 2).sum(-1) / (dense ** 2).sum(-1)).mean())


def test_layer_judges_the_same_forward_under_the_judged_assignment():
    target, start = _target_and_start()
    layer = _grouped_layer(target, start)
    x = _tokens()
    layer.judged_assignment = target
    for _ in range(2):                                   # sums over the forwards of a step
        layer(x)
    now, before, forwards = layer.judge_sums.tolist()
    assert forwards == 2
    assert now == pytest.approx(2 * _hard_recon(layer, x, start), rel=1e-5) and now > 0.3
    assert before == pytest.approx(2 * _hard_recon(layer, x, target), abs=1e-9)   # the optimum: 0
    layer.judged_assignment, layer.judge_sums = None, None
    layer(x)
    assert layer.judge_sums is None                      # nothing under judgement: no extra work


def test_flip_check_takes_back_flips_that_raised_the_error_and_keeps_the_others():
    target, _ = _target_and_start()
    layer = _grouped_layer(target, target)               # starts at the optimum (error 0)
    opt = ScoreOptimizer([layer], ScoreSchedule(lr=0.8, steps=10, schedule="constant", settle_frac=1.0),
                         flip_check=True)
    scores_before = layer.scores.detach().clone()
    # a gradient that asks every neuron to move one expert on: its flips can only raise the error
    away = (target + 1) % E
    layer.score_grad = F.one_hot(target, E).float() - F.one_hot(away, E).float()
    opt.step(0)
    moved = layer.hard_assignment().clone()
    assert count_flips(target, moved) > 0 and torch.equal(layer.judged_assignment, target)
    layer(_tokens())                                     # the next step's forward measures both
    undone, standing = opt.judge_flips()
    assert undone == [0] and torch.equal(standing[0], target)
    assert torch.equal(layer.scores, scores_before) and torch.equal(layer.hard_assignment(), target)
    assert layer.judged_assignment is None and layer.judge_sums is None
    # from a start away from the optimum, the recon gradient's own flips lower the error: all kept
    _, start = _target_and_start()
    layer = _grouped_layer(target, start)
    opt = ScoreOptimizer([layer], ScoreSchedule(lr=0.5, steps=10, schedule="constant", settle_frac=1.0),
                         flip_check=True)
    x, kept = _tokens(), 0
    for step in range(6):
        layer(x)
        layer.last_recon.backward()
        out = opt.step(step)
        kept += out["undone"] == 0
    assert kept >= 5 and _hard_recon(layer, x, layer.hard_assignment()) < _hard_recon(layer, x, start)


def test_flip_check_still_reaches_the_known_best_partition():
    target, start = _target_and_start()
    layer = _grouped_layer(target, start)
    opt = ScoreOptimizer([layer], ScoreSchedule(lr=0.2, steps=60, settle_frac=0.8), flip_check=True)
    x, errors = _tokens(), []
    for step in range(60):
        layer(x)
        errors.append(layer.last_recon.item())
        layer.last_recon.backward()
        opt.step(step)
    assert torch.equal(layer.hard_assignment(), target) and errors[-1] < 1e-12
    assert layer.judged_assignment is None               # the last flips were judged before it settled


def test_flip_check_needs_the_reconstruction_error():
    target, start = _target_and_start()
    layer = _grouped_layer(target, start)
    layer.recon = False
    with pytest.raises(ValueError, match="recon"):
        ScoreOptimizer([layer], ScoreSchedule(lr=0.1, steps=1), flip_check=True)


def test_state_dict_keeps_the_flips_under_judgement():
    target, start = _target_and_start()
    a, b = _grouped_layer(target, start), _grouped_layer(target, start)
    sched = ScoreSchedule(lr=0.3, steps=12, settle_frac=1.0)
    opt_a = ScoreOptimizer([a], sched, flip_check=True)
    x, step = _tokens(), 0
    while a.judged_assignment is None:                   # until a checkpoint would hold flips to judge
        a(x)
        a.last_recon.backward()
        opt_a.step(step)
        step += 1
    assert step < 6
    with torch.no_grad():
        b.scores.copy_(a.scores)
    opt_b = ScoreOptimizer([b], sched, flip_check=True)
    opt_b.load_state_dict(opt_a.state_dict())
    assert torch.equal(b.judged_assignment, a.judged_assignment)
    for step in range(step, step + 4):
        for layer, opt in ((a, opt_a), (b, opt_b)):
            layer(x)
            layer.last_recon.backward()
            opt.step(step)
    assert torch.equal(a.scores, b.scores)
