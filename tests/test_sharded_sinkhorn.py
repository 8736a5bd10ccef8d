"""Row-sharded Sinkhorn over real gloo process groups (2 and 4 CPU ranks) against one process.

Ranks are forked from the test process (no re-import of torch: a few hundred ms per launch) and
meet through a FileStore in a temporary folder; each runs one thread. The references are computed
in the test process with the pure `sinkhorn`.
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import queue
import tempfile
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dotmoe_ds.layer import DotMoEFFN, set_plan_fn
from dotmoe_ds.sharded_sinkhorn import (ShardedPlan, assign_layers_by_owner, broadcast_from_owners, layer_owner,
                                        row_bounds, select_plan_fn, sharded_sinkhorn)
from dotmoe_ds.sinkhorn import assign_by_score, round_to_assignment, sinkhorn
from dotmoe_ds.spec import MoESpec

LAUNCH_TIMEOUT_S = 120


# ----------------------------------------------------------------------------- launcher

def _numpy_tree(obj):
    """Tensors to numpy arrays: plain pickling through the queue, no shared-memory handles that
    would need the (exiting) child alive."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: _numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_numpy_tree(v) for v in obj)
    return obj


def _torch_tree(obj):
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _torch_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_torch_tree(v) for v in obj)
    return obj


def _rank_main(fn, rank, world, store, results, args):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            out = fn(rank, world, *args)
            # A rank that ran no collective could otherwise tear its gloo mesh down while a slower
            # rank is still connecting to it ("connectFullMesh failed ... Connection closed by peer").
            dist.barrier()
        finally:
            dist.destroy_process_group()
        results.put((rank, None, _numpy_tree(out)))
    except BaseException:   # reported by the parent
        results.put((rank, traceback.format_exc(), None))


def run_ranks(fn, world: int, *args):
    """`fn(rank, world, *args)` on `world` forked gloo ranks; their return values in rank order."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world, os.path.join(tmp, "store"), results, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        out, errors = {}, []
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            while len(out) + len(errors) < world and time.monotonic() < deadline:
                try:
                    rank, err, value = results.get(timeout=0.2)
                except queue.Empty:
                    # A rank that died in C++ (gloo aborts on mismatched collectives) reports nothing.
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead:
                        errors.append(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                        break
                    continue
                if err is not None:
                    errors.append(f"rank {rank}:\n{err}")
                    # Its partners may be blocked in a collective: give them a moment.
                    deadline = min(deadline, time.monotonic() + 10)
                else:
                    out[rank] = value
            if len(out) + len(errors) < world and not errors:
                errors.append(f"ranks {sorted(set(range(world)) - set(out))} gave no result in "
                              f"{LAUNCH_TIMEOUT_S} s")
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
    assert not errors, "\n".join(errors)
    return [_torch_tree(out[r]) for r in range(world)]


# ----------------------------------------------------------------------------- problems

def uneven_caps(n: int, E: int) -> list[int]:
    """Capacities of different sizes summing to n."""
    w = torch.arange(1, E + 1, dtype=torch.float64)
    caps = (w / w.sum() * n).floor().long()
    caps[-1] += n - caps.sum()
    return caps.tolist()


def problem(L, n, E, dtype, seed=0, ranks=1):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(L, n, E, generator=gen, dtype=torch.float64) * 2).to(dtype)
    # One upstream gradient per rank: each rank's own micro-batch.
    weights = torch.randn(ranks, L, n, E, generator=gen, dtype=torch.float64).to(dtype)
    return scores, uneven_caps(n, E), weights


def reference(scores, caps, weights, tau, n_iters, tol):
    """Single process: the plan and the gradient of the MEAN of the ranks' losses."""
    full = scores.clone().requires_grad_()
    plan = sinkhorn(full, caps, tau, n_iters, tol)
    loss = torch.stack([(plan * w).sum() for w in weights]).mean()
    (grad,) = torch.autograd.grad(loss, full)
    return plan.detach(), grad


def _sharded_rank(rank, world, L, n, E, dtype, tau, n_iters, tol, squeeze, local_rows):
    scores, caps, weights = problem(L, n, E, dtype, ranks=world)
    if squeeze:
        scores, weights = scores[0], weights[:, 0]
    lo, hi = row_bounds(n, world)[rank]
    mine = scores[..., lo:hi, :] if local_rows else scores
    theta = mine.clone().requires_grad_()
    plan = sharded_sinkhorn(theta, caps, tau, n_iters, tol, local_rows=local_rows)
    loss = (plan * weights[rank]).sum()          # this rank's own upstream gradient
    loss.backward()
    out = {"plan": plan.detach(), "own": theta.grad.clone(), "bounds": (lo, hi)}
    if not local_rows:
        # What DeepSpeed does to a replicated parameter's gradient: average over the data-parallel ranks.
        out["averaged"] = theta.grad.clone()
        dist.all_reduce(out["averaged"])
        out["averaged"] /= world
    return out


