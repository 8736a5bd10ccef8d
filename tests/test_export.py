"""Export: the reloaded MoE checkpoint reproduces the conversion model exactly (contracts 1, 2, 5, 7).

Every family's tiny model is converted with a random partition and a random router, exported, and
reloaded with plain `AutoModelForCausalLM.from_pretrained`; the logits must match.
"""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dotmoe_ds.export import ExportError, check_output_dir, export_moe, read_dotmoe
from dotmoe_ds.families import FamilyError, adapter_for
from dotmoe_ds.layer import DotMoEFFN, set_mode
from dotmoe_ds.spec import MoESpec
from dotmoe_ds.tiny_models import TINY_FAMILIES, save_tiny_model, tiny_model

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- helpers

def random_partition(spec: MoESpec, gen: torch.Generator) -> torch.Tensor:
    cols = torch.cat([torch.full((c,), j) for j, c in enumerate(spec.column_capacities)])
    return cols[torch.randperm(spec.d_ff, generator=gen)]


def convert(model, spec: MoESpec, *, router_scale: float = 1.0, seed: int = 0):
    """Swap DotMoEFFN into every layer (random partition, random router unless scale 0), hard mode."""
    adapter = adapter_for(model.config)
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size

    def make(i, gate, up, down, act):
        router = torch.randn(spec.num_experts, hidden, generator=gen) * router_scale
        return DotMoEFFN(gate, up, down, act, spec, init_assignment=random_partition(spec, gen),
                         router_weight=router)

    adapter.swap_in(model, make)
    set_mode(model, "hard")
    return adapter


def nonuniform_spec(d_ff: int, shared: int = 0, top_k: int = 2) -> MoESpec:
    routed = d_ff - shared
    caps = [routed // 4 + 5, routed // 4 - 7, routed // 4 + 1]
    return MoESpec.custom(d_ff, caps + [routed - sum(caps)], top_k=top_k, shared=shared)


def tokens(vocab: int = 512, seed: int = 1) -> torch.Tensor:
    # 20 tokens: longer than the tiny models' sliding windows (5, 6), so windows matter.
    return torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x).logits


