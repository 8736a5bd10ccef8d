"""Family adapters: lookup, SwiGLU parts, swap-in, target configs, clear refusals; tiny models."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from dotmoe_ds.families import ADAPTERS, FamilyError, adapter_for
from dotmoe_ds.layer import DotMoEFFN
from dotmoe_ds.spec import MoESpec
from dotmoe_ds.tiny_models import TINY_FAMILIES, tiny_config, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]

TARGETS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
           "qwen3": "Qwen3MoeForCausalLM", "olmo2": "FlexOlmoForCausalLM"}
SHARED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_for_each_family(family):
    adapter = adapter_for(tiny_config(family))
    assert adapter.name == family and adapter.target_architecture == TARGETS[family]
    assert adapter.supports_shared_expert == (family == "qwen2")
    assert adapter.carries_shared_expert == (family in SHARED_FAMILIES)
    shared = MoESpec.uniform(tiny_config(family).intermediate_size, 4, top_k=2, shared=16)
    if family in ("llama", "mistral"):
        assert adapter.for_spec(shared).target_architecture == "Qwen2MoeForCausalLM"
    if family == "qwen3":
        assert adapter.for_spec(shared).target_architecture == "Qwen3NextForCausalLM"
    assert adapter.for_spec(MoESpec.uniform(tiny_config(family).intermediate_size, 4, top_k=2)) is adapter


def test_every_adapter_has_a_tiny_model():
    assert sorted(a.name for a in ADAPTERS) == sorted(TINY_FAMILIES)


def test_unsupported_architecture_lists_supported_families():
    with pytest.raises(FamilyError) as err:
        adapter_for(AutoConfig.for_model("gpt2"))
    msg = str(err.value)
    assert "'gpt2'" in msg
    for family, target in TARGETS.items():
        assert family in msg and target in msg


def test_moe_model_is_not_a_dense_family():
    with pytest.raises(FamilyError, match="unsupported model.*mixtral"):
        adapter_for(AutoConfig.for_model("mixtral"))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_mlp_parts_are_the_dense_linears(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    mlp = model.model.layers[1].mlp
    gate, up, down, act = adapter.mlp_parts(mlp, 1)
    assert gate is mlp.gate_proj and up is mlp.up_proj and down is mlp.down_proj and act is mlp.act_fn


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_swap_in_replaces_every_mlp_and_keeps_parameter_names(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    before = {n: p for n, p in model.named_parameters()}
    spec = MoESpec.uniform(model.config.intermediate_size, 4, top_k=2)
    seen = []

    def make(i, gate, up, down, act):
        seen.append(i)
        return DotMoEFFN(gate, up, down, act, spec)

    new = adapter.swap_in(model, make)
    assert seen == list(range(model.config.num_hidden_layers))
    assert [layer.mlp for layer in model.model.layers] == new
    after = dict(model.named_parameters())
    for name, p in before.items():   # the dense weights are the same objects under the same names
        assert after[name] is p
    assert {n for n in after if n not in before} == {
        f"model.layers.{i}.mlp.{k}" for i in range(len(new)) for k in ("scores", "router.weight")}


def test_non_swiglu_mlp_refused_and_model_untouched():
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    original0 = model.model.layers[0].mlp
    model.model.layers[1].mlp = GPT2MLP(96, AutoConfig.for_model("gpt2", n_embd=64))
    with pytest.raises(FamilyError, match="layer 1's MLP \\(GPT2MLP\\) is not a SwiGLU MLP"):
        adapter.swap_in(model, lambda *a: nn.Identity())
    assert model.model.layers[0].mlp is original0   # checked before anything was replaced


def test_mlp_bias_refused():
    config = tiny_config("llama", mlp_bias=True)
    adapter = adapter_for(config)
    spec = MoESpec.uniform(config.intermediate_size, 4, top_k=2)
    with pytest.raises(FamilyError, match="mlp_bias=True"):
        adapter.validate(config, spec)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(FamilyError, match="has a bias on gate_proj"):
        adapter.mlp_parts(model.model.layers[0].mlp, 0)


def test_llama_attention_bias_refused_for_mixtral():
    config = tiny_config("llama", attention_bias=True)
    with pytest.raises(FamilyError, match="attention_bias=True cannot be exported exactly"):
        adapter_for(config).validate(config, MoESpec.uniform(config.intermediate_size, 4, top_k=2))


def test_qwen3_sliding_window_on_some_layers_refused():
    config = tiny_config("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(FamilyError, match="sliding window on some layers only"):
        adapter_for(config).validate(config, MoESpec.uniform(config.intermediate_size, 4, top_k=2))


def test_qwen3_sliding_window_on_all_layers_carried():
    config = tiny_config("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    target = adapter_for(config).target_config(config, MoESpec.uniform(config.intermediate_size, 4, top_k=2))
    assert target.use_sliding_window and target.sliding_window == 4


@pytest.mark.parametrize("family", ["olmo2"])
def test_shared_expert_only_where_supported(family):
    config = tiny_config(family)
    spec = MoESpec.uniform(config.intermediate_size, 4, top_k=2, shared=16)
    with pytest.raises(FamilyError, match=f"cannot be exported for {family}.*supported for: llama, mistral, qwen2, qwen3"):
        adapter_for(config).validate(config, spec)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_llama_shared_expert_target_config(family):
    config = tiny_config(family, head_dim=8)
    spec = MoESpec.uniform(config.intermediate_size, 16, top_k=4, shared=32)
    adapter = adapter_for(config)
    adapter.validate(config, spec)
    target = adapter.target_config(config, spec)
    assert target.model_type == "qwen2_moe" and target.qkv_bias
    assert target.shared_expert_intermediate_size == 32 and target.num_experts == 16
    assert target.head_dim == 8 and target.tie_word_embeddings == config.tie_word_embeddings
    assert target.rope_parameters == config.rope_parameters and target.rms_norm_eps == config.rms_norm_eps
    window = 6 if family == "mistral" else None
    assert target.use_sliding_window == (window is not None)
    assert target.layer_types == ["sliding_attention" if window else "full_attention"] * 2
    if window:
        assert target.sliding_window == window
    biases = adapter.for_spec(spec).added_layer_tensors(1, config, torch.float32)
    assert [(n, tuple(t.shape)) for n, t in biases] == [
        ("model.layers.1.self_attn.q_proj.bias", (32,)), ("model.layers.1.self_attn.k_proj.bias", (16,)),
        ("model.layers.1.self_attn.v_proj.bias", (16,))]
    assert all(not t.any() for _, t in biases)


def test_llama_attention_bias_refused_with_shared_expert():
    config = tiny_config("llama", attention_bias=True)
    spec = MoESpec.uniform(config.intermediate_size, 4, top_k=2, shared=16)
    with pytest.raises(FamilyError, match="attention_bias=True.*o_proj has no bias.*--shared_neurons 0"):
        adapter_for(config).validate(config, spec)


def test_spec_for_another_d_ff_refused():
    config = tiny_config("olmo2")
    with pytest.raises(FamilyError, match="intermediate_size"):
        adapter_for(config).validate(config, MoESpec.uniform(64, 4, top_k=2))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_target_config_carries_dense_settings(family):
    config = tiny_config(family)
    adapter = adapter_for(config)
    spec = MoESpec.custom(config.intermediate_size, [config.intermediate_size - 45, 20, 25], top_k=2)
    target = adapter.target_config(config, spec, router_aux_loss_coef=0.02)
    assert target.model_type == adapter.target_model_type
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"):
        assert getattr(target, key) == getattr(config, key), key
    assert target.num_experts == 3 and target.num_experts_per_tok == 2
    assert target.router_aux_loss_coef == 0.02
    expert_size = target.moe_intermediate_size if hasattr(target, "moe_intermediate_size") \
        else target.intermediate_size
    assert expert_size == adapter.expert_intermediate_size(spec) == -(-(config.intermediate_size - 45) // 8) * 8
    if family != "llama" and family != "mistral":
        assert target.norm_topk_prob   # Mixtral always renormalises
    # family-specific attention settings the tiny configs switch on
    if family == "mistral":
        assert target.sliding_window == config.sliding_window == 6
    if family == "qwen2":
        assert target.layer_types == config.layer_types and target.sliding_window == 5 and target.qkv_bias
        assert target.shared_expert_intermediate_size == 0
    if family == "qwen3":
        assert target.head_dim == 32 != config.hidden_size // config.num_attention_heads


def test_expert_size_multiple():
    adapter = adapter_for(tiny_config("llama"))
    spec = MoESpec.custom(96, [33, 31, 32], top_k=1)
    assert adapter.expert_intermediate_size(spec) == 40
    assert adapter.expert_intermediate_size(spec, multiple=1) == 33
    with pytest.raises(FamilyError, match="smaller than the largest expert"):
        adapter.target_config(tiny_config("llama"), spec, expert_size=32)


# ---------------------------------------------------------------------- tiny models

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_is_deterministic_fp32_and_small(family):
    a, b = tiny_model(family, seed=11), tiny_model(family, seed=11)
    c = tiny_model(family, seed=12)
    x = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        la, lb, lc = a(x).logits, b(x).logits, c(x).logits
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert sum(p.numel() for p in a.parameters()) < 200_000
    tied = a.lm_head.weight is a.model.embed_tokens.weight
    assert tied == a.config.tie_word_embeddings


def test_tiny_models_cover_tied_and_untied_embeddings():
    tied = {f: tiny_config(f).tie_word_embeddings for f in TINY_FAMILIES}
    assert tied["llama"] and not tied["mistral"]


def test_tiny_tokenizer_round_trips_text():
    tok = tiny_tokenizer(512)
    text = "The quick brown fox, a single man of good fortune."
    ids = tok(text).input_ids
    assert max(ids) < 512 and tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_make_tiny_model_tool_writes_an_offline_model(tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, str(REPO / "tools" / "make_tiny_model.py"), "--family", "qwen2",
           "--output_dir", str(out), "--num_hidden_layers", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 3
    with torch.no_grad():
        expected = tiny_model("qwen2", seed=0, num_hidden_layers=3)(torch.tensor([[5, 6, 7]])).logits
        assert torch.equal(model(torch.tensor([[5, 6, 7]])).logits, expected)
    assert tok.decode(tok("a good fortune").input_ids) == "a good fortune"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_llama_pretraining_tp_is_ignored():
    # transformers' Llama forward never reads pretraining_tp, so any value exports exactly.
    config = tiny_config("llama", pretraining_tp=2)
    target = adapter_for(config).target_config(config, MoESpec.uniform(config.intermediate_size, 4, top_k=2))
    assert not hasattr(target, "pretraining_tp")


def test_hub_config_extras_travel_along():
    # SmolLM2's config.json carries keys LlamaConfig does not declare; they must not block the export.
    config = tiny_config("llama", is_llama_config=True, rope_interleaved=False)
    target = adapter_for(config).target_config(config, MoESpec.uniform(config.intermediate_size, 4, top_k=2))
    assert target.is_llama_config is True and target.rope_interleaved is False


def test_qwen3_shared_expert_target_config_and_tensors():
    config = tiny_config("qwen3")
    spec = MoESpec.uniform(config.intermediate_size, 16, top_k=4, shared=32)
    adapter = adapter_for(config).for_spec(spec)
    target = adapter_for(config).target_config(config, spec)
    assert target.model_type == "qwen3_next" and target.layer_types == ["full_attention"] * 2
    assert target.rope_parameters["partial_rotary_factor"] == 1.0 and target.head_dim == 32
    assert target.shared_expert_intermediate_size == 32 and target.num_experts == 16
    q = torch.randn(4 * 32, 64)
    qg = adapter.target_tensor("model.layers.0.self_attn.q_proj.weight", q, config)
    assert adapter.target_tensor_shape("model.layers.0.self_attn.q_proj.weight", (128, 64), config) == (256, 64)
    per_head = qg.view(4, 2, 32, 64)   # per head: its query rows, then zero gate rows
    assert torch.equal(per_head[:, 0], q.view(4, 32, 64)) and not per_head[:, 1].any()
    w = torch.randn(32)
    assert torch.equal(adapter.target_tensor("model.layers.1.self_attn.k_norm.weight", w, config), w - 1)
    assert torch.equal(adapter.target_tensor("model.norm.weight", w, config), w - 1)
    o = torch.randn(64, 128)
    assert torch.equal(adapter.target_tensor("model.layers.1.self_attn.o_proj.weight", o, config), 2 * o)
    assert adapter.target_tensor("model.embed_tokens.weight", o, config) is o


@pytest.mark.parametrize("overrides,needle", [
    (dict(use_sliding_window=True, sliding_window=4, max_window_layers=0), "sliding window"),
    (dict(attention_bias=True), "attention_bias=True"),
])
def test_qwen3_shared_expert_refusals(overrides, needle):
    config = tiny_config("qwen3", **overrides)
    spec = MoESpec.uniform(config.intermediate_size, 4, top_k=2, shared=16)
    with pytest.raises(FamilyError, match=needle):
        adapter_for(config).validate(config, spec)