# ----------------------------------------------------------------------------- fast checks

def test_row_bounds_cover_contiguously_and_unevenly():
    for n, world in ((8, 2), (101, 4), (28672, 64), (5, 5), (7, 3)):
        bounds = row_bounds(n, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [hi - lo for lo, hi in row_bounds(101, 4)] == [26, 25, 25, 25]
    with pytest.raises(ValueError, match="at least one row"):
        row_bounds(3, 4)
    assert [layer_owner(l, 3) for l in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_without_a_process_group_it_is_the_replicated_sinkhorn():
    """World of one: exactly `sinkhorn`, plan and gradient; the switch picks the replicated path."""
    assert not dist.is_initialized()
    scores, caps, weights = problem(2, 40, 5, torch.float32)
    plan_ref, grad_ref = reference(scores, caps, weights, 0.3, 100, None)
    theta = scores.clone().requires_grad_()
    plan = sharded_sinkhorn(theta, caps, 0.3, 100, None)
    (plan * weights[0]).sum().backward()
    assert torch.equal(plan.detach(), plan_ref) and torch.equal(theta.grad, grad_ref)
    fn, msg = select_plan_fn("auto", d_ff=40)
    assert fn is None and "replicated" in msg
    # The layer's hook: a ShardedPlan in a world of one is the default plan; layers deep-copy.
    spec = MoESpec.custom(50, [10, 12, 8, 10], top_k=2, shared=10)
    plain, hooked = _make_layer(spec), _make_layer(spec)
    set_plan_fn(nn.ModuleList([hooked]), ShardedPlan())
    assert plain.plan_fn is None and isinstance(copy.deepcopy(hooked).plan_fn, ShardedPlan)
    assert torch.equal(hooked.plan(), plain.plan())
    with pytest.raises(ValueError, match="sinkhorn mode"):
        select_plan_fn("sideways")


# ----------------------------------------------------------------------------- multi-process checks

# fp32 gradients: sinkhorn's implicit backward feeds torch.linalg.eigh a Laplacian built from the
# fp32 matrix W = P^T diag(1/a) P, which is not exactly symmetric; eigh reads one triangle, so the
# gauge direction 1 is not dropped exactly and lam_g picks up a large constant that cancels only to
# fp32 precision. How large depends on rounding, so sharded and single-process gradients can differ
# by a few 1e-6 on cold problems (2e-6 measured on the tau=0.5 case below; 1.5e-5 relative on
# [2, 8192, 32] at tau=0.1 over 2 ranks). Symmetrising W and centring lam_g in sinkhorn.py brings
# both to <= 4e-7 here (reported to the lead; tighten the tau=0.5 tolerance to 1e-6 then). The
# tau=1 cases meet the 1e-6 of DESIGN.md contract 3 as it is; float64 shows exactness (<= 1e-10).
CASES = [  # world, L, n, E, dtype, tau, n_iters, tol, plan and gradient tolerance
    pytest.param(2, 3, 101, 6, torch.float32, 1.0, 100, None, 1e-6, id="2ranks-uneven-fp32"),
    pytest.param(4, 3, 100, 6, torch.float32, 1.0, 60, None, 1e-6, id="4ranks-even-fp32"),
    pytest.param(2, 3, 101, 6, torch.float32, 0.5, 100, None, 1e-6, id="2ranks-uneven-fp32-tau0.5"),
    pytest.param(4, 2, 103, 7, torch.float64, 0.05, 150, None, 1e-10, id="4ranks-uneven-f64-cold"),
    pytest.param(2, 2, 90, 5, torch.float64, 0.05, 2000, 1e-9, 1e-10, id="2ranks-even-f64-cold-early-stop"),
]


@pytest.mark.parametrize("world, L, n, E, dtype, tau, n_iters, tol, atol", CASES)
def test_sharded_equals_one_process_plan_assignment_and_mean_loss_gradient(world, L, n, E, dtype, tau, n_iters, tol,
                                                                          atol):
    """Every rank has a different upstream gradient (its own micro-batch). The sharded plan equals the
    single-process plan on every rank; the rounding of it is the same; each rank's gradient lives on
    its own rows only, and averaging over ranks (DeepSpeed's data-parallel reduction) gives the
    single-process gradient of the mean loss."""
    scores, caps, weights = problem(L, n, E, dtype, ranks=world)
    plan_ref, grad_ref = reference(scores, caps, weights, tau, n_iters, tol)
    plan_tol, grad_tol = min(atol, 1e-6), atol
    outs = run_ranks(_sharded_rank, world, L, n, E, dtype, tau, n_iters, tol, False, False)
    assert grad_ref.abs().max() > 1e-2          # a real gradient, not zeros compared with zeros
    hard_ref = round_to_assignment(plan_ref, caps)
    for out in outs:
        assert out["plan"].dtype == dtype and out["plan"].shape == (L, n, E)
        assert (out["plan"] - plan_ref).abs().max().item() <= plan_tol
        assert torch.equal(round_to_assignment(out["plan"], caps), hard_ref)
        lo, hi = out["bounds"]
        outside = torch.ones(n, dtype=torch.bool)
        outside[lo:hi] = False
        assert torch.count_nonzero(out["own"][:, outside]) == 0
        assert (out["averaged"] - grad_ref).abs().max().item() <= grad_tol
    # The owners' rows together are the SUM-of-losses gradient, i.e. R times the mean's.
    summed = torch.cat([o["own"][:, o["bounds"][0]:o["bounds"][1]] for o in outs], dim=1)
    assert (summed - world * grad_ref).abs().max().item() <= world * grad_tol


@pytest.mark.parametrize("world, n", [(2, 61), (4, 64)])
def test_two_dimensional_and_local_row_inputs(world, n):
    """[n, E] scores; and scores given as each rank's own row block (`local_rows=True`)."""
    E, tau, n_iters = 5, 0.4, 60
    scores, caps, weights = problem(1, n, E, torch.float64, ranks=world)
    plan_ref, grad_ref = reference(scores[0], caps, weights[:, 0], tau, n_iters, None)
    for local in (False, True):
        outs = run_ranks(_sharded_rank, world, 1, n, E, torch.float64, tau, n_iters, None, True, local)
        for out in outs:
            assert out["plan"].shape == (n, E)
            assert (out["plan"] - plan_ref).abs().max().item() <= 1e-12
        if local:   # each rank's gradient is that of its block: the sum-of-losses gradient there
            own = torch.cat([o["own"] for o in outs], dim=0)
        else:
            own = sum(o["own"] for o in outs)
        assert (own / world - grad_ref).abs().max().item() <= 1e-12


def _layer_rank(rank, world, spec, xs, weights, sharded):
    layer = _make_layer(spec)
    if sharded:
        set_plan_fn(nn.ModuleList([layer]), ShardedPlan())
    layer.train()
    y = layer(xs[rank])
    (y * weights[rank]).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    for g in grads.values():                 # DeepSpeed's data-parallel average
        dist.all_reduce(g)
        g /= world
    return {"y": y.detach(), "assign": layer.last_assignment, "grads": grads, "plan_fn": repr(layer.plan_fn)}


def _make_layer(spec: MoESpec) -> DotMoEFFN:
    gen = torch.Generator().manual_seed(3)
    d = 12
    lin = lambda i, o: nn.Linear(i, o, bias=False)   # noqa: E731
    gate, up, down = lin(d, spec.d_ff), lin(d, spec.d_ff), lin(spec.d_ff, d)
    with torch.no_grad():
        for m in (gate, up, down):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
    layer = DotMoEFFN(gate, up, down, nn.SiLU(), spec, router_weight=torch.randn(spec.num_experts, d, generator=gen),
                      tau=1.0, sinkhorn_iters=100, sinkhorn_tol=None, mode="ste")
    with torch.no_grad():
        layer.scores.copy_(torch.randn(layer.scores.shape, generator=gen))
    return layer


@pytest.mark.parametrize("world", [2, 4])
def test_layer_with_sharded_plan_trains_like_one_process(world):
    """DotMoEFFN with `ShardedPlan` (d_ff = 50, uneven over 4 ranks, shared expert): each rank's own
    tokens give the same output as one process, and the averaged gradients equal the one-process
    gradients of the mean loss, for Theta as for the replicated weights."""
    spec = MoESpec.custom(50, [10, 12, 8, 10], top_k=2, shared=10)
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(world, 3, 7, 12, generator=gen)
    weights = torch.randn(world, 3, 7, 12, generator=gen)
    outs = run_ranks(_layer_rank, world, spec, xs, weights, True)
    layer = _make_layer(spec)
    layer.train()
    loss = 0
    for r in range(world):
        y = layer(xs[r])
        assert (outs[r]["y"] - y).abs().max().item() <= 1e-6
        assert torch.equal(outs[r]["assign"], layer.last_assignment)
        assert outs[r]["plan_fn"] == f"ShardedPlan(ranks={world})"
        loss = loss + (y * weights[r]).sum() / world
    loss.backward()
    assert layer.scores.grad.abs().max() > 1e-3
    for name, p in layer.named_parameters():
        if p.grad is None:
            continue
        for out in outs:
            assert (out["grads"][name] - p.grad).abs().max().item() <= 1e-6, name


def _layer_parallel_rank(rank, world, scores, caps):
    assigned = assign_layers_by_owner(scores, caps)
    # broadcast_from_owners on its own: the owner's values win, whatever the others hold.
    mine = [torch.full((3,), float(rank)) for _ in range(5)]
    got = broadcast_from_owners(mine)
    return {"assigned": torch.stack(assigned), "got": torch.stack(got)}


@pytest.mark.parametrize("world", [2, 3])
def test_layer_parallel_rounding_equals_one_process(world):
    L, n, E = 5, 80, 6
    scores, caps, _ = problem(L, n, E, torch.float32)
    expected = assign_by_score(scores, caps)
    outs = run_ranks(_layer_parallel_rank, world, scores, caps)
    owners = torch.tensor([float(layer_owner(l, world)) for l in range(5)])
    for out in outs:
        assert torch.equal(out["assigned"], expected)
        assert torch.equal(out["got"], owners[:, None].expand(5, 3))


def _mismatch_rank(rank, world):
    scores = torch.randn(2, 40 + rank, 4)
    try:
        sharded_sinkhorn(scores, [10, 10, 10, 10 + rank], 0.5)
    except ValueError as err:
        return str(err)
    return "no error"


def test_ranks_with_different_shapes_fail_with_a_clear_error_instead_of_hanging():
    outs = run_ranks(_mismatch_rank, 2)
    assert all("disagree on the shape of scores" in msg for msg in outs), outs


def _switch_rank(rank, world):
    fn, msg = select_plan_fn("auto", d_ff=101)
    fn_rep, msg_rep = select_plan_fn("replicated")
    return {"fn": repr(fn), "msg": msg, "rep": fn_rep is None, "msg_rep": msg_rep}


def test_switch_defaults_to_sharded_on_more_than_one_rank():
    out = run_ranks(_switch_rank, 4)[0]
    assert out["fn"] == "ShardedPlan(ranks=4)"
    assert out["msg"] == ("Sinkhorn: sharded over 4 ranks (auto, 25-26 of 101 rows per rank; column sums "
                          "all-reduced, plan all-gathered)")
    assert out["rep"] and "replicated (requested" in out["msg_rep"]


# ----------------------------------------------------------------------------- under DeepSpeed

class _Net(nn.Module):
    def __init__(self, ffn: DotMoEFFN):
        super().__init__()
        self.ffn = ffn

    def forward(self, x):
        return self.ffn(x)


def _deepspeed_rank(rank, world, spec, xs, weights, stage, grad_accum):
    """One DeepSpeed ZeRO data-parallel step with SGD at lr 1: every rank runs `grad_accum`
    micro-batches of its own; returns each parameter's update (= minus the reduced gradient)."""
    import deepspeed
    import deepspeed.comm.torch as ds_comm
    from deepspeed.utils import set_z3_leaf_modules

    ds_comm.build_shm_op = lambda: None          # the CPU shm op only serves inference; compiling it takes ~1 min
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    layer = _make_layer(spec)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    layer.plan_fn = ShardedPlan()
    model = _Net(layer)
    if stage == 3:
        set_z3_leaf_modules(model, [DotMoEFFN])   # as the trainer does
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": grad_accum,
              "train_batch_size": world * grad_accum, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    for m in range(grad_accum):
        # The input requires grad as inside a model (hidden states of earlier trainable layers);
        # ZeRO-3 re-gathers a leaf module's weights for backward through that path.
        y = engine(xs[rank, m].clone().requires_grad_())
        engine.backward((y * weights[rank, m]).sum())
        engine.step()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name.removeprefix("ffn."): before[name.removeprefix("ffn.")] - p.detach().clone()
                for name, p in params.items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_data_parallel_update_is_that_of_the_mean_loss(stage):
    """Real DeepSpeed (ZeRO 2 and 3, 2 gloo ranks, 2 accumulation steps, SGD lr 1): the update
    DeepSpeed applies to Theta with the sharded Sinkhorn is minus one process's gradient of the mean
    loss over all 4 micro-batches, exactly as for the replicated router and MLP weights."""
    world, grad_accum = 2, 2
    spec = MoESpec.custom(50, [10, 12, 8, 10], top_k=2, shared=10)
    gen = torch.Generator().manual_seed(7)
    xs = torch.randn(world, grad_accum, 3, 5, 12, generator=gen)
    weights = torch.randn(world, grad_accum, 3, 5, 12, generator=gen)
    outs = run_ranks(_deepspeed_rank, world, spec, xs, weights, stage, grad_accum)
    layer = _make_layer(spec)
    layer.train()
    loss = sum((layer(xs[r, m]) * weights[r, m]).sum() for r in range(world) for m in range(grad_accum))
    (loss / (world * grad_accum)).backward()
    assert layer.scores.grad.abs().max() > 1e-3
    for name, p in layer.named_parameters():
        for out in outs:
            assert (out[name] - p.grad).abs().max().item() <= 2e-6, name
