"""One Llama-3-70B FFN layer's assignment machinery, simulated on this CPU, and what 80 layers cost.

    .venv/bin/python tools/bench_70b_layer.py                 # both budgets, 1 and 2 ranks
    .venv/bin/python tools/bench_70b_layer.py --iters 50 --repeats 2 --worlds 1,2

Llama-3-70B: hidden 8192, d_ff 28672, 80 layers. Budgets (issue 15):
  fine-grained  224 experts of 128 neurons, k 112 (50% active)  -> scores [28672, 224]
  coarse          8 experts of 3584 neurons, k 4   (50% active)  -> scores [28672, 8]

Per budget, single process (--threads torch threads): the scores' Sinkhorn forward + backward
(`sinkhorn`, --iters iterations, no early stop, as the trainer's worst case) and the capacity-exact
rounding (`assign_by_score`), time (best of --repeats) and peak heap above the level before the call
(glibc mallinfo2, sampled after every aten op; bench_sinkhorn.peak_heap). Then the replicated vs
row-sharded comparison over --worlds gloo ranks, by `tools/bench_sinkhorn.py --distributed` on the
same shape. Last, on paper: per optimiser step on 64 GPUs, 80 layers cost
  replicated: every rank runs every layer's Sinkhorn (80 x fwd+bwd) + rounds ceil(80 / 64) layers
  sharded:    every rank runs 1/64 of each layer's rows (80 x fwd+bwd / 64, communication not counted)
from this CPU's single-rank times (a GPU is much faster, so these are upper bounds), next to the
memory planner's Sinkhorn term for the same budget (`dotmoe_ds.plan.plan_memory`).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_sinkhorn  # noqa: E402
from dotmoe_ds.sinkhorn import assign_by_score, sinkhorn  # noqa: E402
from dotmoe_ds.spec import MoESpec  # noqa: E402

D_FF, HIDDEN, LAYERS, GPUS = 28672, 8192, 80, 64
BUDGETS = {"224 x 128, k112": (224, 112), "8 x 3584, k4": (8, 4)}


def one_layer(E: int, args) -> dict:
    spec = MoESpec.uniform(D_FF, E, top_k=1)
    caps = list(spec.column_capacities)
    gen = torch.Generator().manual_seed(args.seed)
    # A plan mid-training: a one-hot start (beta 3) plus noise, at tau 0.5.
    start = torch.randint(0, E, (D_FF,), generator=gen)
    scores = 3.0 * torch.nn.functional.one_hot(start, E).float() + 0.3 * torch.randn(D_FF, E, generator=gen)
    upstream = torch.randn(D_FF, E, generator=gen)

    def fwd_bwd():
        theta = scores.clone().requires_grad_()
        plan = sinkhorn(theta, caps, tau=args.tau, n_iters=args.iters, tol=None)
        (plan * upstream).sum().backward()
        return theta.grad

    def rounding():
        return assign_by_score(scores, caps)

    out = {}
    for name, fn in (("sinkhorn", fwd_bwd), ("rounding", rounding)):
        fn()   # warm-up
        t, _ = bench_sinkhorn.timed(fn, args.repeats)
        probe = heap_probe()
        peak = bench_sinkhorn.peak_heap(fn, probe)[0] if probe is not None else float("nan")
        out[name] = {"wall": t.wall, "cpu": t.cpu, "peak": peak}
    assign = rounding()
    assert torch.bincount(assign, minlength=E).tolist() == caps   # capacity-exact
    return out


def heap_probe():
    """glibc heap bytes in use, or None off glibc (same measure as bench_sinkhorn)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    return lambda: libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd


def planner_sinkhorn_term(E: int, k: int) -> str:
    from dotmoe_ds.plan import plan_memory

    plan = plan_memory("llama-3-70b", nodes=8, gpus_per_node=8, gpu_memory_gb=80, num_experts=E, top_k=k)
    t = plan.term("Sinkhorn working set")
    s = plan.term("DOT-MoE scores + router")
    return (f"planner (64 x 80 GiB, ZeRO-3): Sinkhorn working set {t.bytes / 2**30:.2f} GiB per GPU, scores + "
            f"router {s.bytes / 2**30:.3f} GiB per GPU, total {plan.total_bytes / 2**30:.1f} GiB")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50, help="Sinkhorn iterations (the trainer's default maximum)")
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worlds", default="1,2", help="rank counts of the replicated-vs-sharded comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; {args.threads} thread(s); {os.cpu_count()} CPU cores here; Sinkhorn "
          f"{args.iters} iterations, tau {args.tau}, fp32; command: {' '.join(sys.argv)}")
    for label, (E, k) in BUDGETS.items():
        print(f"\n=== {label}: scores [{D_FF}, {E}] ({D_FF * E * 4 / 2**20:.1f} MB fp32)")
        res = one_layer(E, args)
        for name, r in res.items():
            print(f"  {name:9s} wall {r['wall']:7.3f} s  CPU {r['cpu']:7.3f} s  peak heap {r['peak'] / 2**20:8.1f} MB")
        s, r = res["sinkhorn"]["wall"], res["rounding"]["wall"]
        repl = LAYERS * s + math.ceil(LAYERS / GPUS) * r
        shard = LAYERS * s / GPUS + math.ceil(LAYERS / GPUS) * r
        print(f"  on paper, 80 layers per optimiser step on {GPUS} GPUs at this CPU's speed: replicated "
              f"{repl:.1f} s/step (80 x {s:.3f} + {math.ceil(LAYERS / GPUS)} x {r:.3f}); sharded "
              f"{shard:.2f} s/step (80 x {s:.3f} / 64 + {math.ceil(LAYERS / GPUS)} x {r:.3f}, communication "
              "not counted)")
        print(f"  {planner_sinkhorn_term(E, k)}")
        print(f"  replicated vs sharded over {args.worlds} gloo ranks (tools/bench_sinkhorn.py --distributed):",
              flush=True)
        bench_sinkhorn.main(["--distributed", "--dist-shape", f"1,{D_FF},{E}", "--dist-worlds", args.worlds,
                             "--iters", str(args.iters), "--tau", str(args.tau), "--repeats", str(args.repeats)])


if __name__ == "__main__":
    main()
