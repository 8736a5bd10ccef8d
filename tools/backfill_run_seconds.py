"""Backfill `loop_seconds` and `run_seconds` into a finished run's results.json from its TensorBoard
events, for runs resumed from a checkpoint written before the trainer recorded its loop time.

    .venv/bin/python tools/backfill_run_seconds.py results/runs/cpu/random_50 [--write]

Each invocation of the trainer writes its own events file. A step's time is the gap between its
`loss/total` event and the previous step's in the same file; a step that a later invocation redid
(after resuming from an earlier checkpoint) counts from the later file only; the first step of each
invocation (whose gap would include the start-up) counts as that invocation's median step. Then
run_seconds = wall_seconds of the finishing invocation + the loop time of the invocations before it,
as the trainer computes it for new runs (runframe.run_seconds). Prints the figures; --write stores them with
"run_seconds_from": "tensorboard events".
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dotmoe_ds.checkpoint import atomic_write_text  # noqa: E402
from dotmoe_ds.monitor import events_dir  # noqa: E402
from dotmoe_ds.runframe import run_seconds as uninterrupted_seconds  # noqa: E402

TAG = "loss/total"


def step_times(events_file: Path) -> dict[int, float]:
    """Wall-clock time of each step's `loss/total` event in one events file (the last if repeated)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = {}
    for event in EventFileLoader(str(events_file)).Load():
        for value in event.summary.value:
            if value.tag == TAG:
                times[event.step] = event.wall_time
    return times


def loop_seconds_by_invocation(run: Path) -> list[tuple[str, list[int], float]]:
    """(events file, the steps it contributes, their loop seconds), oldest invocation first."""
    per_file = [(f, step_times(f)) for f in events_dir(run).glob("events.out.tfevents.*")]
    per_file = sorted(((f, t) for f, t in per_file if t), key=lambda ft: min(ft[1].values()))   # by start
    owner = {}
    for i, (_, times) in enumerate(per_file):
        for step in times:
            owner[step] = i                 # a later invocation's redone step replaces the earlier one
    out = []
    for i, (f, times) in enumerate(per_file):
        steps = sorted(s for s, o in owner.items() if o == i)
        if not steps:
            continue
        # steps after a gap in this file's own sequence would be miscounted: refuse rather than guess
        if steps != list(range(steps[0], steps[-1] + 1)):
            raise SystemExit(f"backfill: {f.name} contributes non-contiguous steps {steps[0]}..{steps[-1]}")
        ordered = sorted(times)
        gaps = [times[b] - times[a] for a, b in zip(ordered, ordered[1:]) if b == a + 1]
        first_step = statistics.median(gaps) if gaps else 0.0
        out.append((f.name, steps, first_step + sum(times[s] - times[s - 1] for s in steps[1:])))
    return out


def main(run: str, write: bool = False) -> None:
    run_dir = Path(run)
    res_file = run_dir / "results.json"
    if not res_file.is_file():
        raise SystemExit(f"backfill: {res_file} does not exist (a finished run's folder is needed)")
    res = json.loads(res_file.read_text())
    parts = loop_seconds_by_invocation(run_dir)
    if not parts:
        raise SystemExit(f"backfill: no {TAG} events under {events_dir(run_dir)}")
    for name, steps, seconds in parts:
        print(f"{name}: steps {steps[0]}-{steps[-1]}, {seconds:.0f} s ({seconds / len(steps):.1f} s/step)")
    loop = sum(s for _, _, s in parts)
    run_seconds = uninterrupted_seconds(res["wall_seconds"], loop - parts[-1][2])
    print(f"loop {loop:.0f} s; run_seconds {run_seconds:.0f} s "
          f"(finishing invocation's wall {res['wall_seconds']:.0f} s)")
    if write:
        res.update({"loop_seconds": loop, "run_seconds": run_seconds, "run_seconds_from": "tensorboard events"})
        atomic_write_text(res_file, json.dumps(res, indent=1) + "\n")   # the study reads it back
        print(f"wrote {res_file}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
