"""The trainer with the reconstruction term and the scores' own optimizer, one process, under ZeRO-3
(the default config) and ZeRO-2: the assignment moves, within the flip bound, settles when the
scores' schedule reaches 0, and every term is logged."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS, BOUND_FRAC, D_FF, E = 8, 0.1, 96, 4


@pytest.fixture(scope="module")
def tiny(tiny_llama_with_text):
    return tiny_llama_with_text


def _run(root, out, *extra):
    argv = ["--model", str(root / "llama"), "--data", str(root / "text"), "--eval_data", str(root / "held.txt"),
            "--output", str(out), "--num_experts", str(E), "--top_k", "2", "--seq_len", "32", "--batch_size", "2",
            "--calib_tokens", "512", "--eval_blocks", "4", "--cache_dir", str(root / "cache"), "--threads", "1",
            "--steps", str(STEPS), "--log_every", "2", "--checkpoint_every", "0", "--export", "false",
            "--partition", "random", "--beta", "0.5", "--scores_lr_scale", "30", "--scores_settle_frac", "0.75",
            "--recon_weight", "1", "--kd_weight", "0.5", "--max_flip_frac", str(BOUND_FRAC), "--trainable", "ffn",
            # every setting above is explicit; no recipe, so the flip check (a take-back counts as flips
            # too) is on only where a test asks for it
            "--recipe", "none", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "dotmoe_ds" / "train.py"), *argv], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(out / "tensorboard" / "dotmoe"), size_guidance={"scalars": 0}).Reload()


@pytest.mark.parametrize("config", ["z3", "z2"])
def test_assignment_moves_within_the_bound_and_settles(tiny, tmp_path, config):
    tb = _run(tiny, tmp_path / "run", "--deepspeed", str(ROOT / "ds_configs" / f"{config}.json"))
    values = lambda tag: [e.value for e in tb.Scalars(tag)]   # noqa: E731
    for tag in ("loss/total", "loss/ce", "loss/kd", "loss/recon", "loss/load_balance"):
        assert len(values(tag)) == STEPS, tag
    assert all(v > 0 for v in values("loss/recon")) and all(v > 0 for v in values("loss/kd"))
    lrs = values("assign/scores_lr")
    assert lrs[0] == pytest.approx(0.003 * 30) and lrs[-2:] == [0.0, 0.0]     # own schedule, no warmup
    bound = max(E, int(BOUND_FRAC * D_FF))
    per_layer = [values(f"assign/flips/layer_{i:02d}") for i in range(2)]
    assert sum(map(sum, per_layer)) > 0                                     # the assignment moved
    assert max(map(max, per_layer)) <= bound                                # never more than the bound
    assert [a + b for a, b in zip(*per_layer)] == values("assign/flips")
    assert all(f == 0 for layer in per_layer for f in layer[-2:])           # settled with lr 0
    assert 0 < values("assign/moved_from_start")[-1] <= 1


def test_gradient_checkpointing_changes_nothing_with_recon_and_learned_scores(tiny, tmp_path):
    """Recomputation in the backward pass must neither lose nor double the collected score gradients
    or the reconstruction term: the same losses, flips and scores' gradient norms with and without."""
    runs = {gc: _run(tiny, tmp_path / f"gc_{gc}", "--gradient_checkpointing", str(gc)) for gc in (False, True)}
    for tag in ("loss/total", "loss/recon", "assign/flips", "assign/scores_grad_norm"):
        a, b = ([e.value for e in runs[gc].Scalars(tag)] for gc in (False, True))
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), tag
    assert sum(e.value for e in runs[True].Scalars("assign/flips")) > 0


def test_flip_check_judges_flips_without_changing_anything_before_its_verdict(tiny, tmp_path):
    """--flip_check recon: every step logs how many layers' flips it took back; up to the first verdict
    (the step after the first flips) the run is the unchecked run exactly (the judging forward is
    gradient-free); and once the assignment settles nothing is left to judge."""
    plain = _run(tiny, tmp_path / "plain")
    checked = _run(tiny, tmp_path / "checked", "--flip_check", "recon")
    values = lambda tb, tag: [e.value for e in tb.Scalars(tag)]   # noqa: E731
    undone = values(checked, "assign/undone_layers")
    assert len(undone) == STEPS and all(u in (0.0, 1.0, 2.0) for u in undone)
    flips = values(plain, "assign/flips")
    first = next(i for i, f in enumerate(flips) if f > 0)          # index of the first step that flipped
    assert first < STEPS - 3
    n = first + 2                                                   # through the first verdict's step
    assert values(checked, "loss/total")[:n] == pytest.approx(values(plain, "loss/total")[:n], rel=1e-6)
    assert values(checked, "assign/flips")[:first + 1] == flips[:first + 1]
    assert undone[:first + 1] == [0.0] * (first + 1)
    settle = round(0.75 * STEPS)                                   # first step with scores lr 0 (0-based)
    assert undone[settle + 1:] == [0.0] * (STEPS - settle - 1)
