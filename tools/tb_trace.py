"""Print a run's training trace from its TensorBoard events as a text table (no TensorBoard server).

    .venv/bin/python tools/tb_trace.py runs/demo                 # every 5th step and the last
    .venv/bin/python tools/tb_trace.py runs/demo --every 10 --tags loss/,assign/flips

Columns: the run-level scalars whose tag starts with one of --tags (per-layer tags are left out).

    .venv/bin/python tools/tb_trace.py --compare runs/a,runs/b --tag loss/total --window 50

compares paired runs (same seed: same batches) on one scalar: its mean per window of steps, and how
many steps each run was the lowest (monitor.compare_runs). A run folder without its events (the study's
committed units) is read from its steps.json: the loss terms and assign/moved, assign/undone.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dotmoe_ds.monitor import TRACE_TAGS, compare_runs, events_dir, format_trace, has_trace, read_trace  # noqa: E402


def main(run: str = "", every: int = 5, tags: str = ",".join(TRACE_TAGS), compare: str = "",
         tag: str = "loss/total", window: int = 50) -> None:
    """RUN: the trainer's OUTPUT folder (or its tensorboard/dotmoe folder); or --compare RUN,RUN,..."""
    if compare:
        # fire hands `a,b` over as a tuple when the names parse as Python literals
        runs = list(compare) if isinstance(compare, (tuple, list)) else [r for r in str(compare).split(",") if r]
        runs = [str(r) for r in runs]
        missing = [r for r in runs if not has_trace(r)]
        if len(runs) < 2 or missing:
            raise SystemExit("tb_trace: --compare needs two or more run folders with TensorBoard events or steps.json; "
                             f"missing: {', '.join(missing) or '-'}")
        values = {Path(r).name: read_trace(r, [tag]).get(tag) for r in runs}
        absent = [n for n, v in values.items() if not v]
        if absent:
            raise SystemExit(f"tb_trace: {', '.join(absent)} logged no scalar {tag!r}")
        print(compare_runs(values, window))
        return
    if not run or not has_trace(run):
        raise SystemExit(f"tb_trace: no TensorBoard events at {events_dir(run or '.')} and no steps.json "
                         "(pass a run folder)")
    trace = read_trace(run, [p for p in str(tags).split(",") if p])
    if not trace:
        raise SystemExit(f"tb_trace: no scalar of {events_dir(run)} starts with one of {tags!r}")
    print(format_trace(trace, every))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
