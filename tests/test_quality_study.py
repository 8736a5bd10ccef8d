"""tools/quality_study.py: runs the trainer accepts, one budget for every method, ablations that differ
from DOT only in what they ablate, the report's arithmetic, and units that resume exactly."""
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dotmoe_ds.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
BUDGET_KEYS = ("trainable", "router_init", "lb_weight", "steps", "batch_size", "seq_len", "grad_accum", "kd_weight",
               "recon_weight")


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
    assert names[1:3] == ["dot_50", "prune_50"]            # the headline comparison comes first
    trained = [r for r in runs if r.method != "dense"]
    for run in trained:
        cfg = parse_args([f"--{k}={v}" for k, v in run.flags.items()])
        budget = next(b for b in s.budgets if b.name == run.budget)
        assert (cfg.moe.top_k, cfg.moe.shared_neurons, cfg.moe.expert_size) == (budget.top_k, budget.shared_neurons,
                                                                               budget.expert_size)
        assert cfg.train.steps == s.steps >= (200 if setting == "cpu" else 0) and cfg.data.seq_len == s.seq_len
        assert cfg.objective.kd_weight > 0 and cfg.train.seed == run.seed
        for key in BUDGET_KEYS:
            assert run.flags[key] == trained[0].flags[key], (run.name, key)
    methods = {r.method for r in trained}
    assert {"dot", "random", "cluster", "prune", "dot_frozen", "dot_random_init", "dot_random_frozen",
            "dot_no_sinkhorn", "dot_no_routing_ste"} <= methods
    for b in s.budgets:
        assert {"dot", "prune"} <= {r.method for r in trained if r.budget == b.name}
    # Two seeds for DOT, its frozen control and pruning (the noise the table states).
    for m in ("dot", "dot_frozen", "prune", "dot_checked"):
        assert {r.seed for r in trained if r.method == m and r.budget == s.budgets[0].name} == set(s.seeds)
    by_name = {r.name: r for r in trained}

    def differing(a, b):
        return {k: by_name[a].flags.get(k) for k in set(by_name[a].flags) | set(by_name[b].flags)
                if by_name[a].flags.get(k) != by_name[b].flags.get(k)}
    # Each control differs from the run it controls only in what it is about.
    assert differing("dot_no_sinkhorn_50", "dot_50") == {"assigner": "softmax"}
    assert differing("dot_no_routing_ste_50", "dot_50") == {"routing_ste": "false"}
    assert differing("dot_random_init_50", "dot_50") == {"partition": "random"}
    assert differing("dot_frozen_50", "dot_50") == {"scores_lr_scale": 0.0}
    assert differing("dot_random_frozen_50", "dot_random_init_50") == {"scores_lr_scale": 0.0}
    assert differing("dot_50_s1", "dot_50") == {"seed": 1}
    assert differing("dot_checked_50", "dot_50") == {"flip_check": "recon"}
    assert differing("dot_checked_50_s1", "dot_50_s1") == {"flip_check": "recon"}
    assert names[-1] == "dot_checked_50_s1"       # added last: the rows come first


def _ev(ppl, cloze, accs, active=100, fraction=1.0):
    return {"params": {"total": 100, "active": active, "active_ffn_fraction": fraction},
            "perplexity": {"perplexity": ppl}, "cloze": {"accuracy": cloze, "stderr": 0.04},
            "benchmarks": {"tasks": {t: {"acc": a, "n": 250} for t, a in accs.items()}}}


