"""Recipes (dotmoe_ds/recipes.py): what a command line gets from `--recipe`, and the d_ff-relative
budget (--shared_fraction) they use, resolved per model family in the trainer's preflight."""
import json
from dataclasses import asdict

import pytest

from dotmoe_ds import train
from dotmoe_ds.config import ConfigError, RunConfig, parse_args
from dotmoe_ds.recipes import BUDGET_FLAGS, DOT50, RECIPES
from dotmoe_ds.spec import MoESpec, SpecError, routed_instead_of_shared, shared_from_fraction
from dotmoe_ds.tiny_models import save_tiny_model


def test_no_flags_get_the_dot50_recipe():
    cfg = parse_args([])
    assert cfg.moe.recipe == "dot50"
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.shared_fraction, cfg.moe.shared_neurons) == (16, 4, 1 / 3, 0)
    o = cfg.objective
    assert (o.trainable, o.kd_weight, o.recon_weight, o.scores_lr_scale, cfg.moe.beta) == ("ffn", 1.0, 1.0, 30.0, 1.0)
    assert (o.max_flip_frac, o.scores_settle_frac, o.flip_check) == (0.01, 0.75, "recon")
    assert cfg.partition == "coactivation"      # DOT with a shared expert starts from co-activation


def test_recipe_none_is_the_plain_defaults():
    plain = RunConfig()
    got = parse_args(["--recipe", "none"])
    assert {k: v for k, v in asdict(got.moe).items() if k != "recipe"} == \
           {k: v for k, v in asdict(plain.moe).items() if k != "recipe"}
    assert got.objective == plain.objective and got.partition == "importance"


@pytest.mark.parametrize("flag, value", [("top_k", "2"), ("num_experts", "4"), ("shared_neurons", "8"),
                                         ("expert_size", "8"), ("active_fraction", "0.25"), ("capacities", "4,4")])
def test_any_budget_flag_drops_the_whole_recipe_budget(flag, value):
    cfg = parse_args([f"--{flag}", value])
    plain = RunConfig().moe
    for name in BUDGET_FLAGS:
        if name != flag:
            assert getattr(cfg.moe, name) == getattr(plain, name), name
    assert cfg.objective.trainable == "ffn" and cfg.objective.kd_weight == 1.0   # the training part stays


def test_a_given_training_flag_wins_over_the_recipe_the_others_stay():
    cfg = parse_args(["--kd_weight", "0", "--trainable", "assignment"])
    assert cfg.objective.kd_weight == 0.0 and cfg.objective.trainable == "assignment"
    assert cfg.objective.recon_weight == DOT50.training["recon_weight"]
    assert cfg.moe.num_experts == 16                          # no budget flag: the recipe budget


def test_recovery_takes_no_recipe():
    cfg = parse_args(["--phase", "recover"])
    assert cfg.objective == RunConfig().objective and cfg.moe.num_experts == RunConfig().moe.num_experts