def reload(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def assert_clean_load(model, info):
    """Nothing unexpected on disk, and nothing missing except empty (zero-size) tensors."""
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    params = dict(model.named_parameters())
    for key in info["missing_keys"]:
        assert params[key].numel() == 0, f"{key} missing from the export"


def load_tensors(path) -> dict[str, torch.Tensor]:
    index = json.loads((Path(path) / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(Path(path) / shard), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    return out


# ---------------------------------------------------------------------- contract 1: exactness

SHARED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Every family x {no shared expert, shared where the family carries one} x {uniform, non-uniform,
# fine-grained: 20 experts of 4-7 neurons, zero-padded to 8 on disk}.
CASES = [(fam, caps, 0) for fam in TINY_FAMILIES for caps in ("uniform", "nonuniform", "fine")]
CASES += [(fam, caps, shared) for fam in SHARED_FAMILIES
          for caps, shared in (("uniform", 32), ("nonuniform", 24), ("fine", 20))]


def randomise_norms(model, seed: int = 0) -> None:
    """Norm weights away from their init of 1, so a target that re-parametrises them (Qwen3-Next
    stores w - 1) is checked on real values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def budget(kind: str, d_ff: int, shared: int) -> MoESpec:
    if kind == "uniform":
        return MoESpec.uniform(d_ff, 4, top_k=2, shared=shared)
    if kind == "nonuniform":
        return nonuniform_spec(d_ff, shared)
    spec = MoESpec.uniform(d_ff, 20, top_k=5, shared=shared)
    assert spec.max_capacity % 8   # padding is exercised
    return spec


@pytest.mark.parametrize("family,caps,shared", CASES, ids=[f"{f}-{c}-shared{s}" for f, c, s in CASES])
def test_export_reloads_with_identical_logits(family, caps, shared, tmp_path):
    model = tiny_model(family, seed=3)
    randomise_norms(model)
    d_ff = model.config.intermediate_size
    spec = budget(caps, d_ff, shared)
    adapter = convert(model, spec).for_spec(spec)
    x = tokens()
    expected = logits(model, x)

    export_moe(model, adapter, spec, tmp_path / "moe")
    moe, info = reload(tmp_path / "moe")
    assert type(moe).__name__ == adapter.target_architecture
    assert_clean_load(moe, info)
    got = logits(moe, x)
    assert (got - expected).abs().max().item() <= 1e-4
    # The routing really is sparse: the MoE is not the dense model.
    set_mode(model, "dense")
    assert (logits(model, x) - got).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["olmo2"])
def test_shared_expert_refused_where_target_has_none(family, tmp_path):
    model = tiny_model(family)
    spec = MoESpec.uniform(model.config.intermediate_size, 4, top_k=2, shared=16)
    adapter = adapter_for(model.config)
    with pytest.raises(FamilyError, match="shared expert.*supported for: llama, mistral, qwen2, qwen3"):
        export_moe(model, adapter, spec, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def test_llama3_rope_scaling_survives_export(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    model = tiny_model("llama", seed=1, rope_parameters=rope, max_position_embeddings=64)
    spec = nonuniform_spec(model.config.intermediate_size, top_k=1)
    adapter = convert(model, spec)
    x = tokens()
    expected = logits(model, x)
    export_moe(model, adapter, spec, tmp_path / "moe")
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    # Stated both ways: v5's rope_parameters and the top-level keys older readers use.
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_theta"] == 50000.0
    assert cfg["rope_scaling"]["factor"] == 8.0 and cfg["torch_dtype"] == "float32"
    moe, _ = reload(tmp_path / "moe")
    assert (logits(moe, x) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(head_dim=32)),                      # head_dim != hidden / heads (64 / 4)
    ("mistral", dict(head_dim=8, tie_word_embeddings=True)),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8}, max_position_embeddings=64)),
    ("llama", dict(num_key_value_heads=1, rms_norm_eps=1e-3)),
], ids=["llama-head_dim", "mistral-head_dim-tied", "llama3-rope", "llama-mqa-eps"])
def test_llama_shared_expert_export_settings(family, overrides, tmp_path):
    # The tiny mistral's window (6) is shorter than the 20 test tokens, so the window is exercised.
    model = tiny_model(family, seed=6, **overrides)
    spec = budget("fine", model.config.intermediate_size, 16)
    adapter = convert(model, spec).for_spec(spec)
    x = tokens()
    expected = logits(model, x)
    export_moe(model, adapter, spec, tmp_path / "moe")
    moe, info = reload(tmp_path / "moe")
    assert_clean_load(moe, info)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert (logits(moe, x) - expected).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------- contract 2: dense equivalence

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_k_equals_e_zero_router_is_the_dense_model(family, tmp_path):
    dense = tiny_model(family, seed=5)
    x = tokens()
    expected = logits(dense, x)
    spec = MoESpec.uniform(dense.config.intermediate_size, 4, top_k=4)
    adapter = convert(dense, spec, router_scale=0.0)
    assert (logits(dense, x) - expected).abs().max().item() <= 1e-5
    export_moe(dense, adapter, spec, tmp_path / "moe")
    moe, _ = reload(tmp_path / "moe")
    assert (logits(moe, x) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", SHARED_FAMILIES)
def test_every_expert_active_with_shared_expert_is_the_dense_model(family, tmp_path):
    dense = tiny_model(family, seed=5)
    x = tokens()
    expected = logits(dense, x)
    spec = MoESpec.uniform(dense.config.intermediate_size, 16, top_k=16, shared=24)
    adapter = convert(dense, spec, router_scale=0.0)
    assert (logits(dense, x) - expected).abs().max().item() <= 1e-5
    export_moe(dense, adapter, spec, tmp_path / "moe")
    moe, _ = reload(tmp_path / "moe")
    assert (logits(moe, x) - expected).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------- dotmoe.json vs weights

@pytest.mark.parametrize("family,shared", [("llama", 0), ("qwen2", 24), ("olmo2", 0), ("mistral", 24)])
def test_dotmoe_json_matches_exported_weights(family, shared, tmp_path):
    model = tiny_model(family, seed=2)
    d_ff, d = model.config.intermediate_size, model.config.hidden_size
    spec = nonuniform_spec(d_ff, shared, top_k=2)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = convert(model, spec, seed=7).for_spec(spec)
    dense = [(m.gate_proj.weight.detach().clone(), m.up_proj.weight.detach().clone(),
              m.down_proj.weight.detach().clone()) for m in adapter.mlps(model)]
    export_moe(model, adapter, spec, tmp_path / "moe", max_shard_bytes=20_000)
    meta = read_dotmoe(tmp_path / "moe")
    tensors = load_tensors(tmp_path / "moe")
    # attention, norms, embeddings (and an untied head) are copied unchanged under their dense names
    kept = {k for k in dense_state if ".mlp." not in k}
    if model.config.tie_word_embeddings:
        kept.discard("lm_head.weight")
    moe_names = {n for i in range(model.config.num_hidden_layers)
                 for n, _ in adapter.moe_tensor_shapes(i, spec, d, meta["expert_intermediate_size"])}
    added = {n: t for i in range(model.config.num_hidden_layers)
             for n, t in adapter.added_layer_tensors(i, model.config, torch.float32)}
    assert kept == set(tensors) - moe_names - set(added)
    for name, t in added.items():   # e.g. Qwen2-MoE's q/k/v biases for a Llama-family source: zero
        assert torch.equal(tensors[name], t) and not t.any()
    for name in kept:
        assert torch.equal(tensors[name], dense_state[name]), name
    C = meta["expert_intermediate_size"]
    assert C % 8 == 0 and C >= max(spec.capacities)
    assert meta["capacities"] == list(spec.capacities) and meta["top_k"] == 2
    assert meta["padding"]["zero_neurons_per_expert"] == [C - c for c in spec.capacities]
    L = adapter.layout
    for layer in meta["layers"]:
        i = layer["layer"]
        Wg, Wu, Wd = dense[i]
        seen = []
        for e, idx in enumerate(layer["experts"]):
            assert idx == sorted(idx) and len(idx) == spec.capacities[e]
            g, u, dn = (tensors[L.expert_gate.format(i=i, e=e)], tensors[L.expert_up.format(i=i, e=e)],
                        tensors[L.expert_down.format(i=i, e=e)])
            assert g.shape == (C, d) and dn.shape == (d, C)
            c = len(idx)
            assert torch.equal(g[:c], Wg[idx]) and torch.equal(u[:c], Wu[idx])
            assert torch.equal(dn[:, :c], spec.top_k * Wd[:, idx])
            assert not g[c:].any() and not u[c:].any() and not dn[:, c:].any()
            seen += idx
        if shared:
            idx = layer["shared"]
            assert len(idx) == shared
            assert torch.equal(tensors[L.shared_gate.format(i=i)], Wg[idx])
            assert torch.equal(tensors[L.shared_down.format(i=i)], meta["shared_down_proj_scale"] * Wd[:, idx])
            assert not tensors[L.shared_expert_gate.format(i=i)].any()   # sigmoid(0) * 2 = 1
            seen += idx
        else:
            assert layer["shared"] is None
        assert sorted(seen) == list(range(d_ff))   # every neuron exactly once


def test_param_counts_match_the_reloaded_model(tmp_path):
    model = tiny_model("qwen2", seed=4)
    d_ff, d = model.config.intermediate_size, model.config.hidden_size
    spec = nonuniform_spec(d_ff, shared=16, top_k=2)
    adapter = convert(model, spec)
    result = export_moe(model, adapter, spec, tmp_path / "moe")
    moe, _ = reload(tmp_path / "moe")
    on_disk = sum(p.numel() for p in moe.parameters())   # parameters() yields tied weights once
    assert result.params.stored == on_disk
    C, L = read_dotmoe(tmp_path / "moe")["expert_intermediate_size"], model.config.num_hidden_layers
    padding = L * 3 * d * sum(C - c for c in spec.capacities)
    assert result.params.total == on_disk - padding
    mean_c = sum(spec.capacities) / spec.num_experts
    inactive = L * 3 * d * (sum(spec.capacities) - spec.top_k * mean_c)
    assert result.params.active == round(result.params.total - inactive)
    assert result.params.dense == sum(p.numel() for p in tiny_model("qwen2").parameters())
    card = (tmp_path / "moe" / "README.md").read_text()
    assert f"{result.params.active:,} active" in card and f"{result.params.total:,} total" in card


# ---------------------------------------------------------------------- files and directories

def test_export_copies_tokenizer_and_generation_config(tmp_path):
    src = save_tiny_model("mistral", tmp_path / "dense", seed=0)
    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    spec = MoESpec.uniform(dense.config.intermediate_size, 4, top_k=2)
    adapter = convert(dense, spec)
    export_moe(dense, adapter, spec, tmp_path / "moe", source_dir=src, command="dotmoe convert x")
    out = tmp_path / "moe"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json",
                 "dotmoe.json", "README.md", "model.safetensors.index.json"):
        assert (out / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(out)
    text = "a truth universally acknowledged"
    assert tok.decode(tok(text).input_ids) == text
    meta = read_dotmoe(out)
    # No absolute path of this machine: the source is recorded relative to the working directory.
    assert meta["source_model"] == os.path.relpath(src) and meta["command"] == "dotmoe convert x"
    assert "dotmoe convert x" in (out / "README.md").read_text()


def test_nonempty_output_dir_refused_before_any_work(tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    model = tiny_model("llama")
    spec = MoESpec.uniform(model.config.intermediate_size, 4, top_k=2)
    adapter = convert(model, spec)
    calls = []

    def gather(params):
        calls.append(len(params))
        return contextlib.nullcontext()

    with pytest.raises(ExportError, match="--overwrite"):
        export_moe(model, adapter, spec, out, gather=gather)
    assert calls == [] and os.listdir(out) == ["keep.txt"]
    with pytest.raises(ExportError, match="--overwrite"):
        check_output_dir(out)

    export_moe(model, adapter, spec, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]   # no temporary siblings left


def test_empty_output_dir_is_fine(tmp_path):
    (tmp_path / "moe").mkdir()
    model = tiny_model("olmo2")
    spec = MoESpec.uniform(model.config.intermediate_size, 2, top_k=1)
    export_moe(model, convert(model, spec), spec, tmp_path / "moe")
    assert (tmp_path / "moe" / "dotmoe.json").is_file()


def test_output_inside_source_refused(tmp_path):
    with pytest.raises(ExportError, match="overlaps the source"):
        check_output_dir(tmp_path / "dense" / "moe", overwrite=True, source_dir=tmp_path / "dense")


def test_crash_mid_export_leaves_nothing_that_looks_complete(tmp_path):
    model = tiny_model("qwen3")
    spec = MoESpec.uniform(model.config.intermediate_size, 4, top_k=2)
    adapter = convert(model, spec)
    calls = []

    def failing_gather(params):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return contextlib.nullcontext()

    with pytest.raises(RuntimeError, match="node lost"):
        export_moe(model, adapter, spec, tmp_path / "moe", gather=failing_gather)
    assert list(tmp_path.iterdir()) == []


def test_gather_sees_one_unit_at_a_time_and_wraps_materialise(tmp_path):
    """The ZeRO-3 hook: each gather holds at most one decoder layer, and experts are materialised
    (and their tensors written) only while that layer is gathered."""
    model = tiny_model("llama")
    spec = MoESpec.uniform(model.config.intermediate_size, 4, top_k=2)
    adapter = convert(model, spec)
    layers = adapter.layers(model)
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    state = {"open": None, "materialised_inside": []}

    @contextlib.contextmanager
    def gather(params):
        owners = {layer_of.get(id(p)) for p in params}
        assert len(owners) == 1, "a gather spans more than one unit"
        state["open"] = owners.pop()
        yield
        state["open"] = None

    for i, mlp in enumerate(adapter.mlps(model)):
        original = mlp.materialise

        def spy(i=i, original=original):
            state["materialised_inside"].append(state["open"] == i)
            return original()
        mlp.materialise = spy

    export_moe(model, adapter, spec, tmp_path / "moe", gather=gather)
    assert state["materialised_inside"] == [True] * len(layers)


def test_non_writer_rank_writes_nothing(tmp_path):
    model = tiny_model("llama")
    spec = MoESpec.uniform(model.config.intermediate_size, 4, top_k=2)
    result = export_moe(model, convert(model, spec), spec, tmp_path / "moe", is_writer=False)
    assert list(tmp_path.iterdir()) == [] and result.params.total > 0


def test_unconverted_model_refused(tmp_path):
    model = tiny_model("llama")
    spec = MoESpec.uniform(model.config.intermediate_size, 4, top_k=2)
    with pytest.raises(ExportError, match="not a DOT-MoE layer"):
        export_moe(model, adapter_for(model.config), spec, tmp_path / "moe")
    assert list(tmp_path.iterdir()) == []


def test_layer_with_another_budget_refused(tmp_path):
    model = tiny_model("llama")
    d_ff = model.config.intermediate_size
    spec = MoESpec.uniform(d_ff, 4, top_k=2)
    adapter = convert(model, spec)
    with pytest.raises(ExportError, match="share one budget"):
        export_moe(model, adapter, MoESpec.uniform(d_ff, 4, top_k=1), tmp_path / "moe")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- contract 5: memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile, torch
    torch.set_num_threads(2)
    from transformers import LlamaConfig, LlamaForCausalLM
    from dotmoe_ds.export import export_moe
    from dotmoe_ds.families import adapter_for
    from dotmoe_ds.layer import DotMoEFFN
    from dotmoe_ds.spec import MoESpec

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)   # touch every page: the whole model is resident
    spec = MoESpec.uniform(4096, 8, top_k=2)
    adapter = adapter_for(cfg)
    adapter.swap_in(model, lambda i, g, u, d, act: DotMoEFFN(g, u, d, act, spec))
    for m in adapter.mlps(model):
        m.hard_assignment()   # the rounding is training-time state, not export work
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = adapter.layers(model)[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    out = tempfile.mkdtemp()
    baseline = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM) to the current RSS
    export_moe(model, adapter, spec, out + "/moe", max_shard_bytes=10 * 2**30)
    peak = rss("VmHWM")
    json.dump({"model_bytes": model_bytes, "layer_bytes": layer_bytes, "extra_peak_bytes": peak - baseline},
              sys.stdout)
""")


@pytest.mark.slow
def test_export_peak_memory_is_a_few_layers():
    """Peak RSS added by exporting a ~335 MB fp32 model with everything in ONE shard (so a buffering
    writer would hold the whole model) stays under 2 decoder layers."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"model {m['model_bytes'] / 2**20:.0f} MiB, one layer {m['layer_bytes'] / 2**20:.0f} MiB, "
          f"export peak +{m['extra_peak_bytes'] / 2**20:.0f} MiB "
          f"= {m['extra_peak_bytes'] / m['layer_bytes']:.2f} layers")
    assert m["model_bytes"] > 300 * 2**20
    assert m["extra_peak_bytes"] < 2 * m["layer_bytes"]


def test_bf16_export_stores_the_fp32_weights_rounded(tmp_path):
    model = tiny_model("qwen3", seed=6)
    spec = nonuniform_spec(model.config.intermediate_size)
    adapter = convert(model, spec)
    export_moe(model, adapter, spec, tmp_path / "fp32")
    export_moe(model, adapter, spec, tmp_path / "bf16", dtype=torch.bfloat16)
    full, half = load_tensors(tmp_path / "fp32"), load_tensors(tmp_path / "bf16")
    assert full.keys() == half.keys()
    for name, t in full.items():
        assert half[name].dtype == torch.bfloat16 and torch.equal(half[name], t.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    moe, info = reload(tmp_path / "bf16")
    assert_clean_load(moe, info)
    assert next(moe.parameters()).dtype == torch.bfloat16


def test_many_tiny_experts_export_exactly(tmp_path):
    # 60 experts of 2 neurons (padded to 8 on disk) + 8 shared, k 13: far more experts than a block
    model = tiny_model("qwen2", seed=8)
    randomise_norms(model)
    spec = MoESpec.uniform(128, 60, top_k=13, shared=8)
    adapter = convert(model, spec)
    x = tokens()
    expected = logits(model, x)
    export_moe(model, adapter, spec, tmp_path / "moe")
    moe, info = reload(tmp_path / "moe")
    assert_clean_load(moe, info)
    assert moe.config.num_experts == 60 and moe.config.moe_intermediate_size == 8
    assert (logits(moe, x) - expected).abs().max().item() <= 1e-4
