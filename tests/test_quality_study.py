"""tools/quality_study.py plans runs that the trainer accepts, with one budget for every method."""
import importlib.util
import sys
from pathlib import Path

import pytest

from dotmoe_ds.config import parse_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("quality_study", ROOT / "tools" / "quality_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("setting", ["cpu", "full"])
def test_every_run_parses_and_shares_the_budget(study, setting):
    s = study.SETTINGS[setting]
    runs = study.plan_runs(s)
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) and names[0] == "dense"
    budget_keys = ("trainable", "router_init", "lb_weight", "seed", "num_experts", "steps", "batch_size",
                   "seq_len", "grad_accum", "kd_weight")
    trained = [r for r in runs if r.method != "dense"]
    for run in trained:
        cfg = parse_args([f"--{k}={v}" for k, v in run.flags.items()])
        assert cfg.moe.top_k == run.top_k and cfg.train.steps == s.steps and cfg.data.seq_len == s.seq_len
        for key in budget_keys:
            assert run.flags[key] == trained[0].flags[key], (run.name, key)
    methods = {r.method for r in trained}
    assert {"dot", "random", "cluster", "prune", "dot_no_sinkhorn", "dot_no_routing_ste", "dot_random_init"} <= methods
    # Every budget has DOT and pruning; the ablations differ from DOT only in what they ablate.
    for k in s.budgets:
        assert {"dot", "prune"} <= {r.method for r in trained if r.top_k == k}
    dot = next(r for r in trained if r.method == "dot" and r.top_k == s.ablation_budget)
    for ablation, (flag, value) in {"dot_no_sinkhorn": ("assigner", "softmax"),
                                    "dot_no_routing_ste": ("routing_ste", "false"),
                                    "dot_random_init": ("partition", "random")}.items():
        run = next(r for r in trained if r.method == ablation)
        differing = {k for k in set(run.flags) | set(dot.flags) if run.flags.get(k) != dot.flags.get(k)}
        assert differing == {flag} and run.flags[flag] == value, (ablation, differing)


def test_table_and_retention_from_eval_results(study, tmp_path):
    s = study.SETTINGS["cpu"]
    dense_ev = {"params": {"total": 100, "active": 100, "active_ffn_fraction": 1.0},
                "perplexity": {"perplexity": 40.0}, "cloze": {"accuracy": 0.45, "stderr": 0.04, "accuracy_norm": 0.5}}
    moe_ev = {"params": {"total": 100, "active": 60, "active_ffn_fraction": 0.5},
              "perplexity": {"perplexity": 80.0}, "cloze": {"accuracy": 0.35, "stderr": 0.04, "accuracy_norm": 0.4}}
    runs = study.plan_runs(s)
    rows = [study._row(runs[0], None, dense_ev, dense_ev, s, "cpu"),
            study._row(runs[1], {"wall_seconds": 120.0}, moe_ev, dense_ev, s, "cpu")]
    assert rows[1]["ppl_retention"] == pytest.approx(0.5)
    assert rows[1]["cloze_retention"] == pytest.approx(0.35 / 0.45)
    assert rows[1]["cloze_retention_above_chance"] == pytest.approx(0.10 / 0.20)
    study.write_table(rows, s, tmp_path / "q.md", {"text": "note"})
    table = (tmp_path / "q.md").read_text()
    assert "| dot | 4/8 | 0.0M / 0.0M | 50% | 80.00 | 35.0% ± 4.0% | 50.0% | 77.8% | 50.0% | 2.0 min |" in table