@pytest.mark.parametrize("argv, needle", [
    (["--recipe", "fast"], "--recipe must be one of dot50, none"),
    (["--shared_fraction", "0.2", "--shared_neurons", "8"], "give one of them"),
    (["--shared_fraction", "1"], "--shared_fraction must be in [0, 1)"),
])
def test_bad_recipe_flags_are_refused(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert needle in str(err.value)


def test_every_recipe_value_is_a_flag_of_its_type():
    for recipe in RECIPES.values():
        values = {**recipe.budget, **recipe.training}
        # all at once: some values need others (--flip_check recon needs --recon_weight > 0)
        cfg = parse_args(["--recipe", "none", *(arg for name, value in values.items() for arg in (f"--{name}", str(value)))])
        for name, value in values.items():
            assert any(getattr(section, name, object()) == value for section in vars(cfg).values()), name


@pytest.mark.parametrize("d_ff, multiple, shared", [(1536, 16, 512), (96, 16, 32), (14336, 16, 4784),
                                                     (128, 16, 48), (112, 16, 32), (1536, 64, 512)])
def test_shared_from_fraction_is_the_nearest_equal_split(d_ff, multiple, shared):
    got = shared_from_fraction(d_ff, 1 / 3, multiple)
    assert got == shared and (d_ff - got) % multiple == 0
    # nearest: moving one multiple either way is no closer to a third of d_ff
    assert abs(got - d_ff / 3) <= multiple / 2 + 1e-9


def test_shared_from_fraction_bounds():
    assert shared_from_fraction(96, 0.0, 16) == 0
    assert shared_from_fraction(100, 0.01, 16) == 4            # routed 96 = 6 x 16 (d_ff not a multiple)
    with pytest.raises(SpecError):
        shared_from_fraction(96, 1.0, 16)
    with pytest.raises(SpecError):
        shared_from_fraction(8, 0.5, 16)


def test_routed_instead_of_shared_keeps_the_active_share():
    spec = MoESpec.uniform(1536, 16, top_k=4, shared=512)
    routed = routed_instead_of_shared(spec)
    assert (routed.shared, routed.num_experts, routed.top_k) == (0, 16, 8)
    assert routed.active_fraction == spec.active_fraction == 0.5


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text("It is a truth universally acknowledged. " * 200)
    return {family: save_tiny_model(family, root / family) for family in ("llama", "olmo2")} | {"root": root}


def _argv(tiny_models, family, *extra):
    root = tiny_models["root"]
    return ["--model", str(tiny_models[family]), "--data", str(root / "text"), "--eval_fraction", "0.5",
            "--output", str(root / f"out_{family}"), "--seq_len", "32", "--cache_dir", str(root / "cache"), *extra]


def test_preflight_resolves_the_recipe_budget_and_records_it(tiny_models, capsys, no_expensive_work):
    # tiny llama: d_ff 96 -> 32 shared + 16 x 4, top-4: 48 of 96 (50%), exported as Qwen2-MoE
    plan = train.preflight(train.parse_args(_argv(tiny_models, "llama")))
    assert (plan.spec.shared, plan.spec.num_experts, plan.spec.top_k) == (32, 16, 4)
    assert plan.spec.active_fraction == 0.5
    assert plan.adapter.for_spec(plan.spec).target_architecture == "Qwen2MoeForCausalLM"
    assert (plan.cfg.moe.shared_neurons, plan.cfg.moe.shared_fraction) == (32, 0.0)   # config.json: neurons
    saved = tiny_models["root"] / "config.json"
    plan.cfg.save(saved)
    again = RunConfig.load(saved)
    assert again == plan.cfg and json.loads(saved.read_text())["moe"]["recipe"] == "dot50"
    assert "budget: 32 shared + 16 x 4, top-4: 48 of 96 neurons active (50.0%)" in capsys.readouterr().out


def test_a_family_without_a_shared_expert_gets_the_same_share_routed(tiny_models, capsys, no_expensive_work):
    # OLMo 2 exports to FlexOlmo, which has no shared expert: 48 + 16 x 5 (53%) becomes 16 x 8, top-8 (50%)
    plan = train.preflight(train.parse_args(_argv(tiny_models, "olmo2")))
    assert (plan.spec.shared, plan.spec.num_experts, plan.spec.top_k) == (0, 16, 8)
    assert plan.cfg.moe.shared_neurons == 0 and plan.cfg.moe.shared_fraction == 0.0
    out = capsys.readouterr().out
    assert "note: no shared expert for this model" in out and "top_k is 8" in out
    # asked for in neurons, a shared expert the family cannot export stays an error
    with pytest.raises(train.FamilyError, match="Set --shared_neurons 0"):
        train.preflight(train.parse_args(_argv(tiny_models, "olmo2", "--shared_neurons", "32", "--num_experts", "6",
                                               "--top_k", "2")))
