"""The trainer end to end with a shared, fine-grained budget (slow: one process, tiny Llama, ~1 min):
the budget flags resolve, DOT starts from importance + co-activation, and the export is a
Qwen2-MoE that reloads with AutoModelForCausalLM and places every neuron exactly once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_llama_with_shared_expert_trains_and_exports_qwen2_moe(tmp_path):
    from transformers import AutoModelForCausalLM

    from dotmoe_ds.tiny_models import save_tiny_model

    model_dir = save_tiny_model("llama", tmp_path / "tiny")
    text = (ROOT / "dotmoe_ds" / "demo_data" / "calibration" / "emma.txt").read_text()[:30000]
    (tmp_path / "train.txt").write_text(text)
    held = (ROOT / "dotmoe_ds" / "demo_data" / "heldout" / "persuasion.txt").read_text()[:8000]
    (tmp_path / "held.txt").write_text(held)
    out = tmp_path / "run"
    # tiny llama: d_ff 96 -> 32 shared + 16 x 4, k 8: (32 + 32) / 96 = 2/3 active
    cmd = [sys.executable, str(ROOT / "dotmoe_ds" / "train.py"), "--model", str(model_dir), "--data",
           str(tmp_path / "train.txt"), "--eval_data", str(tmp_path / "held.txt"), "--output", str(out),
           "--steps", "2", "--seq_len", "64", "--batch_size", "2", "--eval_blocks", "4", "--log_every", "1",
           "--shared_neurons", "32", "--expert_size", "4", "--active_fraction", "0.6666666666666666",
           "--calib_tokens", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DOTMOE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "budget: 32 shared + 16 x 4, top-8: 64 of 96 neurons active (66.7%)" in run.stdout
    saved = json.loads((out / "config.json").read_text())
    assert (saved["moe"]["num_experts"], saved["moe"]["top_k"]) == (16, 8)
    meta = json.loads((out / "model" / "dotmoe.json").read_text())
    assert meta["target_architecture"] == "Qwen2MoeForCausalLM" and meta["shared_neurons"] == 32
    assert meta["expert_intermediate_size"] == 8   # 4 neurons padded to 8
    for layer in meta["layers"]:
        assert sorted(layer["shared"] + [j for e in layer["experts"] for j in e]) == list(range(96))
    moe = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(moe(torch.tensor([[5, 6, 7, 8]])).logits).all()
