import os

# Before torch loads OpenMP: waiting threads sleep instead of spinning. With several processes on
# 2 cores (multi-rank tests, subprocess runs), spinning made small matrix products ~100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: more threads than that only adds contention; multi-process tests set their own.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Fail the test if anything past preflight starts (process group, data, model)."""
    from dotmoe_ds import runframe, train

    def forbidden(*a, **k):
        raise AssertionError("expensive work started before the input was checked")
    monkeypatch.setattr(train.dist, "init_distributed", forbidden)
    monkeypatch.setattr(runframe, "prepare_data", forbidden)
    monkeypatch.setattr(train, "build_model", forbidden)


@pytest.fixture(scope="module")
def tiny_llama_with_text(tmp_path_factory):
    """A folder with a tiny llama (`llama/`), 20k characters of Emma as training text (`text/a.txt`)
    and 6k other characters of it as held-out text (`held.txt`): the trainer's smallest real run."""
    from pathlib import Path

    from dotmoe_ds.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_model("llama", root / "llama")
    text = (Path(__file__).resolve().parents[1] / "dotmoe_ds" / "demo_data" / "calibration" / "emma.txt").read_text()
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text(text[:20000])
    (root / "held.txt").write_text(text[30000:36000])
    return root
