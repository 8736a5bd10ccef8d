"""Print a run's training trace from its TensorBoard events as a text table (no TensorBoard server).

    .venv/bin/python tools/tb_trace.py runs/demo                 # every 5th step and the last
    .venv/bin/python tools/tb_trace.py runs/demo --every 10 --tags loss/,assign/flips

Columns: the run-level scalars whose tag starts with one of --tags (per-layer tags are left out).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dotmoe_ds.monitor import TRACE_TAGS, events_dir, format_trace, read_trace  # noqa: E402


def main(run: str = "", every: int = 5, tags: str = ",".join(TRACE_TAGS)) -> None:
    """RUN: the trainer's OUTPUT folder (or its tensorboard/dotmoe folder)."""
    if not run or not events_dir(run).is_dir():
        raise SystemExit(f"tb_trace: no TensorBoard folder at {events_dir(run or '.')} (pass a run folder)")
    trace = read_trace(run, [p for p in str(tags).split(",") if p])
    if not trace:
        raise SystemExit(f"tb_trace: no scalar of {events_dir(run)} starts with one of {tags!r}")
    print(format_trace(trace, every))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
