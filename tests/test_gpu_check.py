"""tools/gpu_check.sh cannot rot unseen: its dry run validates every step here, on the CPU.

The dry run builds each step's commands and checks them without running them (programs and files
exist; each tool's own argument parser accepts the flags; the DeepSpeed launcher's too); a real
run on a machine without CUDA records the CUDA steps as skipped, with the reason, and goes on.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load_gpu_check()


def _run(args, tmp_path, monkeypatch):
    """gpu_check's main in this process (the torch, transformers and DeepSpeed imports that the
    validation needs are then shared with the other tests); state, carried files and results in tmp."""
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(gpu_check, "STATE", gpu_check.STATE)       # main() rebinds these globals
    monkeypatch.setattr(gpu_check, "CARRIED", gpu_check.CARRIED)
    empty = tmp_path / "carried"
    empty.mkdir(exist_ok=True)
    rc = gpu_check.main([*args, "--state", str(tmp_path / "state"), "--carried", str(empty),
                         "--results", str(tmp_path / "results")])
    assert rc == 0
    records = {f.stem: json.loads(f.read_text()) for f in (tmp_path / "results" / "steps").glob("*.json")}
    return records, (tmp_path / "results" / "summary.md").read_text()


def test_dry_run_validates_every_step(tmp_path, monkeypatch):
    records, summary = _run(["--dry_run"], tmp_path, monkeypatch)
    assert set(records) == {"stage", *gpu_check.STEP_NAMES}
    for name, rec in records.items():
        assert rec["status"] == "dry_run", (name, rec["reason"])
    # Every step is in the summary's table with its status, and its exact commands are written down.
    for name in gpu_check.STEP_NAMES:
        assert f"| {name} | dry_run |" in summary
        assert f"## {name}: dry_run" in summary
    assert "deepspeed.launcher.runner --num_gpus 1 dotmoe_ds/train.py" in summary
    assert "tools/bench_recover.py --device cuda" in summary
    assert "--setting full --calibration austen --only dot_50" in summary and "--only prune_50" in summary


def test_run_without_cuda_skips_the_cuda_steps_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_gpu_count", lambda ctx: 0)    # as on a machine without CUDA
    records, summary = _run(["--only", "cuda_tests,bench_sinkhorn"], tmp_path, monkeypatch)
    assert records["stage"]["status"] == "pass"
    for name in ("cuda_tests", "bench_sinkhorn"):
        assert records[name]["status"] == "skip" and records[name]["reason"] == "no CUDA device"
    assert "| convert | not run |" in summary           # not selected: no record
    # A second call keeps the first call's records and adds its own.
    records2, summary2 = _run(["--only", "cuda_tests"], tmp_path, monkeypatch)
    assert records2["bench_sinkhorn"] == records["bench_sinkhorn"]
    assert "| bench_sinkhorn | skip |" in summary2


def test_validation_catches_bad_flags():
    """What makes a dry run worth having: a flag the tool does not know, or a bad value, is reported."""
    ctx = gpu_check.Ctx(python=sys.executable, results=Path("unused"), dry_run=True, n_gpus=1)
    py = sys.executable
    assert gpu_check.validate_command(ctx, [py, "tools/bench_step.py", "--device", "cuda"]) == []
    bad = gpu_check.validate_command(ctx, [py, "tools/bench_step.py", "--no_such_flag", "1"])
    assert len(bad) == 1 and "no_such_flag" in bad[0]
    bad = gpu_check.validate_command(ctx, [py, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                                           "dotmoe_ds/train.py", "--num_experts", "4", "--top_k", "9"])
    assert len(bad) == 1 and "--top_k=9" in bad[0]
    bad = gpu_check.validate_command(ctx, [py, "tools/quality_study.py", "--setting", "full", "--only", "dot_k3"])
    assert len(bad) == 1 and "dot_k3" in bad[0]
    bad = gpu_check.validate_command(ctx, [py, "-m", "dotmoe_ds.cli", "eval", "x", "--device", "tpu"])
    assert len(bad) == 1 and "tpu" in bad[0]


def test_unknown_step_is_a_usage_error(tmp_path):
    """Through the shell wrapper, as the device runs it."""
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--only", "nope", "--results",
                        str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown step(s) nope" in p.stderr


@pytest.mark.parametrize("text,expected", [
    ("a\nTraceback (most recent call last):\nValueError: bad\n", "ValueError: bad"),
    ("all fine\nlast line\n", "last line"),
])
def test_last_error_line(text, expected):
    assert gpu_check.last_error_line(text) == expected


def test_a_failing_or_hanging_step_never_stops_the_next(tmp_path, monkeypatch):
    """Real execution with stand-in steps: a failure and a timeout are recorded with their reasons,
    the next steps still run, the budget skips what does not fit, and a second call repeats nothing."""
    py = sys.executable
    Step = gpu_check.Step
    steps = [
        Step("fails", "exits 3", (), 1, 30, lambda ctx: [[py, "-c", "import sys; print('ValueError: boom'); sys.exit(3)"]]),
        Step("hangs", "sleeps past its timeout", (), 1, 1, lambda ctx: [[py, "-c", "import time; time.sleep(30)"]]),
        Step("works", "prints a figure", (), 1, 30, lambda ctx: [[py, "-c", "print('ratio 1.5')"]],
             figures=lambda ctx, log: gpu_check.lines_starting(log, "ratio")),
        Step("too_long", "needs more than the budget", (), 10_000, 30, lambda ctx: [[py, "-c", "pass"]]),
    ]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    monkeypatch.setattr(gpu_check, "STEP_NAMES", [s.name for s in steps])
    monkeypatch.setattr(gpu_check, "_gpu_count", lambda ctx: 0)
    records, summary = _run(["--budget", "120"], tmp_path, monkeypatch)
    assert records["fails"]["status"] == "fail" and "exit 3" in records["fails"]["reason"]
    assert "ValueError: boom" in records["fails"]["reason"]
    assert records["hangs"]["status"] == "fail" and records["hangs"]["reason"] == "timed out after 1 s"
    assert records["works"]["status"] == "pass" and records["works"]["figures"] == ["ratio 1.5"]
    assert records["too_long"]["status"] == "skip" and records["too_long"]["reason"].startswith("time budget")
    assert "ratio 1.5" in summary and (tmp_path / "results" / "logs" / "fails.log").is_file()
    logs = tmp_path / "results" / "logs"
    before = {n: (logs / f"{n}.log").stat().st_mtime_ns for n in ("fails", "hangs", "works")}
    records2, _ = _run(["--budget", "120"], tmp_path, monkeypatch)
    assert {n: (logs / f"{n}.log").stat().st_mtime_ns for n in before} == before    # kept, not rerun
    assert records2["works"] == records["works"]
