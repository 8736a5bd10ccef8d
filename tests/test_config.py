"""The run configuration: flag parsing, validation, the DeepSpeed config and its "auto" values."""
import json
from pathlib import Path

import pytest

from dotmoe_ds.config import (DEFAULT_DS_CONFIG, ConfigError, RunConfig, flag_names, from_flags, help_text,
                              load_ds_config, parse_args, precision_dtype, resolve_ds_config, zero_stage)

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_FLAGS = ("model", "data", "output", "num_experts", "top_k", "shared_neurons", "method", "steps",
                "seq_len", "seed", "resume", "overwrite", "deepspeed", "local_rank")


def test_defaults_are_the_embedded_demo():
    cfg = parse_args([])
    assert cfg.model.model == "demo" and cfg.data.data == "demo"
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.shared_fraction, cfg.moe.method) == (16, 4, 1 / 3, "dot")
    assert cfg.partition == "coactivation" and cfg.moe.router_init == "lstsq"     # the dot50 recipe
    plain = parse_args(["--recipe", "none"])
    assert (plain.moe.num_experts, plain.moe.top_k, plain.moe.shared_neurons) == (8, 4, 0)
    assert plain.partition == "importance"
    assert parse_args(["--method", "cluster"]).partition == "kmeans"
    assert parse_args(["--method", "random"]).partition == "random"
    assert not cfg.checkpoint.resume and not cfg.checkpoint.overwrite


def test_public_flags_exist_and_are_unique():
    names = flag_names()
    assert len(names) == len(set(names))
    for flag in PUBLIC_FLAGS:
        assert flag in names, flag


def test_values_are_converted_to_the_field_types():
    cfg = parse_args(["--model", "123", "--num_experts", "16", "--top_k=2", "--kd_weight", "1",
                      "--resume", "--routing_ste=false", "--data", "a.txt,b.txt", "--local_rank=1"])
    assert cfg.model.model == "123"                     # a path, even if it looks like a number
    assert cfg.moe.num_experts == 16 and cfg.moe.top_k == 2
    assert cfg.objective.kd_weight == 1.0 and isinstance(cfg.objective.kd_weight, float)
    assert cfg.checkpoint.resume is True and cfg.moe.routing_ste is False
    assert cfg.data.data == "a.txt,b.txt"
    assert cfg.train.local_rank == 1


@pytest.mark.parametrize("argv, needle", [
    (["--num_expert", "4"], "unknown flag --num_expert; did you mean --num_experts?"),
    (["--frobnicate", "1"], "unknown flag --frobnicate"),
    (["train.txt"], "unexpected positional argument"),
    (["--top_k", "9"], "--top_k=9 must be between 1 and --num_experts=8"),
    (["--method", "magic"], "--method must be one of dot, random, cluster"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "2.5"], "--steps must be an integer"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--method", "random", "--partition", "kmeans"], "--method random keeps a random partition"),
    (["--tau_end", "0"], "--tau_end must be positive"),
    (["--resume=maybe"], "--resume is a switch"),
    (["--flip_check", "loss"], "--flip_check must be one of none, recon"),
    (["--recipe", "none", "--flip_check", "recon", "--recon_weight", "0"], "pass --recon_weight > 0"),
])
def test_bad_flags_name_the_problem(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert needle in str(err.value)


def test_help_lists_every_flag(capsys):
    assert parse_args(["--help"]) is None
    out = capsys.readouterr().out
    for name in flag_names():
        assert f"--{name} " in out
    assert "--num_experts (default: 8)" in help_text()


def test_config_round_trips_through_json(tmp_path):
    cfg = parse_args(["--num_experts", "4", "--top_k", "1", "--method", "cluster", "--kd_weight", "0.5"])
    cfg.save(tmp_path / "config.json")
    again = RunConfig.load(tmp_path / "config.json")
    assert again == cfg
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["moe"]["method"] == "cluster" and raw["objective"]["kd_weight"] == 0.5


def test_builtin_ds_config_is_ds_configs_z3():
    assert json.loads((ROOT / "ds_configs" / "z3.json").read_text()) == DEFAULT_DS_CONFIG
    assert load_ds_config("") == DEFAULT_DS_CONFIG


@pytest.mark.parametrize("name, stage", [("z3.json", 3), ("z3_offload.json", 3), ("z2.json", 2)])
def test_shipped_ds_configs_resolve_completely(name, stage):
    cfg = from_flags({"steps": 30, "batch_size": 3, "grad_accum": 2})
    raw = load_ds_config(str(ROOT / "ds_configs" / name))
    ds = resolve_ds_config(raw, cfg, world_size=4, tensorboard_dir="/x/tb", bf16_available=False)
    assert "auto" not in json.dumps(ds)
    assert zero_stage(ds) == stage
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["scheduler"]["params"]["total_num_steps"] == 30
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 3
    assert ds["tensorboard"]["output_path"] == "/x/tb"
    assert precision_dtype(ds).is_floating_point and str(precision_dtype(ds)) == "torch.float32"
    on_gpu = resolve_ds_config(raw, cfg, 4, "/x/tb", bf16_available=True)
    assert str(precision_dtype(on_gpu)) == "torch.bfloat16"
    assert raw["bf16"]["enabled"] == "auto"      # the raw config is left alone


def test_ds_config_conflicting_with_a_flag_is_an_error(tmp_path):
    raw = dict(DEFAULT_DS_CONFIG, train_micro_batch_size_per_gpu=8)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 but --batch_size gives 4"):
        resolve_ds_config(raw, RunConfig(), 1, "/tb", False)
    raw = dict(DEFAULT_DS_CONFIG, gradient_clipping="auto")
    with pytest.raises(ConfigError, match="\"auto\" at gradient_clipping"):
        resolve_ds_config(raw, RunConfig(), 1, "/tb", False)
    raw = {k: v for k, v in DEFAULT_DS_CONFIG.items() if k != "optimizer"}
    with pytest.raises(ConfigError, match="needs an \"optimizer\" section"):
        resolve_ds_config(raw, RunConfig(), 1, "/tb", False)


def test_bad_ds_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_ds_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(str(bad))