def test_table_and_retention_from_eval_results(study, tmp_path):
    s = study.SETTINGS["cpu"]
    dense_ev = _ev(40.0, 0.45, {"arc_easy": 0.55, "piqa": 0.70})
    moe_ev = _ev(80.0, 0.35, {"arc_easy": 0.40, "piqa": 0.60}, active=60, fraction=0.5)
    runs = study.plan_runs(s)
    doms = {"perplexity_by_domain": {"kjv": {"perplexity": 20.0}}}
    rows = [study._row(runs[0], None, dense_ev, dense_ev, s, "cpu", doms, doms),
            study._row(runs[1], {"wall_seconds": 120.0}, moe_ev, dense_ev, s, "cpu",
                       {"perplexity_by_domain": {"kjv": {"perplexity": 50.0}}}, doms, {"train": 100.0, "eval": 20.0})]
    r = rows[1]
    assert r["ppl_retention"] == pytest.approx(0.5)
    assert r["cloze_retention_above_chance"] == pytest.approx(0.10 / 0.20)
    assert r["bench_average"] == pytest.approx(0.50) and r["bench_retention"] == pytest.approx(0.50 / 0.625)
    # chance: arc_easy 0.25, piqa 0.5 -> 0.375; (0.50 - 0.375) / (0.625 - 0.375)
    assert r["bench_retention_above_chance"] == pytest.approx(0.5)
    assert r["domain_ppl_retention"] == {"kjv": pytest.approx(0.4)} and r["wall_seconds"] == 120.0
    study.write_table(rows, s, tmp_path / "q.md", {"text": "note"})
    table = (tmp_path / "q.md").read_text()
    assert r["mix_perplexity"] == pytest.approx(math.sqrt(80.0 * 50.0))      # geometric mean: Austen, kjv
    assert "| dot_50 | 50% | 0 | 0.0M / 0.0M | 50% | 80.00 | 50.0% | 50.00 | 63.25 | 50.0% | 80.0% | 50.0% " in table
    # both tasks have the dense model above chance, so the restricted average is the average
    assert r["bench_informative_tasks"] == ["arc_easy", "piqa"]
    assert r["bench_retention_informative"] == pytest.approx(0.8)
    assert "| dot_50 | 40.0% | 60.0% |" in table


def test_wall_time_counts_the_trainer_as_one_uninterrupted_invocation(study):
    """A resumed unit: study_time's train phase sums the invocations that returned (a killed one is
    missing); the trainer's run_seconds (setup + finish of the last invocation + the loop over all of
    them) replaces it when recorded."""
    s = study.SETTINGS["cpu"]
    run, ev = study.plan_runs(s)[1], _ev(80.0, 0.35, {"piqa": 0.6})
    times = {"train": 100.0, "eval": 20.0, "domains": 5.0}

    def row(res):
        return study._row(run, res, ev, ev, s, "cpu", times=times)["wall_seconds"]

    assert row({"wall_seconds": 100.0, "run_seconds": 300.0}) == pytest.approx(325.0)
    assert row({"wall_seconds": 100.0, "run_seconds": None}) == pytest.approx(125.0)   # from an old checkpoint
    assert row({"wall_seconds": 100.0}) == pytest.approx(125.0)                         # before run_seconds
    assert row(None) == pytest.approx(125.0) and times["train"] == 100.0


def test_restricted_bench_average_leaves_out_tasks_where_the_dense_model_is_not_above_chance(study, tmp_path):
    s = study.SETTINGS["cpu"]
    runs = study.plan_runs(s)
    # dense: BoolQ below chance (0.40 < 0.5), WinoGrande at chance, ARC-Challenge above chance by less than
    # two standard errors (0.27 - 0.25 < 2 sqrt(0.27 * 0.73 / 250) = 0.056): all three left out
    dense_ev = _ev(40.0, 0.45, {"arc_easy": 0.60, "arc_challenge": 0.27, "boolq": 0.40, "winogrande": 0.50,
                                "piqa": 0.70})
    moe_ev = _ev(80.0, 0.35, {"arc_easy": 0.45, "arc_challenge": 0.25, "boolq": 0.62, "winogrande": 0.55,
                              "piqa": 0.63})
    rows = [study._row(runs[0], None, dense_ev, dense_ev, s, "cpu"),
            study._row(runs[1], None, moe_ev, dense_ev, s, "cpu")]
    r = rows[1]
    assert r["bench_informative_tasks"] == ["arc_easy", "piqa"]
    assert r["bench_average_informative"] == pytest.approx(0.54)
    assert r["bench_retention_informative"] == pytest.approx(0.54 / 0.65)
    # on all four tasks the conversion "keeps" more than it does where the dense model can be measured
    assert r["bench_retention"] == pytest.approx(0.50 / 0.494)
    assert r["bench_retention"] > r["bench_retention_informative"]
    study.write_table(rows, s, tmp_path / "q.md", {"text": "note"})
    table = (tmp_path / "q.md").read_text()
    assert "| 54.0% | 83.1% |" in table and "(leaves out arc_challenge, winogrande, boolq)" in table


