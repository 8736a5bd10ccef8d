"""Benchmark our Sinkhorn (dotmoe_ds/sinkhorn.py) against POT's log-domain Sinkhorn, side by side.

    .venv/bin/python tools/bench_sinkhorn.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python tools/bench_sinkhorn.py --quick    # small subset (well under a minute)
    .venv/bin/python tools/bench_sinkhorn.py --distributed   # replicated vs row-sharded over 1, 2, 4 ranks
    python tools/bench_sinkhorn.py --device cuda --sections forward   # on a GPU: ours vs POT's torch backend

Sections (issue 2, "Benchmark"):
  1. forward: the same problems (scores ~ N(0, 1), uniform capacities, tau) solved by ours
     (batched over layers) and by `ot.bregman.sinkhorn_log` (looped over layers: POT does not
     batch), with its numpy backend and with its torch backend, the same number of iterations
     and no early stop; time, speed-up and the largest plan difference.
  2. backward memory at --mem-iters iterations against the forward's (peak heap bytes) and the
     bytes saved for backward, with a plain unrolled-autograd Sinkhorn for contrast.
  3. rounding: time of `round_to_assignment` on the largest shape and whether cycle-cancelling
     certified the assignment optimal.

Timings are CPU seconds of this process (time.process_time), best of --repeats, with torch on
--threads threads (default 1: POT's numpy backend is single-threaded too, and CPU time stays
meaningful on a busy machine); wall-clock speed-ups are printed next to them.

--distributed (issue 5) runs only its own section: one forward + backward of the batched Sinkhorn on
[L=8, 28672, 64] in each of --dist-worlds gloo process groups (ranks forked from this process),
replicated (every rank the whole plan, as today) against `sharded_sinkhorn` (rows split over the
ranks), side by side: per-rank wall and CPU seconds and peak heap above the level before the step.

Adding a single-process mode: write another function with the signature of `solve_ours`
(scores [L, n, E], capacities, tau, iters) -> plan and add it to `solvers()`; the table picks it up.
"""
from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import queue
import sys
import tempfile
import traceback
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dotmoe_ds.sharded_sinkhorn import sharded_sinkhorn  # noqa: E402
from dotmoe_ds.sinkhorn import (_cancel_cycles, _greedy_fill, assign_by_score, marginal_error,  # noqa: E402
                                round_to_assignment, sinkhorn)

FULL_SHAPES = [(1, 1536, 8), (1, 8192, 16), (1, 14336, 32), (1, 28672, 64), (32, 8192, 16)]
QUICK_SHAPES = [(1, 1536, 8), (1, 8192, 16), (4, 8192, 16)]


@dataclass
class Problem:
    scores: torch.Tensor          # [L, n, E]
    capacities: list[int]
    tau: float
    iters: int

    @property
    def label(self) -> str:
        L, n, E = self.scores.shape
        return f"[{n}, {E}]" if L == 1 else f"[{L}, {n}, {E}]"


def uniform_capacities(n: int, E: int) -> list[int]:
    return [n // E + (1 if e < n % E else 0) for e in range(E)]


# ----------------------------------------------------------------------------- solvers

def solve_ours(p: Problem) -> torch.Tensor:
    return sinkhorn(p.scores, p.capacities, p.tau, n_iters=p.iters, tol=None)


def solve_pot_numpy(p: Problem) -> torch.Tensor:
    import ot
    dtype = torch_to_numpy_dtype(p.scores.dtype)
    a = np.ones(p.scores.shape[1], dtype=dtype)
    b = np.asarray(p.capacities, dtype=dtype)
    plans = [ot.bregman.sinkhorn_log(a, b, -layer.numpy(), p.tau, numItermax=p.iters, stopThr=0.0, warn=False)
             for layer in p.scores]
    return torch.from_numpy(np.stack(plans))


def solve_pot_torch(p: Problem) -> torch.Tensor:
    import ot
    a = torch.ones(p.scores.shape[1], dtype=p.scores.dtype, device=p.scores.device)
    b = torch.tensor(p.capacities, dtype=p.scores.dtype, device=p.scores.device)
    return torch.stack([ot.bregman.sinkhorn_log(a, b, -layer, p.tau, numItermax=p.iters, stopThr=0.0, warn=False)
                        for layer in p.scores])


def solvers() -> dict[str, Callable[[Problem], torch.Tensor]]:
    """Name -> solver; the first is ours, the others are the references it is compared with."""
    return {"ours": solve_ours, "POT numpy": solve_pot_numpy, "POT torch": solve_pot_torch}


def torch_to_numpy_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float64: np.float64}[dtype]


