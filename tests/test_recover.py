"""Recovery training of an exported MoE with DeepSpeed AutoEP (dotmoe_ds/recover.py, autoep_compat.py).

Fast: the expert-parallel size is validated before anything loads; the AutoEP section per family;
the compatibility shim. Slow (2 gloo ranks on CPU, ZeRO-3 unless said): ep_size 2 and 1 give the
same losses; the re-export reloads with AutoModelForCausalLM and scores the held-out text exactly
as the trained engine did; a killed run resumes to the uninterrupted weights; ZeRO-2 matches
ZeRO-3; every exported family trains and re-exports.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dotmoe_ds import autoep_compat
from dotmoe_ds.recover import RecoverError, expert_parallel_section, resolve_ep_size
from dotmoe_ds.train import EXIT_USAGE, main

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "dotmoe_ds" / "train.py"
Z3_EP, Z2_EP = ROOT / "ds_configs" / "z3_ep.json", ROOT / "ds_configs" / "z2_ep.json"
STEPS = 4
# Same seed and data with the experts on 1 or 2 ranks: only the summation order of the expert
# outputs and of the gradient reductions differs (fp32), so per-step losses agree to float noise.
LOSS_TOL = 1e-5


def export_tiny_moe(family: str, root: Path, num_experts: int = 4, top_k: int = 2, shared: int = 0,
                    seed: int = 0) -> Path:
    """A tiny dense model of `family`, converted with a random partition and router, exported."""
    from transformers import AutoModelForCausalLM

    from dotmoe_ds.export import export_moe
    from dotmoe_ds.families import adapter_for
    from dotmoe_ds.layer import DotMoEFFN, set_mode
    from dotmoe_ds.spec import MoESpec
    from dotmoe_ds.tiny_models import save_tiny_model

    dense = save_tiny_model(family, root / f"{family}_dense", seed=seed)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    spec = MoESpec.uniform(model.config.intermediate_size, num_experts, top_k, shared)
    gen = torch.Generator().manual_seed(seed)
    cols = torch.cat([torch.full((c,), j) for j, c in enumerate(spec.column_capacities)])

    def make(i, gate, up, down, act):
        return DotMoEFFN(gate, up, down, act, spec, init_assignment=cols[torch.randperm(spec.d_ff, generator=gen)],
                         router_weight=torch.randn(num_experts, model.config.hidden_size, generator=gen))

    adapter = adapter_for(model.config)
    adapter.swap_in(model, make)
    set_mode(model, "hard")
    out = root / f"{family}_moe"
    export_moe(model, adapter, spec, out, source_dir=dense, overwrite=True)
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    path = export_tiny_moe("llama", root)
    (root / "data").mkdir()
    text = (ROOT / "dotmoe_ds" / "demo_data" / "calibration" / "emma.txt").read_text()
    (root / "data" / "train.txt").write_text(text[:12000])
    (root / "held.txt").write_text((ROOT / "dotmoe_ds" / "demo_data" / "heldout" / "persuasion.txt").read_text()[:4000])
    return root, path


# ---------------------------------------------------------------------- fast: validation

@pytest.mark.parametrize("flag, config_size, world, experts, ok", [
    (2, 8, 2, 4, True), (1, 8, 2, 4, True), (0, 2, 4, 8, True), (0, None, 2, 4, True),
    (3, 8, 3, 4, False),     # does not divide the expert count
    (4, 8, 2, 4, False),     # does not divide the world size
    (0, 8, 2, 4, False),     # the config's size (8) divides neither
])
def test_ep_size_must_divide_world_and_experts(flag, config_size, world, experts, ok):
    ds = {"expert_parallel": {"enabled": True, "autoep_size": config_size}} if config_size else {}
    if ok:
        assert resolve_ep_size(flag, ds, world, experts) == (flag or config_size or 1)
    else:
        with pytest.raises(RecoverError, match=f"{experts} experts over {world} rank") as err:
            resolve_ep_size(flag, ds, world, experts)
        assert "--ep_size" in str(err.value)


def test_non_integer_autoep_size_refused():
    with pytest.raises(RecoverError, match="positive integer"):
        resolve_ep_size(0, {"expert_parallel": {"enabled": True, "autoep_size": "auto"}}, 2, 4)


def test_expert_parallel_section_per_family():
    from transformers import AutoConfig

    def cfg(model_type, **kw):
        return AutoConfig.for_model(model_type, **kw)

    base = {"use_grouped_mm": False, "autoep_size": 99}
    mixtral = expert_parallel_section(cfg("mixtral"), 2, base)
    assert mixtral == {"use_grouped_mm": False, "autoep_size": 2, "enabled": True, "preset_model": "mixtral"}
    assert expert_parallel_section(cfg("qwen3_moe"), 1)["preset_model"] == "qwen3_moe"
    assert expert_parallel_section(cfg("qwen2_moe"), 1)["preset_model"] == "qwen3_moe"
    olmo = expert_parallel_section(cfg("flex_olmo", norm_topk_prob=False), 2)
    assert olmo["moe_layer_pattern"] == r"model\.layers\.\d+\.mlp" and olmo["route_norm"] is False
    assert olmo["num_experts_attr"] == "num_experts" and "preset_model" not in olmo
    with pytest.raises(RecoverError, match="AutoEP cannot take a llama model"):
        expert_parallel_section(cfg("llama"), 1)


def test_bad_ep_size_refused_at_start(moe, tmp_path, capsys):
    root, path = moe
    common = ["--phase", "recover", "--model", str(path), "--data", str(root / "data"), "--eval_data",
              str(root / "held.txt"), "--deepspeed", str(Z3_EP), "--seq_len", "32", "--steps", "1"]
    # one process: 3 divides neither the world size (1) nor the 4 experts
    assert main([*common, "--output", str(tmp_path / "a"), "--ep_size", "3"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--ep_size=3 cannot spread 4 experts over 1 rank(s)" in err and "one of [1]" in err
    # no --ep_size: z3_ep.json's autoep_size (8) does not fit one rank either
    assert main([*common, "--output", str(tmp_path / "b")]) == EXIT_USAGE
    assert "expert_parallel.autoep_size of the DeepSpeed config=8" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()     # refused before any work


def test_dense_model_refused(moe, tmp_path, capsys):
    root, path = moe
    dense = root / "llama_dense"
    assert main(["--phase", "recover", "--model", str(dense), "--data", str(root / "data"),
                 "--output", str(tmp_path / "c")]) == EXIT_USAGE
    assert "not an MoE exported by dotmoe (no dotmoe.json)" in capsys.readouterr().err


def test_ep_size_needs_the_recover_phase():
    from dotmoe_ds.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match="needs --phase recover"):
        parse_args(["--ep_size", "2"])
    with pytest.raises(ConfigError, match="--phase must be one of"):
        parse_args(["--phase", "finetune"])


# ---------------------------------------------------------------------- fast: the shim

# transformers < 5.23 (5.17 on the GPU image) keeps a plain dict, which DeepSpeed reads as it is.
needs_registry_class = pytest.mark.skipif(autoep_compat._registry_class() is None,
                                          reason="this transformers' output-capture registry is a plain dict: no shim")


@needs_registry_class
def test_shim_fixes_the_registry_and_leaves_model_keys_alone():
    from transformers.utils import output_capturing

    from dotmoe_ds.tiny_models import tiny_model

    autoep_compat.apply_autoep_compat()
    assert not autoep_compat.autoep_registry_is_broken()
    registry = type(output_capturing._CAN_RECORD_REGISTRY)()
    model = tiny_model("llama")
    registry[model] = {"x": 1}                                  # transformers' own calls: by model
    key = str(model.__class__)
    assert registry.get(model) == {"x": 1} and dict.get(registry, key) == {"x": 1}
    assert registry.get(torch.nn.Linear(1, 1)) == {}            # unknown model: {} as before
    registry["<class 'a.B'>"] = {"y": 2}                        # DeepSpeed's calls: by class name
    assert registry.get("<class 'a.B'>") == {"y": 2} and registry.get("<class 'a.C'>", "dflt") == "dflt"
    assert "<class 'str'>" not in registry


@needs_registry_class
def test_shim_stays_off_when_the_probe_finds_nothing(monkeypatch):
    cls = autoep_compat._registry_class()
    get, setitem = cls.get, cls.__setitem__
    monkeypatch.setitem(autoep_compat._state, "applied", False)
    monkeypatch.setattr(autoep_compat, "autoep_registry_is_broken", lambda: False)
    assert autoep_compat.apply_autoep_compat() is False
    assert cls.get is get and cls.__setitem__ is setitem


# ---------------------------------------------------------------------- slow: 2 ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(root: Path, model: Path, out: Path, *extra, config=Z3_EP, env=None, steps=STEPS, timeout=600):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           str(TRAIN), "--phase", "recover", "--model", str(model), "--deepspeed", str(config),
           "--data", str(root / "data"), "--eval_data", str(root / "held.txt"), "--output", str(out),
           "--steps", str(steps), "--seq_len", "32", "--batch_size", "2", "--trainable", "all",
           "--checkpoint_every", "1", "--eval_blocks", "8", "--seed", "5", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DOTMOE_CACHE": str(root / "cache"),
                                 **(env or {})})
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, log


def _losses(out: Path) -> list[float]:
    return [loss for _, loss in json.loads((out / "results.json").read_text())["losses"]]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def ep2(moe):
    root, path = moe
    out = root / "ep2"
    rc, log = _run(root, path, out, "--ep_size", "2")
    assert rc == 0, log[-3000:]
    return out, log


@pytest.mark.slow
def test_ep2_and_ep1_give_the_same_losses(moe, ep2):
    root, path = moe
    out2, log2 = ep2
    assert "expert-parallel size 2 (2 experts per rank), ZeRO stage 3" in log2
    rc, log1 = _run(root, path, root / "ep1", "--ep_size", "1")
    assert rc == 0, log1[-3000:]
    assert "expert-parallel size 1 (4 experts per rank), ZeRO stage 3" in log1
    l1, l2 = _losses(root / "ep1"), _losses(out2)
    assert len(l1) == len(l2) == STEPS
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= LOSS_TOL, (l1, l2)
    assert len(set(l2)) == STEPS          # the weights moved: every step's loss differs


@pytest.mark.slow
def test_reexport_reloads_and_matches_the_engine(moe, ep2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dotmoe_ds.config import RunConfig
    from dotmoe_ds.data import prepare_data
    from dotmoe_ds.evaluate import perplexity
    from dotmoe_ds.runframe import data_config

    root, source = moe
    out, _ = ep2
    res = json.loads((out / "results.json").read_text())
    model, info = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # The engine scored these held-out blocks after training (results.json); the reloaded export
    # must score them the same: the same logits on 8 x 31 predictions.
    cfg = RunConfig.load(out / "config.json")
    os.environ["DOTMOE_CACHE"] = str(root / "cache")
    packed = prepare_data(data_config(cfg), AutoTokenizer.from_pretrained(out / "model"), 256)
    ev = perplexity(model.eval(), packed.eval, batch_size=cfg.eval.eval_batch_size, max_blocks=cfg.eval.eval_blocks)
    assert ev.tokens == res["eval"]["tokens"] == 8 * 31
    assert abs(ev.mean_nll - res["eval"]["mean_nll"]) <= 1e-6, (ev.mean_nll, res["eval"]["mean_nll"])
    # Training changed every kind of weight.
    before, after = _weights(source), _weights(out / "model")
    assert before.keys() == after.keys()
    for name in ("model.layers.0.block_sparse_moe.experts.3.w2.weight", "model.layers.1.block_sparse_moe.gate.weight",
                 "model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert not torch.equal(before[name], after[name]), name
    meta = json.loads((out / "model" / "dotmoe.json").read_text())
    src_meta = json.loads((source / "dotmoe.json").read_text())
    assert meta["layers"] == src_meta["layers"]                  # provenance carried over
    rec = meta["recoveries"][-1]
    assert rec["steps"] == STEPS and rec["ep_size"] == 2 and rec["world_size"] == 2 and rec["zero_stage"] == 3
    assert rec["final_loss"] == pytest.approx(_losses(out)[-1])
    assert (out / "model" / "tokenizer.json").is_file() and "## Recovery training" in (out / "model" / "README.md").read_text()


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_weights(moe, ep2):
    from dotmoe_ds.checkpoint import FAULT_ENV, latest_checkpoint

    root, path = moe
    ref, _ = ep2
    out = root / "killed"
    rc, log = _run(root, path, out, "--ep_size", "2", env={FAULT_ENV: "kill_in_checkpoint:3"})
    assert rc != 0 and latest_checkpoint(out / "checkpoints").step == 2, log[-2000:]
    rc, log = _run(root, path, out, "--ep_size", "2")      # the same command: resumes at step 2
    assert rc == 0 and "resumed from" in log and "at step 2" in log, log[-3000:]
    assert _losses(out) == _losses(ref)
    # The resumed invocation's run_seconds adds the loop time of steps 1-2 from the killed one.
    ra, rb = (json.loads((o / "results.json").read_text()) for o in (ref, out))
    assert rb["loop_seconds"] > 0 and rb["run_seconds"] > rb["wall_seconds"]
    assert ra["run_seconds"] == ra["wall_seconds"] and ra["loop_seconds"] < ra["wall_seconds"]
    a, b = _weights(ref / "model"), _weights(out / "model")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


@pytest.mark.slow
def test_zero2_matches_zero3(moe, ep2):
    root, path = moe
    out3, _ = ep2
    rc, log = _run(root, path, root / "z2", "--ep_size", "2", config=Z2_EP)
    assert rc == 0, log[-3000:]
    assert "ZeRO stage 2" in log
    l2, l3 = _losses(root / "z2"), _losses(out3)
    assert max(abs(a - b) for a, b in zip(l2, l3)) <= LOSS_TOL, (l2, l3)


@pytest.mark.slow
@pytest.mark.parametrize("family, shared, arch", [("qwen2", 32, "Qwen2MoeForCausalLM"),
                                                  ("qwen3", 0, "Qwen3MoeForCausalLM"),
                                                  ("olmo2", 0, "FlexOlmoForCausalLM")])
def test_every_family_trains_and_reexports(moe, family, shared, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    root, _ = moe
    path = export_tiny_moe(family, tmp_path, shared=shared)
    rc, log = _run(root, path, tmp_path / "out", "--ep_size", "2", steps=2)
    assert rc == 0, log[-3000:]
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", output_loading_info=True)
    assert type(model).__name__ == arch
    assert not info["missing_keys"] and not info["unexpected_keys"]
    before, after = _weights(path), _weights(tmp_path / "out" / "model")
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(".experts.3." in k for k in changed) and any("self_attn" in k for k in changed)
    if shared:
        assert any("shared_expert." in k for k in changed)