def test_seed_summary_states_mean_and_spread(study, tmp_path):
    s = study.SETTINGS["cpu"]
    runs = {r.name: r for r in study.plan_runs(s)}
    dense_ev = _ev(40.0, 0.45, {"arc_easy": 0.55, "piqa": 0.70})
    doms = lambda kjv: {"perplexity_by_domain": {"kjv": {"perplexity": kjv}}}   # noqa: E731
    rows = [study._row(runs["dense"], None, dense_ev, dense_ev, s, "cpu", doms(20.0), doms(20.0)),
            study._row(runs["prune_50"], None, _ev(50.0, 0.40, {"arc_easy": 0.40, "piqa": 0.60}), dense_ev, s, "cpu",
                       doms(30.0), doms(20.0)),
            study._row(runs["prune_50_s1"], None, _ev(54.0, 0.36, {"arc_easy": 0.44, "piqa": 0.60}), dense_ev, s,
                       "cpu", doms(31.0), doms(20.0)),
            study._row(runs["dot_50"], None, _ev(60.0, 0.30, {"arc_easy": 0.30, "piqa": 0.50}), dense_ev, s, "cpu")]
    summary = study.seed_summary(rows)
    assert [(e["method"], e["budget"], e["seeds"]) for e in summary] == [("prune", "50", [0, 1])]
    m = summary[0]["measures"]
    assert m["Austen ppl"]["mean"] == pytest.approx(52.0) and m["Austen ppl"]["spread"] == pytest.approx(4.0)
    assert m["bench avg"]["mean"] == pytest.approx(0.51) and m["bench avg"]["spread"] == pytest.approx(0.02)
    assert m["cloze acc"]["spread"] == pytest.approx(0.04) and m["kjv ppl"]["mean"] == pytest.approx(30.5)
    assert m["mix ppl"]["values"] == [pytest.approx(math.sqrt(50.0 * 30.0)), pytest.approx(math.sqrt(54.0 * 31.0))]
    study.write_table(rows, s, tmp_path / "q.md", {"text": "note"})
    assert m["bench avg, informative tasks"]["mean"] == pytest.approx(0.51)
    assert ("| prune | 50% | 0, 1 | 52.00 ± 2.00 | 51.0% ± 1.0% | 51.0% ± 1.0% | 38.0% ± 2.0% | 39.82 ± 1.09 "
            "| 30.50 ± 0.50 |") in \
        (tmp_path / "q.md").read_text()


