"""Budget flags: --expert_size / --active_fraction / --capacities resolve to an exact MoESpec or are
refused (before the model loads) with the nearest exact budgets."""
import json

import pytest

from dotmoe_ds import runframe, train
from dotmoe_ds.spec import SpecError, describe_budget, resolve_budget
from dotmoe_ds.tiny_models import save_tiny_model

DEFAULTS = dict(num_experts=8, top_k=4, default_num_experts=8, default_top_k=4)


def resolve(d_ff=1536, **kw):
    return resolve_budget(d_ff, **{**DEFAULTS, **kw})


@pytest.mark.parametrize("shared,size,fraction,E,k", [
    (512, 64, 0.5, 16, 4),      # 512 + 16 x 64, k4: the anchors' best budget
    (512, 16, 0.5, 64, 16),     # 512 + 64 x 16, k16
    (0, 192, 0.5, 8, 4),        # today's default budget, said the other way
    (384, 64, 0.5, 18, 6),
    (0, 12, 0.25, 128, 32),     # fine-grained: 128 experts
])
def test_expert_size_and_fraction_resolve_exactly(shared, size, fraction, E, k):
    spec = resolve(shared=shared, expert_size=size, active_fraction=fraction)
    assert (spec.num_experts, spec.top_k, spec.shared) == (E, k, shared)
    assert spec.capacities == (size,) * E
    assert spec.active_fraction == fraction
    assert spec.shared + k * size == fraction * 1536


def test_a_few_hundred_experts_any_k():
    spec = resolve(d_ff=28672, expert_size=128, active_fraction=0.5)
    assert (spec.num_experts, spec.top_k) == (224, 112)
    spec = resolve(d_ff=28672, num_experts=300, top_k=7, shared=0)
    assert spec.num_experts == 300 and sum(spec.capacities) == 28672 and max(spec.capacities) - min(spec.capacities) == 1


def test_plain_flags_unchanged():
    spec = resolve(num_experts=8, top_k=4)
    assert spec.capacities == (192,) * 8 and spec.top_k == 4


def test_expert_size_that_does_not_divide_suggests_exact_ones():
    with pytest.raises(SpecError) as err:
        resolve(shared=512, expert_size=100)
    msg = str(err.value)
    assert "does not divide the 1024 routed neurons" in msg
    assert "--expert_size 32 or 64 or 128 with --shared_neurons 512" in msg   # the divisors nearest 100
    # the suggested shared sizes make (1536 - shared) a multiple of 100
    assert "--shared_neurons 436 or 536" in msg
    for s in (436, 536):
        assert resolve(shared=s, expert_size=100).capacities[0] == 100


def test_active_fraction_not_reachable_suggests_nearest():
    with pytest.raises(SpecError) as err:
        resolve(shared=512, expert_size=64, active_fraction=0.45)
    msg = str(err.value)
    assert "cannot be met exactly" in msg and "top_k=2.8" in msg
    assert "--top_k 2 gives 0.4167" in msg and "--top_k 3 gives 0.4583" in msg


def test_active_fraction_suggests_a_shared_size_when_one_is_exact():
    # 0.5 of 96 = 48 active; 4 experts of 24 and k=1 gives 24; k=1 with shared s: s + (96-s)/4 = 48 -> s=32
    with pytest.raises(SpecError, match="--top_k 1 --shared_neurons 32 gives exactly 0.5"):
        resolve(d_ff=96, num_experts=4, active_fraction=0.5, top_k=4, default_top_k=4, shared=8)
    assert resolve(d_ff=96, num_experts=4, shared=32, active_fraction=0.5).top_k == 1


@pytest.mark.parametrize("kw,needle", [
    (dict(shared=1536), "--shared_neurons=1536 is not smaller than the model's d_ff=1536"),
    (dict(shared=2000), "not smaller than the model's d_ff"),
    (dict(capacities="100,200"), "capacities that do not add up"),
    (dict(capacities="1000,400", shared=100, num_experts=3), "--capacities lists 2 experts"),
    (dict(shared=512, expert_size=64, num_experts=10), "disagrees with --expert_size=64"),
    (dict(shared=512, expert_size=64, active_fraction=0.5, top_k=2), "--top_k=2 disagrees"),
    (dict(capacities="768,768", expert_size=64), "give one of them"),
    (dict(capacities="7,x"), "comma-separated"),
])
def test_bad_budgets_refused(kw, needle):
    with pytest.raises(SpecError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        resolve(**kw)


def test_capacities_nonuniform():
    spec = resolve(capacities="400,300,200,124", shared=512, top_k=2)
    assert spec.capacities == (400, 300, 200, 124) and spec.shared == 512
    assert describe_budget(spec).startswith("512 shared + 4 experts [400, 300, 200, 124], top-2")


def test_describe_budget():
    assert describe_budget(resolve(shared=512, expert_size=64, active_fraction=0.5)) == \
        "512 shared + 16 x 64, top-4: 768 of 1536 neurons active (50.0%)"


# ---------------------------------------------------------------------- through the trainer's preflight

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    text = root / "text"
    text.mkdir()
    (text / "a.txt").write_text("It is a truth universally acknowledged. " * 200)
    return {"model": save_tiny_model("llama", root / "llama"), "data": text}


def _argv(tiny, tmp_path, **flags):
    base = {"model": str(tiny["model"]), "data": str(tiny["data"]), "eval_fraction": "0.5",
            "output": str(tmp_path / "out"), "seq_len": "32", "cache_dir": str(tmp_path / "cache")}
    return [x for k, v in {**base, **flags}.items() for x in (f"--{k}", str(v))]


def test_preflight_resolves_and_records_the_budget(tiny, tmp_path, capsys):
    # tiny llama: d_ff 96; 32 shared + 8 x 8, k 2 -> (32 + 16) / 96 = 0.5
    cfg = train.parse_args(_argv(tiny, tmp_path, shared_neurons=32, expert_size=8, active_fraction=0.5))
    plan = train.preflight(cfg)
    assert (plan.spec.num_experts, plan.spec.top_k, plan.spec.shared) == (8, 2, 32)
    assert plan.adapter.for_spec(plan.spec).target_architecture == "Qwen2MoeForCausalLM"
    assert "budget: 32 shared + 8 x 8, top-2: 48 of 96 neurons active (50.0%)" in capsys.readouterr().out
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (8, 2)
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["moe"]["num_experts"] == 8 and saved["moe"]["top_k"] == 2 and saved["moe"]["expert_size"] == 8


@pytest.mark.parametrize("flags,needle", [
    (dict(shared_neurons=96), "not smaller than the model's d_ff=96"),
    (dict(expert_size=10), "does not divide the 96 routed neurons"),
    (dict(num_experts=4, active_fraction=0.3), "cannot be met exactly"),
    (dict(capacities="40,40"), "capacities that do not add up"),
])
def test_preflight_refuses_bad_budgets_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch, flags, needle):
    def forbidden(*a, **k):
        raise AssertionError("expensive work started before the budget was checked")
    monkeypatch.setattr(train, "build_model", forbidden)
    monkeypatch.setattr(runframe, "prepare_data", forbidden)
    monkeypatch.setattr(train.dist, "init_distributed", forbidden)
    assert train.main(_argv(tiny, tmp_path, **flags)) == train.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("dotmoe: error: ") and "Traceback" not in err and needle in err, err
    assert not (tmp_path / "out").exists()
