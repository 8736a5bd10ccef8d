"""The prune baseline (importance, slicing, PrunedFFN, dense export) and the method registry; one
end-to-end `--method prune` trainer run. Every registry method through the trainer is slow."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dotmoe_ds import baselines, runframe
from dotmoe_ds.baselines import PrunedFFN, choose_kept, kept_count, neuron_importance
from dotmoe_ds.config import parse_args
from dotmoe_ds.data import prepare_data
from dotmoe_ds.evaluate import perplexity
from dotmoe_ds.families import adapter_for
from dotmoe_ds.partition import activation_importance
from dotmoe_ds.spec import MoESpec
from dotmoe_ds.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _train(argv: list[str]) -> None:
    """One trainer run in its own process (DeepSpeed caches process groups across runs in one process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "dotmoe_ds" / "train.py"), *argv], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]


# ---------------------------------------------------------------------- the math

def test_kept_count_is_the_active_share_of_the_budget():
    for d_ff, E, k, shared in ((96, 4, 2, 0), (1536, 8, 4, 0), (128, 4, 1, 32), (100, 3, 2, 0), (14336, 16, 3, 0)):
        spec = MoESpec.uniform(d_ff, E, k, shared)
        assert kept_count(spec) == math.floor(spec.active_fraction * d_ff + 0.5)
    assert kept_count(MoESpec.uniform(96, 4, 2)) == 48
    assert kept_count(MoESpec.uniform(128, 4, 1, shared=32)) == 32 + 24
    assert kept_count(MoESpec.uniform(100, 3, 2)) == 67          # 2 * 100 / 3 = 66.67
    assert kept_count(MoESpec.uniform(8, 8, 8)) == 8


def test_importance_orders_neurons_on_a_constructed_case():
    torch.manual_seed(0)
    d, d_ff, T = 8, 12, 40
    x = torch.randn(T, d)
    row = torch.randn(d)
    gate = row.repeat(d_ff, 1)
    scale = torch.randperm(d_ff).float() + 1          # |h_j| = scale_j * |h|: importance order = scale order
    up = row[None] * scale[:, None]
    down = torch.randn(d, 1).repeat(1, d_ff)           # equal column norms
    imp = neuron_importance(x, gate, up, down, torch.nn.functional.silu)
    assert torch.equal(torch.argsort(imp, descending=True), torch.argsort(scale, descending=True))
    assert torch.equal(choose_kept(imp, 5), torch.argsort(scale, descending=True)[:5].sort().values)
    # Down-column norms weigh in the same way: equal activations, norms 1..d_ff.
    imp2 = neuron_importance(x, gate, gate.clone(), torch.randn(d, 1) * torch.arange(1., d_ff + 1)[None], torch.tanh)
    assert torch.equal(choose_kept(imp2, 4), torch.arange(d_ff - 4, d_ff))


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_importance_equals_partitions_activation_importance(p):
    torch.manual_seed(1)
    d, d_ff, T = 16, 24, 300
    x, g, u, dn = torch.randn(T, d), torch.randn(d_ff, d), torch.randn(d_ff, d), torch.randn(d, d_ff)
    h = torch.nn.functional.silu(x @ g.T) * (x @ u.T)
    ours = neuron_importance(x, g, u, dn, torch.nn.functional.silu, p=p, chunk=64)   # chunked
    assert torch.allclose(ours, activation_importance(h, dn, p=p), rtol=1e-5, atol=1e-6)


def test_choose_kept_breaks_ties_by_index_and_checks_its_input():
    assert choose_kept(torch.tensor([1., 3., 3., 2., 3.]), 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="between 1 and"):
        choose_kept(torch.ones(4), 5)


# ---------------------------------------------------------------------- PrunedFFN and the export

def _prune(model, kept_per_layer: int, seed: int = 0):
    adapter = adapter_for(model.config)
    layers = adapter.swap_in(model, PrunedFFN.wrap)
    gen = torch.Generator().manual_seed(seed)
    for layer in layers:
        layer.set_kept(torch.randperm(layer.d_ff, generator=gen)[:kept_per_layer])
    return adapter, layers