def _austen_dir(root: Path) -> Path:
    """Six small 'books' with the study's file names, cut from the shipped excerpt."""
    text = (ROOT / "dotmoe_ds" / "demo_data" / "calibration" / "emma.txt").read_text()
    d = root / "austen"
    d.mkdir()
    for i, name in enumerate(("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "persuasion",
                              "northangerabbey")):
        (d / f"{name}.txt").write_text(text[i * 6000:(i + 1) * 6000])
    return d


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_interrupted_unit_resumes_exactly_and_finished_units_are_not_redone(study, tmp_path, monkeypatch):
    """A run cut off after step 2 of 4 (--stop_at_step, as a session's end or SIGTERM leaves it)
    continues from its checkpoint to the same export as an uninterrupted run; a finished run is
    never started again."""
    from dotmoe_ds.tiny_models import save_tiny_model

    save_tiny_model("llama", tmp_path / "llama")
    common = ["--setting", "smoke", "--model", str(tmp_path / "llama"), "--data_dir", str(_austen_dir(tmp_path)),
              "--calibration", "austen", "--only", "dot_50", "--train_only"]
    assert study.main([*common, "--output", str(tmp_path / "a")]) == 0
    b = tmp_path / "b"
    assert study.main([*common, "--output", str(b), "--stop_at_step", "2"]) == study.EXIT_REQUEUE
    unit = b / "runs" / "smoke" / "dot_50"
    assert not (unit / "results.json").exists() and study.resume_candidates(study.checkpoint_dir(unit))
    assert study.main([*common, "--output", str(b)]) == 0
    log = (b / "runs" / "smoke" / "dot_50.train.log").read_text()
    assert "stopped by --stop_at_step at step 2" in log and "resumed" in log.lower()
    ra, rb = (json.loads((d / "runs" / "smoke" / "dot_50" / "results.json").read_text()) for d in (tmp_path / "a", b))
    assert rb["final_train_loss"] == pytest.approx(ra["final_train_loss"], rel=1e-6, abs=1e-7)
    # The resumed invocation's run_seconds adds the loop time of steps 1-2 from the first one.
    assert rb["loop_seconds"] > 0 and rb["run_seconds"] > rb["wall_seconds"]
    assert ra["run_seconds"] == pytest.approx(ra["wall_seconds"], rel=1e-9)
    wa, wb = _weights(tmp_path / "a" / "runs" / "smoke" / "dot_50" / "model"), _weights(unit / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    trace = (unit / "trace.txt").read_text().splitlines()
    assert "recon" in trace[0] and "flips" in trace[0] and trace[-1].split()[0] == "4"
    # Finished: a third invocation starts nothing.
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: pytest.fail(f"a finished run was redone: {a}"))
    assert study.main([*common, "--output", str(b)]) == 0
    shutil.rmtree(tmp_path / "a")


def test_trace_table_round_trips_tensorboard_events(tmp_path):
    """monitor.read_trace reads back what a SummaryWriter wrote; format_trace shows every N-th step
    and always the last."""
    from torch.utils.tensorboard import SummaryWriter

    from dotmoe_ds.monitor import format_trace, read_trace

    events = tmp_path / "tensorboard" / "dotmoe"
    w = SummaryWriter(str(events))
    for step in range(1, 8):
        w.add_scalar("loss/total", 10.0 / step, step)
        w.add_scalar("assign/flips", float(step % 3), step)
        w.add_scalar("assign/flips/layer0", 99.0, step)        # per-layer: left out
    w.close()
    trace = read_trace(tmp_path)
    assert set(trace) == {"loss/total", "assign/flips"} and trace["loss/total"][4] == pytest.approx(2.5)
    lines = format_trace(trace, every=3).splitlines()
    assert [int(ln.split()[0]) for ln in lines[1:]] == [1, 4, 7]
    assert lines[0].split()[1:] == ["total", "flips"] or lines[0].split()[1:] == ["flips", "total"]


def test_steps_json_keeps_the_losses_of_every_step_for_clones_without_the_events(tmp_path, capsys, monkeypatch):
    """write_steps keeps STEP_TAGS' run-level scalars; read_trace falls back to it once the events are
    gone, and tb_trace --compare works on such folders."""
    from torch.utils.tensorboard import SummaryWriter

    from dotmoe_ds.monitor import has_trace, read_trace, write_steps

    for name, offset in (("a", 0.0), ("b", 0.5)):
        run = tmp_path / name
        w = SummaryWriter(str(run / "tensorboard" / "dotmoe"))
        for step in range(1, 7):
            w.add_scalar("loss/ce", 3.0 + offset + 1.0 / step, step)
            w.add_scalar("assign/moved", 0.01 * step, step)
            w.add_scalar("assign/plan_entropy", 1.0, step)           # not a STEP_TAG: not kept
            w.add_scalar("loss/ce/layer3", 9.0, step)                # per-layer: not kept
        w.close()
        write_steps(run)
        before = read_trace(run, ("loss/", "assign/moved"))
        shutil.rmtree(run / "tensorboard")
        assert has_trace(run)
        after = read_trace(run)
        assert set(after) == {"loss/ce", "assign/moved"}
        assert after["loss/ce"].keys() == before["loss/ce"].keys() == set(range(1, 7))
        for step, v in before["loss/ce"].items():
            assert after["loss/ce"][step] == pytest.approx(v, abs=1e-6)
    assert not has_trace(tmp_path / "none")
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import tb_trace

    tb_trace.main(compare=f"{tmp_path / 'a'},{tmp_path / 'b'}", tag="loss/ce", window=3)
    out = capsys.readouterr().out
    assert "| all 6 | 3.4083 | 3.9083 |" in out and "| lowest at | 6 steps | 0 steps |" in out