# ----------------------------------------------------------------------------- measuring

@dataclass
class Timing:
    cpu: float
    wall: float


def timed(fn: Callable[[], torch.Tensor], repeats: int,
          sync: Callable[[], None] = lambda: None) -> tuple[Timing, torch.Tensor]:
    best, out = None, None
    for _ in range(repeats):
        sync()
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        sync()
        t = Timing(time.process_time() - c0, time.perf_counter() - w0)
        best = t if best is None else Timing(min(best.cpu, t.cpu), min(best.wall, t.wall))
    return best, out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_probe() -> Callable[[], int] | None:
    """Bytes in use on glibc's heap (small and mmap'ed blocks), or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    return in_use


def peak_heap(fn: Callable[[], object], probe: Callable[[], int]) -> tuple[int, object]:
    """Peak heap bytes above the level at the start, sampled after every aten op of `fn`
    (torch's CPU tensors are malloc'ed, so this is their high-water mark up to temporaries
    that live only inside one op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sampler(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, probe() - self.base)
            return out

    sampler = Sampler()
    sampler.base, sampler.peak = probe(), 0
    with sampler:
        result = fn()
    return sampler.peak, result


def saved_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Bytes of the tensors autograd saves for backward while running `fn`."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return total, result


def unrolled_sinkhorn(scores: torch.Tensor, capacities, tau: float, iters: int) -> torch.Tensor:
    """Reference: the plain log-domain loop, differentiated by autograd through every iteration."""
    log_k = scores / tau
    log_b = torch.as_tensor(capacities, dtype=scores.dtype).log()
    f = torch.zeros_like(log_k[..., :1])
    for _ in range(iters):
        g = log_b - torch.logsumexp(log_k + f, -2, keepdim=True)
        f = -torch.logsumexp(log_k + g, -1, keepdim=True)
    return (log_k + f + g).exp()


# ----------------------------------------------------------------------------- sections

def forward_section(args, shapes) -> None:
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    # On a GPU: ours against POT's torch backend on the same device (its numpy backend is CPU only),
    # timed in wall-clock seconds after a device synchronisation (CPU time says nothing there).
    names = [n for n in solvers() if not (cuda and n == "POT numpy")]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pick = (lambda t: t.wall) if cuda else (lambda t: t.cpu)
    if cuda:
        print(f"\n== device: {torch.cuda.get_device_name(dev)}; times below are wall-clock ms (labelled CPU ms)")
    print(f"\n== forward: tau={args.tau}, {args.iters} iterations for every solver (ours tol=None, "
          f"POT stopThr=0), {args.dtype}, scores ~ N(0, 1), uniform capacities, torch threads={args.threads}")
    print(f"   times: CPU ms, best of {args.repeats} (ours) / {args.pot_repeats} (POT); "
          "speed-up = POT / ours in CPU time (wall-clock in brackets)")
    print("   max|dP|: largest plan entry difference of ours to each POT run (same dtype), and to a float64 "
          "reference (POT torch backend in float64); col err: ours' largest relative column-sum error")
    header = f"{'shape':>16} {'ours ms':>9}"
    for name in names[1:]:
        header += f" {name + ' ms':>14} {'speed-up':>15}"
    for name in names[1:]:
        header += f" {'dP ' + name:>13}"
    header += f" {'dP f64 ref':>11} {'col err':>8}"
    print(header)
    gen = torch.Generator().manual_seed(args.seed)
    for L, n, E in shapes:
        scores = torch.randn(L, n, E, generator=gen, dtype=torch.float64)
        scores = scores.to(dev)
        p = Problem(scores.to(dtype), uniform_capacities(n, E), args.tau, args.iters)
        solve = solvers()
        solve["ours"](p)                                   # warm-up (first-call allocations)
        t_ours, plan = timed(lambda: solve["ours"](p), args.repeats, sync)
        row, diffs = f"{p.label:>16} {pick(t_ours) * 1e3:>9.1f}", ""
        for name in names[1:]:
            if cuda:
                solve[name](p)                             # warm-up on the GPU too
            t, ref = timed(lambda: solve[name](p), args.pot_repeats, sync)
            speed = f"{pick(t) / pick(t_ours):.1f}x ({t.wall / t_ours.wall:.1f}x)"
            row += f" {pick(t) * 1e3:>14.1f} {speed:>15}"
            diffs += f" {(plan.double() - ref.double()).abs().max().item():>13.1e}"
        reference = solve_pot_torch(Problem(scores, p.capacities, p.tau, p.iters))
        diffs += f" {(plan.double() - reference).abs().max().item():>11.1e}"
        print(row + diffs + f" {marginal_error(plan, p.capacities).item():>8.1e}", flush=True)


def memory_section(args) -> None:
    probe = _heap_probe()
    dtype = getattr(torch, args.dtype)
    it = args.mem_iters
    print(f"\n== backward memory: {it} iterations, tau={args.tau}, {args.dtype}")
    print("   retained = bytes autograd keeps from forward for backward (saved_tensors_hooks);"
          " fwd / bwd peak = peak heap bytes in use above the level when that phase starts (glibc mallinfo2, "
          "sampled after every aten op, after a warm-up); bwd/fwd = ratio of the two peaks")
    if probe is None:
        print("   (glibc mallinfo2 unavailable: peaks not measured)")
    print(f"{'shape':>12} {'method':>26} {'plan MB':>8} {'retained MB':>12} {'fwd peak MB':>12} "
          f"{'bwd peak MB':>12} {'bwd/fwd':>8}")
    gen = torch.Generator().manual_seed(args.seed)
    shapes = [(8192, 16)] if args.quick else [(8192, 16), (28672, 64)]
    for n, E in shapes:
        scores0 = torch.randn(n, E, generator=gen).to(dtype)
        caps = uniform_capacities(n, E)
        weight = torch.randn(n, E, generator=gen).to(dtype)
        ours = lambda s, k: sinkhorn(s, caps, args.tau, n_iters=k, tol=None)   # noqa: E731
        methods = [("ours (implicit backward)", ours, it), (f"ours, {10 * it} iterations", ours, 10 * it)]
        if n * E <= 8192 * 16:   # the unrolled reference keeps ~4 plans per iteration
            methods.append(("unrolled autograd (ref.)",
                            lambda s, k: unrolled_sinkhorn(s, caps, args.tau, k), it))
        for name, fn, iters in methods:
            def forward():
                return fn(scores0.clone().requires_grad_(), iters)
            retained, _ = saved_bytes(forward)
            if probe is not None:
                for _ in range(2):                        # the first pass warms up allocator and dispatcher
                    fwd, plan = peak_heap(forward, probe)
                    loss = (plan * weight).sum()
                    bwd, _ = peak_heap(loss.backward, probe)
                peaks = f"{fwd / 2**20:>12.2f} {bwd / 2**20:>12.2f} {bwd / fwd:>8.2f}"
            else:
                peaks = f"{'-':>12} {'-':>12} {'-':>8}"
            plan_mb = n * E * scores0.element_size() / 2**20
            print(f"{f'[{n}, {E}]':>12} {name:>26} {plan_mb:>8.2f} {retained / 2**20:>12.2f} {peaks}", flush=True)
    print("   (the unrolled reference's cost is what it retains: its forward peak holds every iteration's "
          "tensors until backward frees them)")


def rounding_section(args) -> None:
    n, E = (8192, 16) if args.quick else (28672, 64)
    print(f"\n== rounding [{n}, {E}]: round_to_assignment (greedy proposals + cycle-cancelling) on a "
          f"Sinkhorn plan; CPU / wall ms, best of {args.repeats}")
    print(f"{'tau':>6} {'cpu ms':>8} {'wall ms':>8} {'certified optimal':>18} {'sum log P':>12} {'greedy alone':>13}")
    gen = torch.Generator().manual_seed(args.seed)
    caps = uniform_capacities(n, E)
    for tau in (1.0, 0.1, 0.01):
        plan = sinkhorn(torch.randn(n, E, generator=gen), caps, tau)
        t, assign = timed(lambda: round_to_assignment(plan, caps), args.repeats)
        logp = plan.double().clamp_min(torch.finfo(plan.dtype).tiny).log().numpy()
        greedy = _greedy_fill(logp, np.asarray(caps))
        _, certified = _cancel_cycles(logp, greedy.copy(), 1000)
        obj = logp[np.arange(n), assign.numpy()].sum()
        obj_greedy = logp[np.arange(n), greedy].sum()
        print(f"{tau:>6g} {t.cpu * 1e3:>8.0f} {t.wall * 1e3:>8.0f} {str(certified):>18} {obj:>12.1f} {obj_greedy:>13.1f}",
              flush=True)
    # What the flip bound's bisection and each optimizer step ask for: the rounding of scores a few
    # flips from an assignment already known, from scratch and from that assignment (`start`).
    print(f"\n== rounding of moved scores [{n}, {E}], from scratch vs from the last assignment (start=); "
          f"CPU ms, best of {args.repeats}")
    print(f"{'move':>6} {'flips':>6} {'scratch':>8} {'start':>8} {'speed-up':>9} {'same':>5}")
    scores = torch.randn(n, E, generator=gen, dtype=torch.float64)
    known = assign_by_score(scores, caps)
    for scale in (0.001, 0.01, 0.1):
        moved = scores + scale * torch.randn(n, E, generator=gen, dtype=torch.float64)
        cold_t, cold = timed(lambda: assign_by_score(moved, caps), args.repeats)
        warm_t, warm = timed(lambda: assign_by_score(moved, caps, start=known), args.repeats)
        print(f"{scale:>6g} {int((cold != known).sum()):>6} {cold_t.cpu * 1e3:>8.0f} {warm_t.cpu * 1e3:>8.0f} "
              f"{cold_t.cpu / max(warm_t.cpu, 1e-9):>8.1f}x {str(bool(torch.equal(cold, warm))):>5}", flush=True)


# ----------------------------------------------------------------------------- --distributed

DIST_METHODS = ("replicated", "sharded")


def _dist_step(method: str, theta: torch.Tensor, caps, args, rank: int, world: int) -> torch.Tensor:
    if method == "replicated":
        return sinkhorn(theta, caps, args.tau, n_iters=args.iters, tol=None)
    return sharded_sinkhorn(theta, caps, args.tau, n_iters=args.iters, tol=None)


def _dist_rank(rank: int, world: int, store: str, threads: int, args, results) -> None:
    """One rank: warm-up, timed and memory-sampled forward + backward of each method."""
    import torch.distributed as dist
    try:
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        probe = _heap_probe()
        dtype = getattr(torch, args.dtype)
        L, n, E = args.dist_shape
        scores = torch.randn(L, n, E, generator=torch.Generator().manual_seed(args.seed)).to(dtype)
        # Each rank's upstream gradient differs (its own micro-batch), as in data-parallel training.
        weight = torch.randn(L, n, E, generator=torch.Generator().manual_seed(args.seed + 1 + rank)).to(dtype)
        caps = uniform_capacities(n, E)
        out = {}
        for method in DIST_METHODS:
            src = scores

            def step():
                theta = src.clone().requires_grad_()
                plan = _dist_step(method, theta, caps, args, rank, world)
                (plan * weight).sum().backward()
                return plan.detach(), theta.grad

            step()                                                     # warm-up
            walls, cpus = [], []
            for _ in range(args.repeats):
                dist.barrier()
                c0, w0 = time.process_time(), time.perf_counter()
                plan, grad = step()
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
            res = {"wall": min(walls), "cpu": min(cpus)}
            # Memory: heap above the level before the step (theta, the upstream weight exist already).
            theta = src.clone().requires_grad_()
            dist.barrier()
            retained, _ = saved_bytes(lambda: _dist_step(method, theta.clone(), caps, args, rank, world))
            del _
            for _ in range(2 if probe is not None else 0):   # the first pass warms up allocator and dispatcher
                theta.grad = None
                base = probe()
                fwd, plan_t = peak_heap(lambda: _dist_step(method, theta, caps, args, rank, world), probe)
                loss = (plan_t * weight).sum()
                before_bwd = probe() - base
                bwd, _ = peak_heap(loss.backward, probe)
                res.update(fwd=fwd, bwd=bwd, peak=max(fwd, before_bwd + bwd))
                del plan_t, loss
            res["retained"] = retained
            # The same plan on every rank, and the data-parallel average of the gradients (what
            # DeepSpeed applies) the same as the replicated computation's.
            avg = grad.clone()
            dist.all_reduce(avg)
            avg /= world
            out[method] = (res, plan, avg)
        ref_plan, ref_grad = out["replicated"][1], out["replicated"][2]
        summary = {}
        for method, (res, plan, avg) in out.items():
            res["dP"] = (plan.double() - ref_plan.double()).abs().max().item()
            res["dgrad"] = ((avg.double() - ref_grad.double()).abs().max() / ref_grad.abs().max()).item()
            summary[method] = res
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, None, summary))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))


