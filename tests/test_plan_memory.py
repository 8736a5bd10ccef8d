"""The memory planner (dotmoe_ds/plan.py, CLI tools/plan_memory.py): its arithmetic, checked three ways.

- parameter counts equal those of the real transformers models (built on the meta device);
- every term of a small plan equals a number worked out by hand from the documented formulas;
- the per-layer activation formula equals the bytes autograd really saves (saved-tensor hooks).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

REPO = Path(__file__).resolve().parents[1]

import dotmoe_ds.plan as pm  # noqa: E402
from dotmoe_ds.layer import DotMoEFFN  # noqa: E402
from dotmoe_ds.spec import MoESpec  # noqa: E402

GiB = 1024 ** 3
SMALL = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
SMALL_DS = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 500,
                                  "stage3_max_live_parameters": 10000, "stage3_param_persistence_threshold": 100},
            "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2}


def _meta_param_count(cfg: dict) -> int:
    config = AutoConfig.for_model(**{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **cfg})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", sorted(pm.PRESETS))
def test_preset_parameter_counts_equal_transformers(preset):
    assert pm.load_model_shape(preset).total_params == _meta_param_count(pm.PRESETS[preset])


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            tie_word_embeddings=False)


@pytest.mark.parametrize("cfg", [
    dict(model_type="qwen2", intermediate_size=96),                              # q/k/v biases
    dict(model_type="qwen3", intermediate_size=96, head_dim=32),                 # per-head q/k norms
    dict(model_type="olmo2", intermediate_size=96),                              # full-width q/k norms
    dict(model_type="mistral", intermediate_size=96, tie_word_embeddings=True),  # tied head
    dict(model_type="mixtral", intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
    dict(model_type="qwen2_moe", intermediate_size=100, moe_intermediate_size=96, num_experts=4,
         num_experts_per_tok=2, shared_expert_intermediate_size=64),
    dict(model_type="qwen3_moe", moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2, head_dim=32),
    dict(model_type="flex_olmo", intermediate_size=96, num_experts=4, num_experts_per_tok=2),
], ids=lambda c: c["model_type"])
def test_family_parameter_counts_equal_transformers(cfg):
    cfg = {**TINY, **cfg}
    assert pm.load_model_shape(cfg).total_params == _meta_param_count(cfg)


def test_small_plan_every_term_by_hand():
    """W = 2 ranks, ZeRO-3 bf16 (a = 2), E = 4, k = 2, t = 2 x 32 = 64 tokens, checkpointing on."""
    plan = pm.plan_memory(SMALL, nodes=2, gpus_per_node=1, gpu_memory_gb=1, ds_config=SMALL_DS, num_experts=4,
                          top_k=2, seq_len=32, runtime_gb=0.5)
    W, a, t, d, f, V, L, E, k = 2, 2, 64, 64, 128, 512, 2, 4, 2
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64         # q, o; k, v; mlp; 2 norms = 36992
    assert plan.model.total_params == 2 * layer + 2 * 512 * 64 + 64 == 139584
    # norms (64 < persistence threshold 100) stay whole on each rank; everything else is halved
    persistent = 2 * 2 * 64 + 64
    expected = {
        "model weights": a * ((139584 - persistent) / W + persistent),
        "DOT-MoE scores + router": L * (f * E * 4 + E * d * a) / W,      # scores fp32, router bf16, both >= 100
        "gathered params (ZeRO-3)": a * ((layer + f * E + E * d) + 500),  # the layer beats max_live=10000
        "gradients": (L * (f * E + E * d)) * (a + 4) / W,
        "gradient reduce bucket": 1000 * a,
        "optimizer state": 12 * (L * (f * E + E * d)) / W,
        "activations (checkpointed)": L * a * t * d,
        "logits + loss": (a + 12) * t * V,
        "Sinkhorn working set": 4 * 4 * f * E,
        "runtime": 0.5 * GiB,
    }
    norms = 2 * (4 * t * d + 4 * t)
    attention = a * t * (2 * 64 + 2 * 32) + 4 * t * 4
    mlp = 5 * a * t * f + a * t * d + 20 * t * E + 12 * t * k + 8 * t + 4 * E + 2 * 4 * f * E
    per_layer = norms + attention + mlp
    assert per_layer == 160272
    expected["layer working set"] = per_layer + 4 * t * f + 3 * a * t * f + 2 * a * t * d
    assert {term.name: term.bytes for term in plan.terms} == pytest.approx(expected, rel=1e-12)
    assert plan.total_bytes == pytest.approx(sum(expected.values()))
    assert plan.fits and plan.usable_bytes == pytest.approx(0.9 * GiB)


def _saved_bytes(trainable: str, dtype: torch.dtype, dot: bool = True, recon: bool = False) -> tuple[int, float]:
    """Bytes autograd saves in one Llama decoder layer (measured) and what the planner says; `recon`:
    the layer also computes its reconstruction term (--recon_weight > 0)."""
    d, f, h, kv, s, E, k = 128, 256, 4, 2, 48, 4, 2
    cfg = LlamaConfig(hidden_size=d, intermediate_size=f, num_attention_heads=h, num_key_value_heads=kv,
                      num_hidden_layers=1, vocab_size=100)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).to(dtype)
    if dot:
        m = layer.mlp
        layer.mlp = DotMoEFFN(m.gate_proj, m.up_proj, m.down_proj, m.act_fn, MoESpec.uniform(f, E, k),
                              init_assignment=torch.arange(f) % E, router_weight=0.01 * torch.randn(E, d, dtype=dtype))
        layer.mlp.recon = recon
    layer.train()
    for name, p in layer.named_parameters():
        p.requires_grad_(trainable == "all" or (trainable == "ffn" and ".mlp." in f".{name}")
                         or name.endswith(("scores", "router.weight")))
    x = torch.randn(1, s, d, dtype=dtype, requires_grad=True)
    pos = torch.arange(s)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    # parameters and the shared rotary tables are not activations; the layer input is counted by
    # the planner only where the layer keeps it itself (fp32: the norm's fp32 "copy" is the input)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    skip |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    if dtype != torch.float32:
        skip.add(x.untyped_storage().data_ptr())
    measured = sum(n for ptr, n in storages.items() if ptr not in skip)
    shape = pm.ModelShape.from_config({**SMALL, "hidden_size": d, "intermediate_size": f, "num_hidden_layers": 1})
    planned = pm.layer_activation_bytes(shape, s, dtype.itemsize, trainable=trainable, columns=E if dot else 0,
                                        experts=E, top_k=k, recon=recon)
    return measured, planned


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("trainable", pm.TRAINABLE)
def test_layer_activations_equal_what_autograd_saves(trainable, dtype):
    measured, planned = _saved_bytes(trainable, dtype)
    assert planned == measured


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("trainable", pm.TRAINABLE)
def test_reconstruction_term_activations_equal_what_autograd_saves(trainable, dtype):
    measured, planned = _saved_bytes(trainable, dtype, recon=True)
    assert planned == measured
    assert planned > _saved_bytes(trainable, dtype)[1]      # the term keeps something of its own


def test_dense_layer_activations_equal_what_autograd_saves():
    measured, planned = _saved_bytes("all", torch.bfloat16, dot=False)
    assert planned == measured


def test_shipped_deepspeed_configs_are_read():
    z3 = pm.DeepSpeedSettings.from_json(REPO / "ds_configs" / "z3.json")
    off = pm.DeepSpeedSettings.from_json(REPO / "ds_configs" / "z3_offload.json")
    assert (z3.zero_stage, z3.offload_param, z3.offload_optimizer) == (3, "none", "none")
    assert (off.offload_param, off.offload_optimizer) == ("cpu", "cpu")
    # bf16 "auto": the trainer's choice, bf16 on GPU and fp32 on CPU
    assert z3.resolved(64, "gpu").dtype == "bf16" and z3.resolved(64, "cpu").dtype == "fp32"
    assert z3.resolved(64).reduce_bucket_size == 5e7
    auto = pm.DeepSpeedSettings.from_dict({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})
    assert auto.resolved(64).reduce_bucket_size == 64 * 64     # transformers' rule: hidden^2
    assert auto.resolved(64).prefetch_bucket_size == 5e7       # absent: DeepSpeed's default


def test_offload_moves_weights_and_optimizer_off_the_gpu():
    kw = dict(nodes=2, gpus_per_node=1, gpu_memory_gb=1, num_experts=4, top_k=2, seq_len=32, trainable="all")
    on = pm.plan_memory(SMALL, ds_config=SMALL_DS, **kw)
    zero = dict(SMALL_DS["zero_optimization"], offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"})
    off = pm.plan_memory(SMALL, ds_config={**SMALL_DS, "zero_optimization": zero}, **kw)
    assert off.term("optimizer state").bytes == 0 < on.term("optimizer state").bytes
    assert off.term("model weights").bytes == 2 * (2 * 2 * 64 + 64)    # only the persistent norms stay
    assert off.term("gathered params (ZeRO-3)").bytes == on.term("gathered params (ZeRO-3)").bytes


def test_offload_keeps_persistent_tensors_of_the_frozen_ffn_copy_on_the_gpu():
    kw = dict(nodes=1, gpus_per_node=2, gpu_memory_gb=1, num_experts=4, top_k=2, seq_len=32, trainable="ffn",
              teacher="original")
    zero = dict(SMALL_DS["zero_optimization"], offload_param={"device": "cpu"})
    # d x f = 64 x 128 = 8192 elements per FFN matrix: sharded and offloaded at threshold 100, persistent at 10000
    small = pm.plan_memory(SMALL, ds_config={**SMALL_DS, "zero_optimization": zero}, **kw)
    assert small.term("frozen FFN copy (teacher)").bytes == 0
    persistent = dict(zero, stage3_param_persistence_threshold=10000)
    big = pm.plan_memory(SMALL, ds_config={**SMALL_DS, "zero_optimization": persistent}, **kw)
    assert big.term("frozen FFN copy (teacher)").bytes == 2 * 3 * 64 * 128 * 2       # layers x 3 x d x f x bf16


def test_zero3_shards_weights_over_ranks():
    def weights(nodes):
        return pm.plan_memory("llama-3-70b", nodes=nodes, gpus_per_node=8, gpu_memory_gb=80,
                              ds_config=REPO / "ds_configs" / "z3.json").term("model weights").bytes
    # all but the small (< 1e5 elements) tensors are sharded: doubling the ranks halves the rest
    small = 2 * (80 * 2 * 8192 + 8192)
    assert weights(4) - small == pytest.approx(2 * (weights(8) - small))


def test_llama3_70b_on_64_h100s():
    kw = dict(nodes=8, gpus_per_node=8, gpu_memory_gb=80, ds_config=REPO / "ds_configs" / "z3.json",
              num_experts=8, top_k=4, seq_len=4096, micro_batch=1)
    plan = pm.plan_memory("meta-llama/Meta-Llama-3-70B", **kw)
    assert plan.fits
    norms = 80 * 2 * 8192 + 8192          # below the persistence threshold: whole on every rank
    assert plan.term("model weights").bytes == pytest.approx(2 * ((70553706496 - norms) / 64 + norms))
    assert plan.term("logits + loss").bytes == 14 * 4096 * 128256
    no_ckpt = pm.plan_memory("llama-3-70b", activation_checkpointing=False, **kw)
    assert not no_ckpt.fits
    assert no_ckpt.biggest.name == "activations (stored)"
    assert "activation checkpointing" in no_ckpt.refusal()


def test_bad_inputs_are_named():
    base = dict(nodes=1, gpus_per_node=2, gpu_memory_gb=80, seq_len=128)
    with pytest.raises(pm.PlanError, match="top_k=9 must be between 1 and num_experts=8"):
        pm.plan_memory(SMALL, num_experts=8, top_k=9, **base)
    with pytest.raises(pm.PlanError, match="cannot find a model config for 'no-such-model'.*llama-3-70b"):
        pm.plan_memory("no-such-model", **base)
    with pytest.raises(pm.PlanError, match="already an MoE"):
        pm.plan_memory({**TINY, "model_type": "mixtral", "intermediate_size": 96, "num_local_experts": 4,
                        "num_experts_per_tok": 2}, **base)
    with pytest.raises(pm.PlanError, match="autoep_size=4 must divide both the world size \\(2\\)"):
        pm.plan_memory({**TINY, "model_type": "mixtral", "intermediate_size": 96, "num_local_experts": 4,
                        "num_experts_per_tok": 2}, phase="recover",
                       ds_config={"zero_optimization": {"stage": 3},
                                  "expert_parallel": {"enabled": True, "autoep_size": 4}}, **base)
    with pytest.raises(pm.PlanError, match="does not exist"):
        pm.plan_memory(SMALL, ds_config="/nonexistent/ds.json", **base)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_exit_codes_and_messages(tmp_path):
    cfg, ds = tmp_path / "config.json", tmp_path / "ds.json"
    cfg.write_text(json.dumps(SMALL))
    ds.write_text(json.dumps(SMALL_DS))
    common = ("--nodes", "2", "--gpus_per_node", "1", "--num_experts", "4", "--seq_len", "32",
              "--ds_config", str(ds), "--runtime_gb", "0.5")
    ok = _cli("--model", str(tmp_path), "--gpu_memory_gb", "1", *common)
    assert ok.returncode == 0, ok.stderr
    assert "fits" in ok.stdout and "DOT-MoE memory plan" in ok.stdout and "ZeRO-3, bf16" in ok.stdout
    too_small = _cli("--model", str(cfg), "--gpu_memory_gb", "0.5", *common)
    assert too_small.returncode == 3
    assert "DOES NOT FIT" in too_small.stdout
    # the runtime overhead (0.5 GiB) is the largest term, but the message names one a setting can change
    assert "biggest term is 'logits + loss'" in too_small.stderr and "sequence length (now 32)" in too_small.stderr
    bad = _cli("--model", str(cfg), "--num_experts", "4", "--top_k", "5")
    assert bad.returncode == 2 and "top_k=5" in bad.stderr


def test_planner_does_not_import_torch():
    """The job runs it before anything else: it must stay a fraction of a second."""
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import plan_memory; "
                            "print('torch' in sys.modules)", str(REPO / "tools")],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr
