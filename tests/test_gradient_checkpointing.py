"""--gradient_checkpointing recomputes layers in the backward pass and must change nothing else."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    tiny = tmp_path / "tiny"
    subprocess.run([sys.executable, str(REPO / "tools/make_tiny_model.py"), "--family", "llama",
                    "--output_dir", str(tiny)], check=True, capture_output=True)
    results = {}
    for gc in (False, True):
        out = tmp_path / f"out_{gc}"
        proc = subprocess.run(
            [sys.executable, str(REPO / "dotmoe_ds/train.py"), "--model", str(tiny), "--output", str(out),
             "--steps", "4", "--seq_len", "32", "--batch_size", "2", "--num_experts", "4", "--top_k", "2",
             "--gradient_checkpointing", str(gc), "--checkpoint_every", "100", "--eval_blocks", "4",
             "--threads", "1"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[gc] = json.loads((out / "results.json").read_text())
        assert json.loads((out / "config.json").read_text())["train"]["gradient_checkpointing"] is gc
    assert results[True]["converted"]["mean_nll"] == pytest.approx(results[False]["converted"]["mean_nll"], abs=1e-6)
    a = json.loads((tmp_path / "out_False/model/dotmoe.json").read_text())["layers"]
    b = json.loads((tmp_path / "out_True/model/dotmoe.json").read_text())["layers"]
    assert a == b
