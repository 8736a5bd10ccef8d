"""The run frame both phases stand on (conversion: train.py, recovery: recover.py).

A phase supplies a preflight (flags -> a plan object, nothing expensive) and a body (process group
up: load, train, finish). The frame supplies what they share:

    launch(cfg, preflight_fn, body)   threads; the run lock (rank 0); the phase's preflight; the
                                      process group; body(plan, info, wall_start); shutdown
    open_run(plan, info)              checksum-verify the checkpoint to resume (falling back to an
                                      older intact one); rank 0 prepares OUTPUT; the DeepSpeed config
    load_data(plan)                   tokenised, packed blocks (rank 0 builds the cache)
    start_or_resume(resume, start)    the stop-signal scaffold around resuming / initialising
    stop_requested(stop, step, cfg)   a signal on any rank or --stop_at_step reached (collective)
    stopped_exit(stop, step)          the log line and exit code of a run stopped by a signal or --stop_at_step
    add_loop_time(state, since)       the training loop's seconds, carried in the checkpoints (state.loop_seconds)
    run_seconds(wall, resumed_loop)   what one uninterrupted invocation of a resumed run would have taken

and the preflight pieces: load_model_config, check_causal_lm, data_config, output_action,
check_resume_config, plus `say` (rank 0's log line). A phase's plan needs the attributes
.cfg, .output, .action, .resume_from, .ds_raw, .data_cfg, .tokenizer, .hf_config.

The lock (runlock.py) is taken by global rank 0 before the phase's preflight decides what to do with
OUTPUT (fresh, overwrite, resume), so that decision and every deletion --overwrite makes happen
under it; the other ranks do not lock (a refused rank 0 exits with code 2 and the launcher ends the
others). It is held until the run ends; a run refused in preflight removes the OUTPUT folder it
created for the lock (a folder that existed keeps the lock file only).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from dotmoe_ds import distributed as dist
from dotmoe_ds.checkpoint import (EXIT_REQUEUE, CheckpointError, CheckpointInfo, StopSignal, checkpoint_dir,
                                  mark_latest, resume_candidates, verify_checkpoint, world_size_message)
from dotmoe_ds.config import DEMO, ConfigError, RunConfig, resolve_ds_config
from dotmoe_ds.data import DataConfig, PackedData, check_config, prepare_data
from dotmoe_ds.demo import demo_data_files
from dotmoe_ds.runlock import LOCK_NAME, RunLock

EXIT_USAGE = 2


class PreflightError(ValueError):
    """Bad input found before any expensive work; the message names the problem and the fix."""


def say(msg: str) -> None:
    """One log line, printed by rank 0 only (also before the process group exists)."""
    if dist.is_main() if dist.is_initialized() else is_main_process():
        print(f"[dotmoe] {msg}", flush=True)


def is_main_process() -> bool:
    """Global rank 0, also before the process group exists (from the launcher's RANK variable)."""
    return int(os.environ.get("RANK", "0")) == 0


# ====================================================================== preflight pieces

def split_list(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.sep in name and Path(name).expanduser().exists()


def load_model_config(model: str):
    """The Hugging Face config of `model` (folder or hub id), or a PreflightError saying what is wrong."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if _looks_like_local_path(model) and not path.exists():
        raise PreflightError(f"--model {model}: no such folder; pass a local Hugging Face model folder, a hub id, "
                             "or 'demo'")
    if path.exists() and not path.is_dir():
        raise PreflightError(f"--model {model} is a file; pass the model's folder (the one with config.json)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise PreflightError(f"--model {model} has no config.json, so it is not a Hugging Face model folder; "
                             "point --model at the folder that holds config.json and the weights")
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else model)
    except Exception as err:   # unknown hub id, offline, unknown model_type: the same advice applies
        raise PreflightError(f"--model {model}: could not read its config ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}). Pass a local Hugging Face "
                             "model folder (or a hub id that is reachable/cached)") from None


def check_causal_lm(config, model: str) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "no architecture recorded"
        raise PreflightError(f"--model {model} is not a causal language model (model_type "
                             f"{config.model_type!r}, {arch}): DOT-MoE converts decoder-only LMs that "
                             "AutoModelForCausalLM can load, e.g. Llama, Mistral, Qwen2/3, OLMo 2")


def data_config(cfg: RunConfig) -> DataConfig:
    """The data flags as a DataConfig ('demo' resolved to the shipped books)."""
    d = cfg.data
    cache = d.cache_dir or None
    common = dict(seq_len=d.seq_len, text_column=d.text_column, text_unit=d.text_unit, split_seed=cfg.train.seed,
                  cache_dir=cache, encoding=d.encoding, encoding_errors=d.encoding_errors)
    if d.data.strip().lower() == DEMO:
        files = demo_data_files()
        data = [str(p) for p in files.calibration]
        eval_data = ([str(p) for p in files.heldout] if not d.eval_data else split_list(d.eval_data))
        return DataConfig(data=data, eval_data=eval_data, eval_fraction=0.0, **common)
    data = split_list(d.data)
    if not data:
        raise PreflightError("--data is empty; pass text files, a folder, a glob or a datasets hub name")
    if d.eval_data:
        return DataConfig(data=data, eval_data=split_list(d.eval_data), eval_fraction=0.0, **common)
    if d.eval_fraction <= 0:
        raise PreflightError("no held-out text: pass --eval_data, or --eval_fraction > 0 to hold out a share "
                             "of --data's documents (the converted model is evaluated on text it never saw)")
    return DataConfig(data=data, eval_data=None, eval_fraction=d.eval_fraction, eval_split=d.eval_split, **common)


def checked_data_config(cfg: RunConfig, tokenizer, hf_config) -> DataConfig:
    """data_config, checked without tokenising (data.check_config: files readable and decodable,
    JSON well formed, the text column present, some text left); the held-out split it resolves
    (documents, or paragraphs of a single document) is written back into cfg, i.e. config.json."""
    data_cfg = data_config(cfg)
    check_config(data_cfg, tokenizer, getattr(hf_config, "max_position_embeddings", None))
    if data_cfg.eval_data is None:
        cfg.data.eval_split = data_cfg.eval_split
    return data_cfg


def output_action(cfg: RunConfig, world_size: int, resume_keys: tuple[str, ...]) -> tuple[str, CheckpointInfo | None]:
    """What to do with OUTPUT: fresh | overwrite | restart (same settings, no checkpoint yet) | resume,
    and for a resume the newest checkpoint whose files have the sizes its manifest records (an older
    one when the newest is damaged; open_run also compares checksums). `resume_keys`: the flags a
    resumed run must share with the run it continues."""
    out = Path(cfg.checkpoint.output).expanduser()
    c = cfg.checkpoint
    if out.exists() and not out.is_dir():
        raise PreflightError(f"--output {out} is a file; choose a folder")
    nonempty = out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())
    ours = (out / "config.json").is_file()
    ckpts = checkpoint_dir(out)
    candidates = resume_candidates(ckpts) if out.is_dir() else []
    if c.overwrite:
        if nonempty and not ours:
            raise PreflightError(f"--output {out} is not empty and holds no config.json of an earlier dotmoe run; "
                                 "--overwrite only replaces dotmoe run folders. Choose another --output")
        return "overwrite", None
    finished = (out / "results.json").is_file()
    if c.resume:
        if not candidates:
            raise PreflightError(f"--resume: {ckpts} holds no complete checkpoint to resume from; "
                                 "drop --resume to start a new run, or check --output")
        action = "resume"
    elif nonempty:
        if candidates and not finished:
            action = "resume"      # automatic: e.g. a requeued SLURM job rerunning the same command
        elif ours and not finished:
            # A run of the same settings stopped before its first checkpoint: nothing to keep.
            check_resume_config(cfg, out / "config.json", resume_keys)
            return "restart", None
        else:
            what = "a finished run" if finished else "no dotmoe run"
            raise PreflightError(f"--output {out} already exists and holds {what}; pass --overwrite to replace it, "
                                 "--resume to continue it, or choose another --output")
    else:
        return "fresh", None
    latest = candidates[0]
    if latest.world_size != world_size:
        raise PreflightError(world_size_message(latest, world_size))
    if ours:
        check_resume_config(cfg, out / "config.json", resume_keys)
    intact = None
    for info in candidates:
        problem = verify_checkpoint(info, checksums=False)
        if problem is None:
            intact = info
            break
        say(f"checkpoint {info.path} is damaged ({problem}); falling back to an older one")
    if intact is None:
        raise CheckpointError(f"no intact checkpoint under {ckpts}: every one is damaged or incomplete (newest: "
                              f"{verify_checkpoint(candidates[0], checksums=False)}). Pass --overwrite to start "
                              "afresh, or restore the checkpoint files")
    return action, intact


def check_resume_config(cfg: RunConfig, saved_path: Path, resume_keys: tuple[str, ...]) -> None:
    try:
        saved = RunConfig.load(saved_path).flat()
    except (ConfigError, ValueError, KeyError) as err:
        raise PreflightError(f"{saved_path} cannot be read ({err}); pass --overwrite to start afresh") from None
    now = cfg.flat()
    changed = [f"--{k} {saved.get(k)!r} -> {now[k]!r}" for k in resume_keys if saved.get(k) != now.get(k)]
    if changed:
        raise PreflightError(f"--output {saved_path.parent} holds a run with other settings ({'; '.join(changed)}); "
                             "continue it with the original flags, pass --overwrite to start afresh, or choose "
                             "another --output")


# ====================================================================== the frame

def launch(cfg: RunConfig, preflight_fn: Callable, body: Callable) -> int:
    """The frame of a phase: threads, the run lock (rank 0), `preflight_fn(cfg)` (before any process
    group exists, so a bad flag costs nothing), the process group, `body(plan, info, wall_start)`,
    and always the shutdown."""
    wall_start = time.perf_counter()
    dist.set_threads(cfg.train.threads)
    lock = RunLock.acquire(cfg.checkpoint.output) if is_main_process() else None
    try:
        try:
            plan = preflight_fn(cfg)
        except BaseException:
            if lock is not None:
                lock.discard()          # refused before writing anything: leave no folder behind
            raise
        info = dist.init_distributed()
        succeeded = False
        try:
            code = body(plan, info, wall_start)
            succeeded = code == 0
            return code
        finally:
            dist.shutdown(succeeded=succeeded)
    finally:
        if lock is not None:
            lock.release()


def prepare_output(plan) -> None:
    """Rank 0: create or clear the output folder (sparing the lock) and record the resolved config."""
    import shutil

    out = plan.output
    if plan.action in ("overwrite", "restart") and out.is_dir():
        for child in out.iterdir():
            if child.name == LOCK_NAME:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    plan.cfg.save(out / "config.json")


def confirm_resume_point(plan) -> CheckpointInfo | None:
    """Collective: compare the checksums of the checkpoint preflight chose (each rank hashes a share of
    its files); if one differs, fall back to the newest older checkpoint that verifies, and point
    `latest` at it. A CheckpointError when none does."""
    if plan.resume_from is None:
        return None
    ckpts = checkpoint_dir(plan.output)
    candidates = [c for c in resume_candidates(ckpts) if c.step <= plan.resume_from.step]
    for info in candidates:
        problem = verify_checkpoint(info, checksums=True, rank=dist.rank(), world=dist.world_size())
        problems = [p for p in dist.all_gather_objects(problem) if p]
        if not problems:
            if info.tag != candidates[0].tag or (ckpts / "latest").read_text().strip() != info.tag:
                if dist.is_main():
                    mark_latest(ckpts, info.tag)
                say(f"resuming from the newest intact checkpoint, {info.path}")
            return info
        say(f"checkpoint {info.path} is damaged ({problems[0]}); falling back to an older one")
    raise CheckpointError(f"no intact checkpoint under {ckpts}: every one fails its checksums. Pass --overwrite "
                          "to start afresh, or restore the checkpoint files")


def open_run(plan, info: dist.DistInfo) -> dict:
    """Verifies the checkpoint to resume, seeds, lets rank 0 prepare OUTPUT (config.json), and resolves
    the DeepSpeed config for this world (written to OUTPUT/ds_config.json). Collective."""
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    plan.resume_from = confirm_resume_point(plan)
    torch.manual_seed(plan.cfg.train.seed)
    if info.is_main:
        prepare_output(plan)
    dist.barrier()
    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ds = resolve_ds_config(plan.ds_raw, plan.cfg, info.world_size, plan.output / "tensorboard", bf16_ok)
    if info.is_main:
        (plan.output / "ds_config.json").write_text(json.dumps(ds, indent=1) + "\n")
    return ds


def load_data(plan) -> PackedData:
    """Tokenised, packed training and held-out blocks (rank 0 builds the cache, the others then read
    it), logged."""
    with dist.main_first():
        packed = prepare_data(plan.data_cfg, plan.tokenizer, getattr(plan.hf_config, "max_position_embeddings", None))
    held = 0 if packed.eval is None else len(packed.eval)
    say(f"data: {len(packed.train)} training blocks, {held} held-out blocks of {plan.cfg.data.seq_len} tokens")
    if packed.stats.get("eval_paragraphs"):
        say(f"held out the last {packed.stats['eval_paragraphs']} of {packed.stats['paragraphs']} paragraphs of "
            f"the single document of --data (--eval_fraction {plan.data_cfg.eval_fraction}) for evaluation")
    return packed


def start_or_resume(resume: Callable, start: Callable):
    """(stop, state): a StopSignal installed before `resume()` or `start()` runs (so a signal that
    arrives meanwhile is honoured at the first step boundary), removed again if they fail."""
    stop = StopSignal().install()
    try:
        return stop, resume() if resume is not None else start()
    except BaseException:
        stop.uninstall()
        raise


def stop_requested(stop: StopSignal, step: int, cfg: RunConfig) -> bool:
    """Collective: a stop signal on any rank, or `--stop_at_step` reached before the last step."""
    at = cfg.checkpoint.stop_at_step
    return dist.any_rank(stop.requested) or (0 < at <= step < cfg.train.steps)


def add_loop_time(state, since: float) -> float:
    """Add the seconds since `since` to `state.loop_seconds`, the training loop's time up to the state's
    step summed over the invocations that reached it (a phase keeps it in its checkpoints, so steps a
    killed invocation took after its last checkpoint are redone and counted once). It stays None when
    the run resumed from a checkpoint that did not record it. Returns now: the next step's `since`."""
    now = time.perf_counter()
    if state.loop_seconds is not None:
        state.loop_seconds += now - since
    return now


def run_seconds(wall_seconds: float, resumed_loop_seconds: float | None) -> float | None:
    """What one uninterrupted invocation would have taken: this invocation's wall time (its setup, its
    share of the loop, its finish) plus the loop time of the invocations before it, as the checkpoint it
    resumed from carried it (0 for a fresh run); None when that checkpoint did not record it. A resumed
    run's wall_seconds covers only its last invocation."""
    return None if resumed_loop_seconds is None else wall_seconds + resumed_loop_seconds


def stopped_exit(stop: StopSignal, step: int) -> int:
    why = f"signal {stop.received}" if stop.requested else "--stop_at_step"
    say(f"stopped by {why} at step {step}; checkpoint saved, exiting with {EXIT_REQUEUE} "
        "(rerun the same command with --resume to go on)")
    return EXIT_REQUEUE
