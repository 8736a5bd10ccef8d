"""Benchmark: the zero-shot suite through lm-eval's HFLM at batch size 1, at larger batch sizes,
and through our FastHFLM scorer, side by side in one run on the same model and items.

    PYTHONPATH=. OMP_WAIT_POLICY=PASSIVE python tools/bench_eval.py --n 5 [--model demo]
        [--tasks arc_easy,...] [--batch_sizes 4,16] [--threads 1]

Prints items/s of each path (end to end through `simple_evaluate`, task building included; the
wall and CPU time inside the scorer separately: on a machine shared with other work the CPU time
of the single-threaded scorer is the steadier measure), the ratio to HFLM at batch size 1, and checks that every
path gives the same accuracies (acc, acc_norm) and per-item log-likelihoods within 1e-4 of HFLM
batch size 1. Exit status 1 when they differ.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _timed_scorer(cls, clock: dict):
    original = cls._loglikelihood_tokens

    def wrapped(self, *args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            clock["scoring"] = clock.get("scoring", 0.0) + time.perf_counter() - start
            clock["cpu"] = clock.get("cpu", 0.0) + time.process_time() - cpu

    cls._loglikelihood_tokens = wrapped
    return original


def main(argv=None) -> int:
    from lm_eval.models.huggingface import HFLM

    from dotmoe_ds.benchmarks import DEFAULT_TASKS, check_tasks, run_benchmarks
    from dotmoe_ds.evaluate import load_model
    from dotmoe_ds.fast_lm import FastHFLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n", type=int, default=5, help="items per task (lm-eval's limit)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--batch_sizes", default="4,16", help="HFLM batch sizes tried besides 1")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = check_tasks(args.tasks)
    model, tokenizer = load_model(args.model)
    runs = [("lm-eval HFLM bs=1", "lm_eval", 1, HFLM)]
    runs += [(f"lm-eval HFLM bs={b}", "lm_eval", int(b), HFLM) for b in args.batch_sizes.split(",") if b]
    runs.append(("ours (FastHFLM)", "fast", 1, FastHFLM))
    rows, results = [], {}
    items = None
    for label, scorer, bs, cls in runs:
        clock: dict = {}
        original = _timed_scorer(cls, clock)
        try:
            start = time.perf_counter()
            res = run_benchmarks(model, tokenizer, tasks, limit=args.n, scorer=scorer, batch_size=bs,
                                 keep_samples=True)
            seconds = time.perf_counter() - start
        finally:
            cls._loglikelihood_tokens = original
        items = sum(r["n"] for r in res.values())
        results[label] = res
        rows.append((label, seconds, clock.get("scoring", float("nan")), clock.get("cpu", float("nan"))))
        print(f"{label}: {seconds:.1f} s ({clock.get('scoring', 0):.1f} s scoring, {clock.get('cpu', 0):.1f} CPU s)",
              flush=True)
    base_label, base_s, base_score, base_cpu = rows[0]
    best_hf = min(rows[:-1], key=lambda r: r[1])
    print(f"\n{len(tasks)} tasks x {args.n} items = {items} items, model {args.model}, "
          f"{torch.get_num_threads()} torch threads\n")
    print("| path | seconds | items/s | x bs=1 | scoring s | scoring x bs=1 | scoring CPU s | CPU x bs=1 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, s, sc, cpu in rows:
        print(f"| {label} | {s:.1f} | {items / s:.3f} | {base_s / s:.2f} | {sc:.1f} | {base_score / sc:.2f} "
              f"| {cpu:.1f} | {base_cpu / cpu:.2f} |")
    ours = rows[-1]
    print(f"\nours vs best HFLM ({best_hf[0]}): {best_hf[1] / ours[1]:.2f}x end to end, "
          f"{best_hf[2] / ours[2]:.2f}x scoring, {best_hf[3] / ours[3]:.2f}x scoring CPU time")
    ok = True
    reference = results[base_label]
    print("\n| task | " + " | ".join(label for label, *_ in rows) + " | max |ll diff| |")
    print("| --- |" + " ---: |" * (len(rows) + 1))
    for task in tasks:
        accs, diff = [], 0.0
        for label, *_ in rows:
            r = results[label][task]
            accs.append(f"{r['acc']:.4f}" + (f" / {r['acc_norm']:.4f}" if "acc_norm" in r else ""))
            same = all(r.get(m) == reference[task].get(m) for m in ("acc", "acc_norm"))
            for a, b in zip(r["loglikelihoods"], reference[task]["loglikelihoods"]):
                diff = max(diff, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
            ok &= same
        ok &= diff <= 1e-4
        print(f"| {task} | " + " | ".join(accs) + f" | {diff:.2e} |")
    print("\nidentical accuracies and log-likelihoods within 1e-4:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
