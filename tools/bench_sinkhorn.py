"""Benchmark our Sinkhorn (dotmoe_ds/sinkhorn.py) against POT's log-domain Sinkhorn, side by side.

    .venv/bin/python tools/bench_sinkhorn.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python tools/bench_sinkhorn.py --quick    # small subset (well under a minute)

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

Adding a mode (e.g. --distributed for issue 5): write another function with the signature of
`solve_ours` (scores [L, n, E], capacities, tau, iters) -> plan, e.g. one that splits the rows
over ranks and passes `col_reduce`, and add it to `solvers()`; the table picks it up.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dotmoe_ds.sinkhorn import (_cancel_cycles, _greedy_fill, marginal_error,  # noqa: E402
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
    a = torch.ones(p.scores.shape[1], dtype=p.scores.dtype)
    b = torch.tensor(p.capacities, dtype=p.scores.dtype)
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


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[Timing, torch.Tensor]:
    best, out = None, None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
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
    names = list(solvers())
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
        p = Problem(scores.to(dtype), uniform_capacities(n, E), args.tau, args.iters)
        solve = solvers()
        solve["ours"](p)                                   # warm-up (first-call allocations)
        t_ours, plan = timed(lambda: solve["ours"](p), args.repeats)
        row, diffs = f"{p.label:>16} {t_ours.cpu * 1e3:>9.1f}", ""
        for name in names[1:]:
            t, ref = timed(lambda: solve[name](p), args.pot_repeats)
            speed = f"{t.cpu / t_ours.cpu:.1f}x ({t.wall / t_ours.wall:.1f}x)"
            row += f" {t.cpu * 1e3:>14.1f} {speed:>15}"
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="ot")
    import ot
    print(f"torch {torch.__version__}, POT {ot.__version__}, numpy {np.__version__}; "
          f"command: {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}")
    start = time.perf_counter()
    sections = set(args.sections.split(","))
    if "forward" in sections:
        forward_section(args, QUICK_SHAPES if args.quick else FULL_SHAPES)
    if "memory" in sections:
        memory_section(args)
    if "rounding" in sections:
        rounding_section(args)
    print(f"\n(total {time.perf_counter() - start:.0f} s wall)")


if __name__ == "__main__":
    main()
