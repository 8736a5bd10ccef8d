"""--teacher original (reference.py; the default is trained): while the FFN weights train, 'dense' mode
and the reconstruction target stay the original model; the copy never trains, is never exported, and
the memory plan counts it. The trainer end to end: the dense row of results.json is the original
model's perplexity."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dotmoe_ds import runframe, train
from dotmoe_ds.baselines import PrunedFFN
from dotmoe_ds.config import ConfigError, RunConfig, parse_args
from dotmoe_ds.data import prepare_data
from dotmoe_ds.evaluate import perplexity
from dotmoe_ds.export import export_moe
from dotmoe_ds.families import adapter_for
from dotmoe_ds.layer import DotMoEFFN
from dotmoe_ds.objectives import relative_reconstruction_error
from dotmoe_ds.plan import PlanError, plan_memory
from dotmoe_ds.spec import MoESpec
from dotmoe_ds.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
FP32 = torch.float32


def _layer(seed=0, top_k=2):
    torch.manual_seed(seed)
    d, d_ff, spec = 16, 24, MoESpec.uniform(24, 4, top_k)
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)   # noqa: E731
    return DotMoEFFN(lin(d, d_ff), lin(d, d_ff), lin(d_ff, d), F.silu, spec, init_assignment=torch.arange(d_ff) % 4,
                     router_weight=torch.randn(4, d), beta=1.0, mode="ste").train()


def _swiglu(x, lin):
    g, u, d = lin
    return F.silu(x @ g.T) * (x @ u.T) @ d.T


@torch.no_grad()
def _train_weights(layer, seed=1):
    """What an optimizer step does to the FFN weights, in one go."""
    gen = torch.Generator().manual_seed(seed)
    for lin in (layer.gate_proj, layer.up_proj, layer.down_proj):
        lin.weight.add_(0.3 * torch.randn(lin.weight.shape, generator=gen))


@pytest.mark.parametrize("kind", ["dot", "prune"])
def test_dense_mode_stays_the_original_mlp_while_the_weights_train(kind):
    layer = _layer()
    if kind == "prune":
        layer = PrunedFFN(layer.gate_proj, layer.up_proj, layer.down_proj, F.silu)
    original = [lin.weight.detach().clone() for lin in (layer.gate_proj, layer.up_proj, layer.down_proj)]
    x = torch.randn(2, 5, 16)
    train.attach_references([layer], {}, FP32)
    layer.mode = "dense"
    before = layer(x)
    assert torch.allclose(before, _swiglu(x, original), atol=1e-6)
    _train_weights(layer)
    # the layer's own weights moved; its dense mode did not
    assert torch.equal(layer(x), before)
    # without the copy (--teacher trained) the dense mode is the trained weights
    layer.reference = None
    trained = [lin.weight for lin in (layer.gate_proj, layer.up_proj, layer.down_proj)]
    assert torch.allclose(layer(x), _swiglu(x, trained), atol=1e-6)
    assert (layer(x) - before).abs().max() > 0.1


def test_reconstruction_target_is_the_original_and_the_copy_gets_no_gradient():
    """k = E, gates all 1: the MoE is its own weights' dense FFN, so the term is the relative error of
    the trained weights against the original ones (0 before training), computed independently."""
    layer = _layer(top_k=4)
    with torch.no_grad():
        layer.router.weight.zero_()
    original = [lin.weight.detach().clone() for lin in (layer.gate_proj, layer.up_proj, layer.down_proj)]
    train.attach_references([layer], {}, FP32)
    layer.recon = True
    x = torch.randn(3, 4, 16)
    layer(x)
    assert layer.last_recon.item() < 1e-10
    _train_weights(layer)
    y = layer(x)
    trained = [lin.weight.detach() for lin in (layer.gate_proj, layer.up_proj, layer.down_proj)]
    want = relative_reconstruction_error(_swiglu(x, trained), _swiglu(x, original))
    assert want > 0.05
    assert layer.last_recon.item() == pytest.approx(want.item(), rel=1e-5)
    (y.sum() + layer.last_recon).backward()
    assert layer.gate_proj.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in layer.reference.parameters())


def _trainable_cfg(trainable, teacher="original"):
    """A config with --teacher given (the default, trained, is checked by its own test)."""
    return parse_args(["--model", "m", "--data", "d", "--recipe", "none", "--trainable", trainable,
                       "--teacher", teacher])


@pytest.mark.parametrize("method", ["dot", "prune"])
def test_select_trainable_never_trains_the_copy(method):
    model = tiny_model("llama", seed=0).float()
    spec_of = lambda d_ff: MoESpec.uniform(d_ff, 4, 2)   # noqa: E731
    make = PrunedFFN.wrap if method == "prune" else (
        lambda i, g, u, d, act: DotMoEFFN(g, u, d, act, spec_of(g.out_features), mode="dense"))
    layers = adapter_for(model.config).swap_in(model, make)
    cfg = _trainable_cfg("all")
    cfg.moe.method = method
    assert train.keeps_reference(cfg)
    train.attach_references(layers, {}, FP32)
    groups = train.select_trainable(model, layers, cfg, 1e-3)
    in_groups = {id(p) for g in groups for p in g["params"]}
    copies = [p for layer in layers for p in layer.reference.parameters()]
    assert copies and not any(p.requires_grad or id(p) in in_groups for p in copies)
    assert layers[0].gate_proj.weight.requires_grad and id(layers[0].gate_proj.weight) in in_groups


def test_the_default_teacher_is_the_trained_weights():
    cfg = parse_args(["--model", "m", "--data", "d", "--recipe", "none", "--trainable", "ffn"])
    assert cfg.objective.teacher == "trained" and not train.keeps_reference(cfg)
    assert "frozen FFN copy (teacher)" not in {t.name for t in plan_memory(
        "llama-3-70b", nodes=2, gpus_per_node=8, gpu_memory_gb=80, trainable="ffn").terms}


def test_which_runs_keep_a_copy_and_what_their_dense_row_is():
    assert not train.keeps_reference(_trainable_cfg("assignment"))
    assert train.keeps_reference(_trainable_cfg("ffn"))
    assert not train.keeps_reference(_trainable_cfg("ffn", "trained"))
    assert train.dense_weights(_trainable_cfg("assignment")) == "original"
    assert train.dense_weights(_trainable_cfg("ffn")) == "original"
    assert train.dense_weights(_trainable_cfg("ffn", "trained")) == "trained"
    assert train.dense_weights(_trainable_cfg("all")) == "original FFN, trained attention and embeddings"
    with pytest.raises(ConfigError, match="--teacher must be one of original, trained"):
        _trainable_cfg("ffn", "frozen")


def test_a_config_from_before_the_flag_reloads_as_the_trained_teacher(tmp_path):
    """A run written before --teacher existed had the trained weights as its teacher; resuming it must
    keep them (and compare equal to a command line that says so)."""
    cfg = _trainable_cfg("ffn")
    raw = cfg.to_dict()
    del raw["objective"]["teacher"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert RunConfig.load(tmp_path / "config.json").objective.teacher == "trained"
    cfg.save(tmp_path / "new.json")
    assert RunConfig.load(tmp_path / "new.json").objective.teacher == "original"
    assert "teacher" in train.RESUME_KEYS


def test_export_never_writes_the_copy(tmp_path):
    model = tiny_model("llama", seed=2).float()
    adapter = adapter_for(model.config)
    spec = MoESpec.uniform(model.config.intermediate_size, 4, 2)
    layers = adapter.swap_in(model, lambda i, g, u, d, act: DotMoEFFN(
        g, u, d, act, spec, init_assignment=torch.arange(g.out_features) % 4, mode="hard"))
    plain = export_moe(model, adapter, spec, tmp_path / "plain")
    train.attach_references(layers, {}, FP32)
    with_copy = export_moe(model, adapter, spec, tmp_path / "copy")
    assert with_copy.params.to_dict() == plain.params.to_dict()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=FP32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=FP32).state_dict()
    assert a.keys() == b.keys() and not any("reference" in k for k in b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_plan_counts_the_copy():
    kw = dict(nodes=2, gpus_per_node=8, gpu_memory_gb=80, num_experts=8, top_k=2, seq_len=4096)
    terms = lambda **more: {t.name: t.bytes for t in plan_memory("llama-3-70b", **kw, **more).terms}  # noqa: E731
    ffn, trained, frozen = terms(trainable="ffn", teacher="original"), terms(trainable="ffn"), terms()
    d, f, L = 8192, 28672, 80
    assert ffn["frozen FFN copy (teacher)"] == pytest.approx(L * 3 * d * f * 2 / 16)   # bf16, sharded over 16
    assert "frozen FFN copy (teacher)" not in trained and "frozen FFN copy (teacher)" not in frozen
    assert ffn["gathered params (ZeRO-3)"] > trained["gathered params (ZeRO-3)"]
    with pytest.raises(PlanError, match="teacher"):
        plan_memory("llama-3-70b", **kw, teacher="student")


# ---------------------------------------------------------------------- the trainer end to end

def _train(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "dotmoe_ds" / "train.py"), *argv], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_trainer_dense_row_is_the_original_model(tiny_llama_with_text, tmp_path):
    """DOT with its FFN weights trained under distillation and reconstruction: the dense row is the
    source model's held-out perplexity (computed independently); with --teacher trained it is not."""
    root = tiny_llama_with_text
    common = ["--model", str(root / "llama"), "--data", str(root / "text"), "--eval_data", str(root / "held.txt"),
              "--num_experts", "4", "--top_k", "2", "--seq_len", "32", "--batch_size", "2", "--calib_tokens", "512",
              "--eval_blocks", "6", "--cache_dir", str(root / "cache"), "--threads", "1", "--recipe", "none",
              "--trainable", "ffn", "--weights_lr_scale", "3", "--kd_weight", "1", "--recon_weight", "1",
              "--steps", "3", "--checkpoint_every", "0"]
    res = {}
    for teacher in ("original", "trained"):
        out = tmp_path / teacher
        _train([*common, "--output", str(out), "--teacher", teacher])
        res[teacher] = json.loads((out / "results.json").read_text())
        assert json.loads((out / "config.json").read_text())["objective"]["teacher"] == teacher
    cfg = parse_args([*common, "--output", str(tmp_path / "x")])
    packed = prepare_data(runframe.data_config(cfg), AutoTokenizer.from_pretrained(root / "llama"), 256)
    source = AutoModelForCausalLM.from_pretrained(root / "llama", dtype=FP32)
    want = perplexity(source, packed.eval, batch_size=4, max_blocks=6).ppl
    assert res["original"]["dense_weights"] == "original" and res["trained"]["dense_weights"] == "trained"
    assert res["original"]["dense"]["perplexity"] == pytest.approx(want, rel=1e-5)
    assert abs(res["trained"]["dense"]["perplexity"] / want - 1) > 1e-3