def test_keeping_every_neuron_is_the_dense_model():
    dense = tiny_model("qwen3", seed=3)
    ids = torch.randint(0, dense.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    _, layers = _prune(dense, dense.config.intermediate_size)
    assert all(layer.mode == "hard" and layer.kept_count == layer.d_ff for layer in layers)
    with torch.no_grad():
        assert torch.equal(dense(input_ids=ids).logits, ref)


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2"])
def test_pruned_export_reloads_with_the_stated_size_and_logits(family, tmp_path):
    model = tiny_model(family, seed=1)
    cfg = model.config
    d_ff, d, L = cfg.intermediate_size, cfg.hidden_size, cfg.num_hidden_layers
    spec = MoESpec.uniform(d_ff, 4, 2)
    kept = kept_count(spec)
    dense_params = sum(p.numel() for p in model.parameters())
    adapter, layers = _prune(model, kept)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        baselines.set_mode(model, "dense")
        assert torch.allclose(model(input_ids=ids).logits, tiny_model(family, seed=1)(input_ids=ids).logits)
        baselines.set_mode(model, "hard")
    res = baselines.export_pruned(model, adapter, spec, tmp_path / "out", command="test")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back) is type(model) and back.config.intermediate_size == kept
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ours).abs().max() <= 1e-4
    expected = dense_params - L * (d_ff - kept) * 3 * d          # independent of the exporter
    assert sum(p.numel() for p in back.parameters()) == expected
    assert res.params.total == res.params.active == res.params.stored == expected
    assert res.params.dense == dense_params
    meta = json.loads((tmp_path / "out" / "dotmoe.json").read_text())
    assert meta["method"] == "prune" and meta["kept_neurons"] == kept and meta["active_ffn_fraction"] == 0.5
    assert [m["kept"] for m in meta["layers"]] == [layer.kept_neurons().tolist() for layer in layers]


def test_export_refuses_layers_of_different_widths(tmp_path):
    model = tiny_model("llama")
    adapter, layers = _prune(model, 48)
    layers[1].set_kept(torch.arange(40))
    with pytest.raises(Exception, match="different numbers of neurons"):
        baselines.export_pruned(model, adapter, MoESpec.uniform(96, 4, 2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_masked_neurons_get_no_gradient():
    model = tiny_model("llama")
    _, layers = _prune(model, 48)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in layers:
        dropped = ~layer.keep_mask
        assert layer.gate_proj.weight.grad[dropped].abs().max() == 0
        assert layer.up_proj.weight.grad[dropped].abs().max() == 0
        assert layer.down_proj.weight.grad[:, dropped].abs().max() == 0
        assert layer.gate_proj.weight.grad[~dropped].abs().max() > 0


# ---------------------------------------------------------------------- registry

def test_registry_names_and_flags_parse_to_the_intended_runs():
    reg = baselines.describe_methods()
    assert list(reg) == ["dot", "random", "cluster", "prune", "dot_no_sinkhorn", "dot_no_routing_ste",
                         "dot_random_init"]
    # under the default recipe (a shared expert), DOT and its ablations start from co-activation
    expect = {"dot": ("dot", "sinkhorn", True, "coactivation"), "random": ("random", "sinkhorn", True, "random"),
              "cluster": ("cluster", "sinkhorn", True, "kmeans"), "prune": ("prune", "sinkhorn", True, "importance"),
              "dot_no_sinkhorn": ("dot", "softmax", True, "coactivation"),
              "dot_no_routing_ste": ("dot", "sinkhorn", False, "coactivation"),
              "dot_random_init": ("dot", "sinkhorn", True, "random")}
    for name, run in reg.items():
        cfg = parse_args(baselines.method_argv(name))
        assert (cfg.moe.method, cfg.moe.assigner, cfg.moe.routing_ste, cfg.partition) == expect[name], name
        assert run.exports == ("dense" if name == "prune" else "moe")
    with pytest.raises(KeyError, match="known: dot"):
        baselines.method_argv("magic")


# ---------------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def tiny(tiny_llama_with_text):
    return tiny_llama_with_text


def _argv(root, out, *extra):
    return ["--model", str(root / "llama"), "--data", str(root / "text"), "--eval_data", str(root / "held.txt"),
            "--output", str(out), "--num_experts", "4", "--top_k", "2", "--seq_len", "32", "--batch_size", "2",
            "--calib_tokens", "512", "--eval_blocks", "6", "--cache_dir", str(root / "cache"), "--threads", "1",
            *extra]


def _dense_importance_choice(root, argv, kept):
    """The kept neurons computed independently: MLP inputs of the dense model on the calibration
    blocks, partition.activation_importance (p=2), top `kept`."""
    cfg = parse_args(argv)
    dense = AutoModelForCausalLM.from_pretrained(root / "llama", dtype=torch.float32).eval()
    packed = prepare_data(runframe.data_config(cfg), AutoTokenizer.from_pretrained(root / "llama"), 256)
    calib = torch.from_numpy(packed.train[: -(-cfg.moe.calib_tokens // cfg.data.seq_len)].astype("int64"))
    hs = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, a, i=i: hs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])[: cfg.moe.calib_tokens]))
        for i, layer in enumerate(dense.model.layers)]
    with torch.no_grad():
        dense(input_ids=calib)
    for h in hooks:
        h.remove()
    return [torch.topk(activation_importance(hs[i], layer.mlp.down_proj.weight, p=2), kept).indices.sort().values
            for i, layer in enumerate(dense.model.layers)], packed