def _run_dist_world(world: int, threads: int, args) -> list[dict]:
    ctx = multiprocessing.get_context("fork")     # torch is imported already: no re-import per rank
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_dist_rank, args=(r, world, os.path.join(tmp, "store"), threads, args, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        got, errors = {}, []
        try:
            while len(got) + len(errors) < world:
                try:
                    rank, err, res = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead:
                        errors.append(f"ranks {dead} died")
                        break
                    continue
                if err is not None:
                    errors.append(f"rank {rank}:\n{err}")
                    break
                got[rank] = res
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise RuntimeError("distributed benchmark failed:\n" + "\n".join(errors))
    return [got[r] for r in range(world)]


def distributed_section(args) -> None:
    L, n, E = args.dist_shape
    dtype = getattr(torch, args.dtype)
    cores = os.cpu_count() or 1
    plan_mb = L * n * E * torch.finfo(dtype).bits / 8 / 2**20
    print(f"\n== distributed: one forward + backward of the batched Sinkhorn [{L}, {n}, {E}], {args.dtype}, "
          f"tau={args.tau}, {args.iters} iterations (tol=None), uniform capacities; gloo on 127.0.0.1, ranks forked "
          f"from this process; {cores} CPU cores here")
    print(f"   one full plan [{L}, {n}, {E}] = {plan_mb:.1f} MB. replicated: every rank computes the whole plan "
          "(today's layer); sharded: `sharded_sinkhorn` on the replicated scores (rows split, plan all-gathered, "
          "gradient reduce-scattered)")
    print("   wall / CPU s: one step per rank, best of --repeats (CPU = process time of the rank, its gloo threads "
          "included); fwd / bwd / step peak MB: heap above the level before the step (glibc mallinfo2, sampled "
          "after every aten op), per rank, max over ranks; fwd-out: the forward's peak less the returned full plan "
          "(the Sinkhorn's own working set); retained: saved for backward by the Sinkhorn itself")
    print("   dP: largest difference to the replicated plan; dgrad rel: largest difference of the rank-averaged "
          "gradient (DeepSpeed's data-parallel reduction; every rank has its own upstream gradient) to the "
          "replicated one, relative to the largest gradient entry")
    header = (f"{'ranks':>5} {'thr':>3} {'method':>10} {'wall s':>7} {'CPU s/rank':>11} {'fwd MB':>8} {'fwd-out':>8} "
              f"{'bwd MB':>8} {'step MB':>8} {'retained':>9} {'mem/repl':>9} {'dP':>8} {'dgrad rel':>9}")
    print(header)
    for world in args.dist_worlds:
        threads = args.dist_threads or max(1, cores // world)
        ranks = _run_dist_world(world, threads, args)
        repl_peak = max(r["replicated"].get("peak", 0) for r in ranks)
        for method in DIST_METHODS:
            rs = [r[method] for r in ranks]
            wall = max(r["wall"] for r in rs)
            cpu = sum(r["cpu"] for r in rs) / len(rs)
            mb = lambda key: max(r.get(key, 0) for r in rs) / 2**20   # noqa: E731
            ratio = mb("peak") * 2**20 / repl_peak if repl_peak else float("nan")
            print(f"{world:>5} {threads:>3} {method:>10} {wall:>7.2f} {cpu:>11.2f} {mb('fwd'):>8.1f} "
                  f"{mb('fwd') - plan_mb:>8.1f} {mb('bwd'):>8.1f} "
                  f"{mb('peak'):>8.1f} {mb('retained'):>9.1f} {ratio:>9.2f} "
                  f"{max(r['dP'] for r in rs):>8.1e} {max(r['dgrad'] for r in rs):>9.1e}", flush=True)
        if world * threads > cores:
            print(f"      ({world} ranks x {threads} thread(s) on {cores} cores: oversubscribed, so wall times of "
                  "both methods are inflated; CPU s/rank is each rank's own work, its gloo waits included)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subset of shapes and sections")
    parser.add_argument("--iters", type=int, default=100, help="Sinkhorn iterations for every solver")
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats for ours (best is kept)")
    parser.add_argument("--pot-repeats", type=int, default=1, help="timing repeats for POT (slow)")
    parser.add_argument("--mem-iters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sections", default="forward,memory,rounding")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the forward section (memory and rounding stay on the CPU)")
    parser.add_argument("--distributed", action="store_true",
                        help="only the replicated-vs-sharded comparison over --dist-worlds gloo ranks")
    parser.add_argument("--dist-shape", type=lambda s: tuple(int(x) for x in s.split(",")), default=(8, 28672, 64),
                        help="L,n,E of the --distributed problem")
    parser.add_argument("--dist-worlds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--dist-threads", type=int, default=0,
                        help="torch threads per rank in --distributed (0: cores // ranks, at least 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="ot")
    import ot
    print(f"torch {torch.__version__}, POT {ot.__version__}, numpy {np.__version__}; "
          f"command: {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}")
    start = time.perf_counter()
    sections = {"distributed"} if args.distributed else set(args.sections.split(","))
    if "distributed" in sections:
        distributed_section(args)
    if "forward" in sections:
        forward_section(args, QUICK_SHAPES if args.quick else FULL_SHAPES)
    if "memory" in sections:
        memory_section(args)
    if "rounding" in sections:
        rounding_section(args)
    print(f"\n(total {time.perf_counter() - start:.0f} s wall)")


if __name__ == "__main__":
    main()