def test_train_ce_of_the_last_quarter_is_a_column(study, tmp_path):
    s = study.SETTINGS["cpu"]
    runs = study.plan_runs(s)
    assert study.last_quarter(s) == (151, 200)
    ev = _ev(40.0, 0.45, {"arc_easy": 0.55})
    steps = {"loss/ce": {k: (1.0 if k <= 150 else 2.0 + (k % 2)) for k in range(1, 201)}}
    rows = [study._row(runs[0], None, ev, ev, s, "cpu"), study._row(runs[1], None, ev, ev, s, "cpu", steps=steps)]
    assert "train_ce_last_quarter" not in rows[0] and rows[1]["train_ce_last_quarter"] == pytest.approx(2.5)
    study.write_table(rows, s, tmp_path / "q.md", {"text": "note"})
    table = (tmp_path / "q.md").read_text()
    assert "| train CE 151-200 | wall time |" in table and "| 2.5000 | - |" in table


def test_compare_runs_states_window_means_and_who_is_lowest():
    from dotmoe_ds.monitor import compare_runs

    a = {s: 1.0 for s in range(1, 11)}
    b = {s: (0.5 if s <= 4 else 2.0) for s in range(1, 11)}
    b[11] = 0.0                                            # logged by one run only: left out
    b[5] = 1.0                                             # a tie: nobody's
    lines = compare_runs({"a": a, "b": b}, window=5).splitlines()
    assert lines[2] == "| 1-5 | 1.0000 | 0.6000 |" and lines[3] == "| 6-10 | 1.0000 | 2.0000 |"
    assert lines[4] == "| all 10 | 1.0000 | 1.3000 |" and lines[5] == "| lowest at | 5 steps | 4 steps |"
    assert lines[-1] == "1 steps tied for the lowest value."


def test_backfilled_loop_time_counts_each_step_once_from_its_last_invocation(tmp_path, monkeypatch):
    """tools/backfill_run_seconds.py: an invocation killed after step 5 (checkpoint at 4) and one that
    resumed at step 5; steps 5-6 of the first were redone and count from the second only; each
    invocation's first step counts as its median step."""
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import backfill_run_seconds as backfill

    run = tmp_path / "run"
    for steps, t0, dt in ((range(1, 7), 1000.0, 10.0), (range(5, 9), 5000.0, 3.0)):
        w = SummaryWriter(str(run / "tensorboard" / "dotmoe"), filename_suffix=f".{int(t0)}")
        for i, step in enumerate(steps):
            w.add_scalar("loss/total", 1.0, step, walltime=t0 + dt * i)
        w.close()
    parts = backfill.loop_seconds_by_invocation(run)
    assert [p[1] for p in parts] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [p[2] for p in parts] == [pytest.approx(40.0), pytest.approx(12.0)]
    (run / "results.json").write_text(json.dumps({"wall_seconds": 20.0}))
    backfill.main(str(run), write=True)
    res = json.loads((run / "results.json").read_text())
    assert res["loop_seconds"] == pytest.approx(52.0) and res["run_seconds"] == pytest.approx(20.0 - 12.0 + 52.0)