def test_trainer_prune_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    argv = _argv(tiny, out, "--method", "prune", "--trainable", "ffn", "--steps", "2")
    _train(argv)
    res = json.loads((out / "results.json").read_text())
    for key in ("method", "budget", "dense", "converted", "retention", "export", "final_train_loss", "steps"):
        assert key in res
    assert res["method"] == "prune" and res["steps"] == 2 and res["pruned"]["kept_neurons"] == 48
    assert res["retention"] == pytest.approx(res["dense"]["perplexity"] / res["converted"]["perplexity"])
    meta = json.loads((out / "model" / "dotmoe.json").read_text())
    # The trainer kept exactly the neurons the criterion picks on the dense model (before training).
    expected, packed = _dense_importance_choice(tiny, argv, 48)
    assert [m["kept"] for m in meta["layers"]] == [e.tolist() for e in expected]
    back = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert back.config.intermediate_size == 48
    assert sum(p.numel() for p in back.parameters()) == res["export"]["params"]["total"]
    # The exported model is the model the trainer evaluated: the same held-out perplexity.
    ppl = perplexity(back, packed.eval, batch_size=4, max_blocks=6)
    assert ppl.ppl == pytest.approx(res["converted"]["perplexity"], rel=1e-5)
    # Fine-tuned: the kept weights moved, so the export differs from slicing the source model.
    src = AutoModelForCausalLM.from_pretrained(tiny / "llama", dtype=torch.float32)
    kept0 = torch.tensor(meta["layers"][0]["kept"])
    assert not torch.equal(back.model.layers[0].mlp.up_proj.weight, src.model.layers[0].mlp.up_proj.weight[kept0])


def test_trainer_prune_without_training_trains_nothing(tiny, tmp_path):
    out = tmp_path / "run"
    _train(_argv(tiny, out, "--method", "prune", "--steps", "3", "--trainable", "assignment"))
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 0 and res["final_train_loss"] is None and not (out / "checkpoints").exists()
    back = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    src = AutoModelForCausalLM.from_pretrained(tiny / "llama", dtype=torch.float32)
    for i, m in enumerate(json.loads((out / "model" / "dotmoe.json").read_text())["layers"]):
        kept = torch.tensor(m["kept"])
        assert torch.equal(back.model.layers[i].mlp.down_proj.weight, src.model.layers[i].mlp.down_proj.weight[:, kept])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(baselines.describe_methods()) + ["prune_zero2"])
def test_every_registry_method_exports_a_capacity_exact_loadable_model(tiny, tmp_path, name):
    extra = ["--deepspeed", str(ROOT / "ds_configs" / "z2.json")] if name == "prune_zero2" else []
    method = "prune" if name == "prune_zero2" else name
    out = tmp_path / "run"
    argv = _argv(tiny, out, *baselines.method_argv(method), "--trainable", "ffn", "--steps", "2", *extra)
    _train(argv)
    meta = json.loads((out / "model" / "dotmoe.json").read_text())
    res = json.loads((out / "results.json").read_text())
    spec = MoESpec.uniform(96, 4, 2)
    back = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(back(input_ids=torch.arange(20)[None]).logits).all()
    assert sum(p.numel() for p in back.parameters()) == res["export"]["params"]["stored"]
    if method == "prune":
        assert meta["active_ffn_fraction"] == spec.active_fraction and back.config.intermediate_size == 48
        assert all(len(m["kept"]) == 48 for m in meta["layers"])
    else:
        assert meta["active_ffn_fraction"] == spec.active_fraction and meta["method"] == parse_args(argv).moe.method
        for m in meta["layers"]:
            assert [len(e) for e in m["experts"]] == list(spec.capacities)
            assert sorted(j for e in m["experts"] for j in e) == list(range(96))
