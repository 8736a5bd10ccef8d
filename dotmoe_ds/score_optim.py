"""The assignment scores' own optimizer: Adam outside the DeepSpeed engine, with its own learning
rate and schedule, a bound on how many neurons may change expert per step, and no share in the
weights' gradient clipping.

Why outside the engine. DeepSpeed's `gradient_clipping` scales every gradient it holds by one
factor min(1, clip / global norm); the norm is dominated by the model weights, so the scores'
updates would follow the weights' clipping. DeepSpeed has no per-group clipping under ZeRO-2/3
(its gradients live in flat partitions inside the engine). So the scores are not DeepSpeed's:
`scores.requires_grad` is False (DeepSpeed neither holds, reduces nor clips them) and each layer
collects their gradient itself (`DotMoEFFN.learn_scores` / `score_grad`, filled in the layer's own
backward, i.e. inside ZeRO-3's gathered window). At each optimizer step:

  1. every rank all-reduces the collected gradients (SUM) and divides by the world size: the mean
     over data-parallel ranks, as DeepSpeed's average would give; with the sharded Sinkhorn each
     rank's gradient is the SUM-of-losses gradient on its own rows and zero elsewhere, so the same
     sum / world gives the replicated result (see sharded_sinkhorn.py). The micro-steps' 1/grad_accum
     is already in the gradient (DeepSpeed scales the loss); a fp16 loss scale is divided out, and a
     non-finite gradient skips the step (as DeepSpeed does);
  2. layer l's owner rank (l mod world) keeps the fp32 master copy and the Adam moments of layer l,
     takes the Adam step at lr = `ScoreSchedule.at(step)`, and, with a flip bound, lets only whole
     cycles of the moves the gradient wants most take it (at most `max_flips` neurons change expert:
     a trust region on the hard assignment, see bounded_step);
  3. the owner writes the new scores into the (ZeRO-3 partitioned or replicated) parameter, which is
     broadcast to every rank.

The flip check (`flip_check`, `--flip_check recon`): the straight-through gradient is a first-order
estimate of what a move does, and a move of a neuron is not small. So each layer's flips of step t
are judged on the batches of step t+1, which have not chosen them: the layer computes its
reconstruction error under the new assignment and under the one before (DotMoEFFN.judged_assignment,
the same forward), the sums are all-reduced, and at step t+1 a layer whose error the flips raised
gets its scores of before step t back (the Adam moments are kept) before step t+1's update. The
last flips before the assignment settles are judged too.

Memory: the gradients are whole on every rank (d_ff x E' fp32 per layer, like the replicated plan);
the master copy and the Adam moments are sharded by layer over the ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import distributed as dist
from .layer import DotMoEFFN
from .sinkhorn import assign_by_score

SCORE_SCHEDULES = ("cosine", "linear", "constant")
BISECTION_STEPS = 12


@dataclass(frozen=True)
class ScoreSchedule:
    """The scores' learning rate per optimizer step: at its peak at step 0 (no warmup: the
    assignment should move while the router and weights are still far from their end), decaying
    (cosine / linear) or constant until `settle_frac` of the steps, then 0 (the partition is fixed
    and the router and weights train on it for the remaining steps)."""

    lr: float
    steps: int
    schedule: str = "cosine"
    settle_frac: float = 0.75

    def __post_init__(self):
        if self.schedule not in SCORE_SCHEDULES:
            raise ValueError(f"schedule must be one of {SCORE_SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.settle_frac <= 1.0:
            raise ValueError(f"settle_frac must be in (0, 1], got {self.settle_frac}")

    @property
    def settle_step(self) -> int:
        """First step with lr 0 (every step moves when settle_frac is 1)."""
        return max(1, math.ceil(self.settle_frac * self.steps))

    def at(self, step: int) -> float:
        if step >= self.settle_step or step < 0:
            return 0.0
        frac = step / self.settle_step
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def count_flips(before: Tensor, after: Tensor) -> int:
    return int((before.reshape(-1) != after.reshape(-1).to(before.device)).sum())


def cycle_moves(old: Tensor, new: Tensor, scores: Tensor, budget: int) -> Tensor:
    """Neurons (indices) whose move from `old` to `new` (two capacity-exact assignments) may be
    made, at most `budget` of them, in whole cycles so that the result stays capacity-exact.

    The moves form a balanced multigraph on the experts (as many neurons leave each expert as
    enter it), so they split into cycles e1 -> e2 -> ... -> e1 of one neuron each; they are built
    greedily from the moves with the largest gain (`scores[j, new[j]] - scores[j, old[j]]`) and
    taken by mean gain while the budget lasts; a cycle whose total gain is not positive is never
    taken."""
    moved = torch.nonzero(old != new).squeeze(1).tolist()
    gain = {j: float(scores[j, new[j]] - scores[j, old[j]]) for j in moved}
    out: dict[int, list[int]] = {}
    for j in sorted(moved, key=lambda j: -gain[j]):
        out.setdefault(int(old[j]), []).append(j)
    cycles = []
    while any(out.values()):
        node = max((e for e in out if out[e]), key=lambda e: gain[out[e][0]])
        path: list[int] = []          # neurons taken, in walk order
        seen = {node: 0}
        while True:
            j = out[node].pop(0)
            path.append(j)
            node = int(new[j])
            if node in seen:
                cut = seen[node]
                for k in reversed(path[:cut]):       # the walk's lead-in is not part of the cycle
                    out[int(old[k])].insert(0, k)
                    out[int(old[k])].sort(key=lambda m: -gain[m])
                cycles.append(path[cut:])
                break
            seen[node] = len(path)
    cycles.sort(key=lambda c: -sum(gain[j] for j in c) / len(c))
    chosen: list[int] = []
    for c in cycles:
        if len(chosen) + len(c) <= budget and sum(gain[j] for j in c) > 0:
            chosen += c
    return torch.tensor(sorted(chosen), dtype=torch.long)


def bounded_step(old: Tensor, delta: Tensor, assign: Tensor, capacities: Sequence[int], max_flips: int,
                 refine_rounds: int, preference: Tensor | None = None) -> tuple[Tensor, float, int]:
    """A step `old + delta * r` (r: a per-row scale in [0, 1]) whose capacity-exact rounding differs
    from `assign` (the rounding of `old`) in at most `max_flips` neurons.

    If the whole step moves more: the rows of whole cycles of the most wanted moves (cycle_moves,
    at most `max_flips` neurons; wanted by `preference`, default the new scores: the ScoreOptimizer
    passes minus the gradient, so that a move's gain is its first-order decrease of the loss) take
    the whole step, every other row the largest common scale (bisection) that keeps the bound. Cycles, not single rows: capacities are exact, and when many
    neurons cross at the same step length (ties, e.g. just after the initialisation) no common
    scale could select some of them. Returns (new scores, mean row scale, flips)."""
    def rounding(scores: Tensor) -> Tensor:
        # every candidate is a few moves from `assign`: start the cycle-cancelling there (same optimum)
        return assign_by_score(scores, capacities, refine_rounds, start=assign)

    new = old + delta
    target = rounding(new)
    flips = count_flips(assign, target)
    if flips <= max_flips:
        return new, 1.0, flips
    rows = torch.zeros(old.shape[0], dtype=old.dtype)
    rows[cycle_moves(assign, target, new if preference is None else preference, max_flips)] = 1.0

    def at(scale: float) -> Tensor:
        return old + delta * torch.clamp(rows, min=scale)[:, None]

    lo_flips = count_flips(assign, rounding(at(0.0)))
    if lo_flips > max_flips:        # the chosen rows displace others too: shorten every row alike
        rows.zero_()
        lo_flips = 0
    lo, hi = 0.0, 1.0
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        f = count_flips(assign, rounding(at(mid)))
        if f <= max_flips:
            lo, lo_flips = mid, f
        else:
            hi = mid
    return at(lo), float(torch.clamp(rows, min=lo).mean()), lo_flips


class ScoreOptimizer:
    """Adam on every layer's scores (see the module docstring). Collective: `step` on every rank."""

    def __init__(self, layers: Sequence[DotMoEFFN], schedule: ScoreSchedule, *, betas=(0.9, 0.95),
                 eps: float = 1e-8, max_flip_frac: float = 0.0, flip_check: bool = False):
        if not 0.0 <= max_flip_frac <= 1.0:
            raise ValueError(f"max_flip_frac must be in [0, 1], got {max_flip_frac}")
        self.layers = list(layers)
        self.schedule = schedule
        self.betas = tuple(float(b) for b in betas)
        self.eps = float(eps)
        self.max_flip_frac = float(max_flip_frac)
        self.flip_check = bool(flip_check)
        if self.flip_check and not all(layer.recon for layer in self.layers):
            raise ValueError("the flip check compares reconstruction errors: the layers need recon on")
        self.t = 0                                   # Adam steps taken
        self.master: dict[int, Tensor] = {}          # owned layers: fp32 scores
        self.exp_avg: dict[int, Tensor] = {}
        self.exp_avg_sq: dict[int, Tensor] = {}
        self.undo: dict[int, Tensor] = {}            # owned layers with flips under judgement: scores before
        for layer in self.layers:
            layer.learn_scores = True
            layer.score_grad = None
            layer.judged_assignment, layer.judge_sums = None, None

    def owned(self) -> list[int]:
        me = dist.rank()
        return [i for i in range(len(self.layers)) if dist.owner_of(i) == me]

    def max_flips(self, layer: DotMoEFFN) -> int | None:
        """Neurons of `layer` allowed to change expert per step (None: no bound)."""
        if self.max_flip_frac <= 0:
            return None
        # at least E': under exact capacities moves come in cycles over the experts, up to E' long
        return max(layer.spec.num_columns, int(self.max_flip_frac * layer.spec.d_ff))

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.score_grad = None

    @torch.no_grad()
    def _mean_grads(self, grad_scale: float) -> list[Tensor] | None:
        grads = []
        for layer in self.layers:
            g = layer.score_grad
            grads.append(torch.zeros(layer.spec.d_ff, layer.spec.num_columns) if g is None else g.detach().float().cpu())
        flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        flat = flat / (dist.world_size() * grad_scale)
        if not bool(torch.isfinite(flat).all()):
            return None
        return list(flat.split([g.numel() for g in grads]))

    @torch.no_grad()
    def judge_flips(self) -> tuple[list[int], list[Tensor]]:
        """The flip check's verdict on the last step's flips (see the module docstring): the layers
        whose flips raised their reconstruction error, with their scores put back, and every layer's
        assignment as it now stands. Collective."""
        pending = [i for i, layer in enumerate(self.layers) if layer.judged_assignment is not None]
        standing = [layer.hard_assignment() for layer in self.layers]
        if not pending:
            return [], standing
        sums = torch.zeros(len(self.layers), 3, dtype=torch.float64)
        for i in pending:
            if self.layers[i].judge_sums is not None:
                sums[i] = self.layers[i].judge_sums.cpu()
        sums = dist.all_reduce_sum(sums)             # every rank: the same sums over the same forwards
        undone = []
        for i in pending:
            layer = self.layers[i]
            now, before, forwards = sums[i].tolist()
            if forwards > 0 and now > before:
                undone.append(i)
                standing[i] = layer.judged_assignment
                owner = dist.owner_of(i)
                with dist.gathered([layer.scores], modifier_rank=owner):
                    if owner == dist.rank():
                        self.master[i] = self.undo[i]
                        layer.scores.copy_(self.master[i].to(layer.scores.device, layer.scores.dtype))
            layer.judged_assignment, layer.judge_sums = None, None
        self.undo.clear()
        return undone, standing

    @torch.no_grad()
    def step(self, step: int, grad_scale: float = 1.0) -> dict[str, float]:
        """One update at optimizer step `step` (0-based, the schedule's clock). Returns what it did:
        lr, skipped (1 on a non-finite gradient), step_scale (mean alpha of the flip bound over the
        layers), grad_norm (of the mean gradient over every layer), undone (layers whose last flips
        the flip check took back)."""
        lr = self.schedule.at(step)
        out = {"lr": lr, "skipped": 0.0, "step_scale": 1.0, "grad_norm": 0.0, "undone": 0.0}
        standing = None
        if self.flip_check:
            undone, standing = self.judge_flips()
            out["undone"] = float(len(undone))
        if lr == 0.0:                               # settled: nothing moves, no communication
            self.zero_grad()
            return out
        grads = self._mean_grads(grad_scale)
        self.zero_grad()
        if grads is None:
            out["skipped"] = 1.0
            return out
        out["grad_norm"] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        owned = set(self.owned())
        alphas = torch.zeros(len(self.layers), dtype=torch.float64)
        flips = torch.zeros(len(self.layers), dtype=torch.float64)   # the flip check's: owners fill them
        for i, layer in enumerate(self.layers):
            owner = dist.owner_of(i)
            with dist.gathered([layer.scores], modifier_rank=owner):
                if i not in owned:
                    continue
                shape = (layer.spec.d_ff, layer.spec.num_columns)
                if i not in self.master:
                    self.master[i] = layer.scores.detach().float().cpu().clone()
                    self.exp_avg[i] = torch.zeros(shape)
                    self.exp_avg_sq[i] = torch.zeros(shape)
                g = grads[i].reshape(shape)
                m, v = self.exp_avg[i], self.exp_avg_sq[i]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                delta = -lr * (m / bc1) / ((v / bc2).sqrt() + self.eps)
                bound = self.max_flips(layer)
                if bound is not None or self.flip_check:
                    # the assignment the step starts from (a flip check may just have put it back)
                    current = (layer.hard_assignment() if standing is None else standing[i]).cpu()
                if self.flip_check:
                    self.undo[i] = self.master[i]
                if bound is None:
                    self.master[i] = self.master[i] + delta
                    alphas[i] = 1.0
                    if self.flip_check:
                        flips[i] = count_flips(current, assign_by_score(self.master[i], layer.spec.column_capacities,
                                                                        layer.refine_rounds, start=current))
                else:
                    self.master[i], alphas[i], flips[i] = bounded_step(
                        self.master[i], delta, current, layer.spec.column_capacities, bound, layer.refine_rounds,
                        preference=-g)
                # copy_ on the parameter (not .data) bumps its version: the layer's rounding cache sees it
                layer.scores.copy_(self.master[i].to(layer.scores.device, layer.scores.dtype))
        out["step_scale"] = float(dist.all_reduce_sum(alphas).mean())
        if self.flip_check:      # the layers that moved are judged on the next step's batches
            flips = dist.all_reduce_sum(flips)
            for i, layer in enumerate(self.layers):
                if flips[i] > 0:
                    layer.judged_assignment = standing[i].clone()
                elif i in self.undo:
                    del self.undo[i]
        return out

    # ------------------------------------------------------------------ checkpoints (per rank)
    def state_dict(self) -> dict:
        # judged: the flips waiting for the next step's verdict (every rank holds every layer's)
        return {"t": self.t, "master": dict(self.master), "exp_avg": dict(self.exp_avg),
                "exp_avg_sq": dict(self.exp_avg_sq), "undo": dict(self.undo),
                "judged": {i: layer.judged_assignment.cpu().clone() for i, layer in enumerate(self.layers)
                           if layer.judged_assignment is not None}}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.t = int(state["t"])
        self.master = {int(k): v.float().clone() for k, v in state["master"].items()}
        self.exp_avg = {int(k): v.float().clone() for k, v in state["exp_avg"].items()}
        self.exp_avg_sq = {int(k): v.float().clone() for k, v in state["exp_avg_sq"].items()}
        self.undo = {int(k): v.float().clone() for k, v in state.get("undo", {}).items()}
        judged = state.get("judged", {})
        for i, layer in enumerate(self.layers):
            layer.judged_assignment = judged[i].clone() if i in judged else None
            layer.judge_sums = None
