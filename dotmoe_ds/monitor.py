"""What a conversion run shows while it trains: TensorBoard scalars and histograms, and a progress bar.

DeepSpeed's own monitor (the "tensorboard" section of the DeepSpeed config, pointed at
OUTPUT/tensorboard/deepspeed) logs its loss and learning rate; `Monitor` adds ours under
OUTPUT/tensorboard/dotmoe, on rank 0 only:

  loss/total, loss/ce, loss/kd, loss/load_balance, loss/z,         the objective by term (loss/recon: the
  loss/recon                                                      layer-local reconstruction error, mean
                                                                  over layers; 0 unless --recon_weight > 0)
  train/lr, train/tau, train/tokens_per_s, memory/rss_gb (CPU) or memory/cuda_max_allocated_gb
  assign/flip_rate (mean) and assign/flip_rate/layer_XX           share of neurons whose hard expert
                                                                  changed since the previous log
  assign/marginal_error (max over layers), assign/plan_entropy    Sinkhorn column error; mean row
                                                                  entropy of the soft plan (nats)
  router/load_cv (mean) and router/load_cv/layer_XX, router/entropy, router/load/expert_XX
  every step, --method dot (train.flip_scalars, score_optim.ScoreOptimizer):
  assign/flips and assign/flips/layer_XX                          neurons that changed expert in the step
  assign/moved_from_start                                         share of neurons away from their step-0 expert
  assign/scores_lr, assign/step_scale, assign/scores_grad_norm    the scores' lr (own schedule), the mean row
                                                                  scale the flip bound left (1: whole step),
                                                                  the norm of their mean gradient
  assign/skipped                                                  1: a non-finite gradient skipped the step
  histograms: router/load (every layer x expert share), assign/plan_confidence (per neuron, the
  plan's mass on its hard expert)

`assignment_stats` and `router_stats` are collective (every rank calls them: the scores may be
ZeRO-3 partitioned, and router loads are averaged over ranks); only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from dotmoe_ds import distributed as dist
from dotmoe_ds.checkpoint import atomic_write_text
from dotmoe_ds.layer import DotMoEFFN
from dotmoe_ds.sinkhorn import marginal_error


def memory_gb() -> dict[str, float]:
    """Peak accelerator memory, or the process's resident memory on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"memory/cuda_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}
    try:
        import psutil

        return {"memory/rss_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    except ImportError:     # psutil comes with deepspeed; keep the monitor optional-dependency free
        import resource

        return {"memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@torch.no_grad()
def assignment_stats(layers: Sequence[DotMoEFFN], previous: list[torch.Tensor] | None
                     ) -> tuple[dict[str, float], list[torch.Tensor], torch.Tensor]:
    """Per layer: flip rate vs `previous` hard assignments, Sinkhorn marginal error, plan entropy.

    Collective under ZeRO-3 (gathers each layer's scores in turn). Returns (scalars, the current
    hard assignments for the next call, per-neuron confidence on the hard expert for a histogram).
    """
    scalars: dict[str, float] = {}
    current, flips, errors, entropies, confidences = [], [], [], [], []
    for i, layer in enumerate(layers):
        with dist.gathered([layer.scores]):
            plan = layer.plan()
            assign = layer.hard_assignment().clone().cpu()
        current.append(assign)
        caps = layer.spec.column_capacities
        errors.append(float(marginal_error(plan, caps)))
        p = plan.clamp_min(1e-30)
        entropies.append(float(-(p * p.log()).sum(1).mean()))
        confidences.append(plan.gather(1, assign.to(plan.device)[:, None]).squeeze(1).float().cpu())
        if previous is not None and i < len(previous):
            flip = float((previous[i] != assign).float().mean())
            flips.append(flip)
            scalars[f"assign/flip_rate/layer_{i:02d}"] = flip
    if flips:
        scalars["assign/flip_rate"] = sum(flips) / len(flips)
    scalars["assign/marginal_error"] = max(errors) if errors else 0.0
    scalars["assign/plan_entropy"] = sum(entropies) / max(1, len(entropies))
    return scalars, current, torch.cat(confidences) if confidences else torch.empty(0)


@dataclass
class RouterAccumulator:
    """Sums each layer's router load and entropy over the micro-steps between two logs."""

    loads: list[torch.Tensor] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    count: int = 0

    def add(self, layers: Sequence[DotMoEFFN]) -> None:
        stats = [layer.last_router_stats for layer in layers]
        if any(s is None for s in stats):
            return
        loads = [s.load.detach().float().cpu() for s in stats]
        ent = [float(s.entropy) for s in stats]
        if not self.loads:
            self.loads = [torch.zeros_like(x) for x in loads]
            self.entropy = [0.0] * len(ent)
        for acc, x in zip(self.loads, loads):
            acc += x
        self.entropy = [a + b for a, b in zip(self.entropy, ent)]
        self.count += 1

    def reset(self) -> None:
        self.loads, self.entropy, self.count = [], [], 0


def router_stats(acc: RouterAccumulator) -> tuple[dict[str, float], torch.Tensor | None]:
    """Mean router load per layer and expert over the interval and ranks; its coefficient of
    variation per layer; router entropy. Collective. Returns (scalars, loads [L, E] or None)."""
    has = torch.tensor([float(acc.count)])
    counts = dist.all_reduce_sum(has)
    if counts.item() == 0 or not acc.loads:
        return {}, None
    loads = dist.all_reduce_sum(torch.stack(acc.loads)) / counts
    entropy = dist.all_reduce_sum(torch.tensor(acc.entropy)) / counts
    cv = loads.std(dim=1, unbiased=False) / loads.mean(dim=1).clamp_min(1e-12)
    scalars = {f"router/load_cv/layer_{i:02d}": float(c) for i, c in enumerate(cv)}
    scalars["router/load_cv"] = float(cv.mean())
    scalars["router/entropy"] = float(entropy.mean())
    for e, v in enumerate(loads.mean(0)):
        scalars[f"router/load/expert_{e:02d}"] = float(v)
    return scalars, loads


class Monitor:
    """TensorBoard writer and tqdm bar of rank 0 (a silent stand-in on other ranks)."""

    def __init__(self, log_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="converting", unit="step",
                            dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def histogram(self, step: int, name: str, values: torch.Tensor | None) -> None:
        if self.writer is None or values is None or values.numel() == 0:
            return
        self.writer.add_histogram(name, values.detach().float().reshape(-1), step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.refresh()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class Throughput:
    """Tokens per second (over every rank) since the last `rate()` call."""

    def __init__(self):
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return r


TRACE_TAGS = ("loss/", "assign/flips", "assign/moved", "assign/plan_entropy", "assign/scores_lr", "assign/undone")


# What a run's steps.json keeps of every step: the loss terms and how much of the assignment moved.
STEP_TAGS = ("loss/", "assign/moved", "assign/undone")
STEPS_FILE = "steps.json"


def events_dir(run: str | Path) -> Path:
    """The TensorBoard folder of a run folder (OUTPUT/tensorboard/dotmoe), or `run` itself."""
    run = Path(run)
    return run / "tensorboard" / "dotmoe" if (run / "tensorboard" / "dotmoe").is_dir() else run


def _has_events(run: str | Path) -> bool:
    return any(events_dir(run).glob("events.out.tfevents.*"))


def has_trace(run: str | Path) -> bool:
    """Whether `read_trace` finds something: TensorBoard events, or the run's steps.json."""
    return _has_events(run) or (Path(run) / STEPS_FILE).is_file()


def read_steps(run: str | Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the run's steps.json (write_steps); {} if it has none."""
    path = Path(run) / STEPS_FILE
    if not path.is_file():
        return {}
    return {t: {int(k): v for k, v in vals.items()} for t, vals in json.loads(path.read_text()).items()}


def read_trace(run: str | Path, prefixes: Sequence[str] = TRACE_TAGS) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of a run's run-level scalars whose tag starts with one of `prefixes`
    (per-layer tags left out), read back from its TensorBoard events; from its steps.json
    (write_steps: STEP_TAGS only) where the events are gone, e.g. in a clone of the study's results."""
    if not _has_events(run) and (Path(run) / STEPS_FILE).is_file():
        return {t: vals for t, vals in read_steps(run).items() if any(t.startswith(p) for p in prefixes)}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events_dir(run)), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if any(t.startswith(p) for p in prefixes) and "/layer" not in t]
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags}


def write_steps(run: str | Path) -> Path:
    """The run's STEP_TAGS scalars of every step as RUN/steps.json (small enough to commit, unlike the
    events with their per-layer scalars): paired runs stay comparable step by step (compare_runs)."""
    trace = read_trace(run, STEP_TAGS)
    path = Path(run) / STEPS_FILE
    # atomic: the study reads it back, and a unit killed here is not trained again to rewrite it
    atomic_write_text(path, json.dumps({t: {str(k): round(v, 6) for k, v in sorted(vals.items())}
                                        for t, vals in sorted(trace.items())}) + "\n")
    return path


def window_mean(values: dict[int, float], first: int, last: int) -> float | None:
    """Mean of `values` ({step: value}) over the steps first..last that were logged; None if none was."""
    inside = [v for s, v in values.items() if first <= s <= last]
    return sum(inside) / len(inside) if inside else None


def compare_runs(values: dict[str, dict[int, float]], window: int = 50) -> str:
    """Paired runs (the same seed: the same batches in the same order) side by side on one scalar:
    its mean per window of `window` steps over the steps every run logged, and in how many of
    those steps each run was the lowest. `values`: {run name: {step: value}}."""
    names = list(values)
    common = sorted(set.intersection(*(set(v) for v in values.values()))) if values else []
    if not common:
        return "no step logged by every run"
    window = max(int(window), 1)
    lines = ["| steps | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for start in range(common[0], common[-1] + 1, window):
        steps = [s for s in common if start <= s < start + window]
        if steps:
            means = [sum(values[n][s] for s in steps) / len(steps) for n in names]
            lines.append(f"| {steps[0]}-{steps[-1]} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    means = [sum(values[n][s] for s in common) / len(common) for n in names]
    lines.append(f"| all {len(common)} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    lowest = []                                  # the run strictly lowest at each step (None: a tie)
    for s in common:
        best = min(values[n][s] for n in names)
        at = [n for n in names if values[n][s] == best]
        lowest.append(at[0] if len(at) == 1 else None)
    lines.append("| lowest at | " + " | ".join(f"{lowest.count(n)} steps" for n in names) + " |")
    if None in lowest:
        lines.append(f"\n{lowest.count(None)} steps tied for the lowest value.")
    return "\n".join(lines)


def format_trace(trace: dict[str, dict[int, float]], every: int = 5) -> str:
    """The trace as a text table: every `every`-th logged step and the last."""
    every = max(int(every), 1)
    steps = sorted({s for v in trace.values() for s in v})
    shown = steps[::every] + ([steps[-1]] if steps and (len(steps) - 1) % every else [])
    lines = ["step " + " ".join(t.split("/", 1)[-1][:12].rjust(12) for t in trace)]
    for s in shown:
        lines.append(f"{s:4d} " + " ".join(f"{v[s]:12.4f}" if s in v else " " * 12 for v in trace.values()))
    return "\n".join(lines)

