"""Recovery training of an exported MoE with DeepSpeed expert parallelism (AutoEP), under ZeRO-3 or ZeRO-2.

    deepspeed dotmoe_ds/train.py --phase recover --model RUN/model --deepspeed ds_configs/z3_ep.json \
        --ep_size N --data corpus/ --output runs/recover --steps 1000 --trainable all

Steps (every rank runs all of them; rank 0 alone writes files):
 1. preflight: the model folder is an export of ours (config.json + dotmoe.json) of a family AutoEP
    can take; the expert-parallel size divides the world size and the number of experts; data,
    output folder and DeepSpeed config are checked. Nothing is loaded before all of that passed.
 2. load the MoE (sharded at creation under ZeRO-3); `deepspeed.initialize` with an
    "expert_parallel" section (the family's AutoEP preset, or custom patterns for FlexOlmo)
    replaces every MoE block by an AutoEPMoELayer holding E / ep_size experts per rank.
 3. train (next-token cross-entropy) with the trainer's data order, TensorBoard, atomic
    checkpoints, SIGTERM/SIGUSR1 -> checkpoint and exit 75; a rerun resumes.
 4. export again as the same standard HF checkpoint (per-expert on-disk layout), one decoder layer
    at a time: ZeRO-3 gathers a layer's parameters, the experts are all-gathered over the layer's
    expert-parallel group, and rank 0 streams them into safetensors shards. `dotmoe.json` is
    carried over with a "recoveries" record appended; held-out perplexity goes to results.json.

Checkpoints cannot be consolidated by DeepSpeed's tools for AutoEP + ZeRO-3 (zero_to_fp32 and
_zero3_consolidated_16bit_state_dict raise NotImplementedError; ds_to_universal names experts
w1/w2/w3), which is why the export walks the live engine instead.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dotmoe_ds import distributed as dist
from dotmoe_ds.autoep_compat import apply_autoep_compat
from dotmoe_ds.checkpoint import (CheckpointError, CheckpointInfo, StopSignal, atomic_write_text, checkpoint_dir,
                                  load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from dotmoe_ds.config import RunConfig, load_ds_config, precision_dtype, resolve_ds_config, zero_stage
from dotmoe_ds.data import DataConfig, DataError, PackedData, train_batches
from dotmoe_ds.evaluate import perplexity, token_nll
from dotmoe_ds.export import (TOKENIZER_FILES, ExportError, PlannedTensor, StreamingShardWriter, check_output_dir,
                              move_into_place, read_dotmoe, tensor_shape, write_json)
from dotmoe_ds.families import ADAPTERS, FamilyAdapter
from dotmoe_ds.monitor import Monitor, Throughput, memory_gb
from dotmoe_ds.provenance import portable_command, public_model_name
from dotmoe_ds.runframe import (PreflightError, add_loop_time, checked_data_config, launch, load_data,
                                load_model_config, open_run, output_action, run_seconds, say, start_or_resume,
                                stop_requested, stopped_exit)

# The settings a resumed recovery must share with the run it continues, besides train.RESUME_KEYS:
# the expert-parallel size fixes how the experts are partitioned in the checkpoint.
RECOVER_RESUME_KEYS = ("phase", "ep_size", "trainable")
# The settings every resumed recovery must share with the run it continues (data order, optimisation).
TRAINING_RESUME_KEYS = ("model", "data", "eval_data", "eval_fraction", "seq_len", "batch_size", "grad_accum",
                        "text_column", "text_unit", "router_lr_scale", "weights_lr_scale", "steps", "seed")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class RecoverError(PreflightError):
    """A recovery run that cannot start; the message names the problem and the fix."""


# ====================================================================== expert parallelism

# AutoEP's view of each target family we export: a preset name, or custom patterns over transformers
# v5's fused expert modules (`mlp.gate` router, `mlp.experts.gate_up_proj` / `down_proj`).
AUTOEP_PRESETS = {"mixtral": "mixtral", "qwen2_moe": "qwen3_moe", "qwen3_moe": "qwen3_moe"}
_CUSTOM = {"flex_olmo": dict(moe_layer_pattern=r"model\.layers\.\d+\.mlp", router_pattern="gate",
                             expert_pattern="experts", num_experts_attr="num_experts",
                             top_k_attr="num_experts_per_tok", score_func="softmax")}


def num_experts_of(config) -> int:
    n = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not n:
        raise RecoverError(f"the model ({config.model_type}) has no num_local_experts / num_experts: --phase "
                           "recover trains an exported MoE; point --model at OUTPUT/model of a conversion")
    return int(n)


def expert_parallel_section(config, ep_size: int, base: dict | None = None) -> dict:
    """The DeepSpeed "expert_parallel" section for an exported MoE of `config`'s family.

    `base` (the DeepSpeed config's own section) keeps its tuning keys (use_grouped_mm, comm_backend,
    ...); the family's preset or patterns and the size are set here."""
    model_type = config.model_type
    section = dict(base or {})
    section.update(enabled=True, autoep_size=int(ep_size))
    if model_type in AUTOEP_PRESETS:
        section.setdefault("preset_model", AUTOEP_PRESETS[model_type])
    elif model_type in _CUSTOM:
        for key, value in _CUSTOM[model_type].items():
            section.setdefault(key, value)
        section.setdefault("route_norm", bool(getattr(config, "norm_topk_prob", True)))
    else:
        known = ", ".join(sorted([*AUTOEP_PRESETS, *_CUSTOM]))
        raise RecoverError(f"DeepSpeed AutoEP cannot take a {model_type} model: recovery training supports the "
                           f"MoE families dotmoe exports ({known}); --model must be an export of ours")
    if model_type == "qwen2_moe" and getattr(config, "shared_expert_intermediate_size", 0):
        # AutoEP's qwen3_moe preset runs Qwen2-MoE's shared expert and its sigmoid gate as is.
        section.setdefault("has_shared_experts", True)
    return section


def resolve_ep_size(flag: int, ds_raw: dict, world_size: int, num_experts: int) -> int:
    """The expert-parallel size: --ep_size, else the DeepSpeed config's autoep_size, else 1; refused
    unless it divides both the world size and the number of experts."""
    section = ds_raw.get("expert_parallel") or {}
    if flag:
        ep, where = flag, "--ep_size"
    else:
        raw = section.get("autoep_size", 1) if section.get("enabled", True) else 1
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
            raise RecoverError(f"expert_parallel.autoep_size in the DeepSpeed config must be a positive integer, "
                               f"got {raw!r}; set it, or pass --ep_size N")
        ep, where = raw, "expert_parallel.autoep_size of the DeepSpeed config"
    if world_size % ep or num_experts % ep:
        fits = [n for n in range(1, world_size + 1) if world_size % n == 0 and num_experts % n == 0]
        raise RecoverError(f"{where}={ep} cannot spread {num_experts} experts over {world_size} rank(s): the "
                           f"expert-parallel size must divide both the number of ranks and the number of experts; "
                           f"pass --ep_size with one of {fits}, or change the number of processes")
    return ep


def target_adapter(config) -> FamilyAdapter:
    """The adapter whose export target is `config`'s MoE family (for the on-disk tensor names)."""
    for adapter in ADAPTERS:
        if adapter.target_model_type == config.model_type:
            return adapter
    raise RecoverError(f"{config.model_type} is not a family dotmoe exports "
                       f"({', '.join(sorted({a.target_model_type for a in ADAPTERS}))})")


# ====================================================================== preflight

@dataclass
class RecoveryPlan:
    cfg: RunConfig
    output: Path
    model_path: str
    hf_config: Any
    meta: dict                  # the export's dotmoe.json
    adapter: FamilyAdapter      # on-disk names of the MoE family
    tokenizer: Any
    data_cfg: DataConfig
    ds_raw: dict                # the DeepSpeed config with its expert_parallel section filled in
    ep_size: int
    action: str
    resume_from: CheckpointInfo | None = None
    notes: list[str] = field(default_factory=list)


def _check_recover_resume(cfg: RunConfig, saved_path: Path) -> None:
    if not saved_path.is_file():
        return
    saved = RunConfig.load(saved_path).flat()
    now = cfg.flat()
    changed = [f"--{k} {saved.get(k)!r} -> {now[k]!r}" for k in RECOVER_RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        raise RecoverError(f"--output {saved_path.parent} holds a run with other settings ({'; '.join(changed)}); "
                           "continue it with the original flags, pass --overwrite, or choose another --output")


def preflight_recovery(cfg: RunConfig) -> RecoveryPlan:
    """Every check of a recovery run that needs no weights and no process group."""
    from transformers import AutoTokenizer

    world = dist.env_info().world_size
    model_path = cfg.model.model
    folder = Path(model_path).expanduser()
    if not (folder / "dotmoe.json").is_file():
        raise RecoverError(f"--model {model_path} is not an MoE exported by dotmoe (no dotmoe.json): --phase recover "
                           "continues training OUTPUT/model of a conversion; pass that folder")
    hf_config = load_model_config(str(folder))
    experts = num_experts_of(hf_config)
    adapter = target_adapter(hf_config)
    meta = read_dotmoe(folder)
    ds_raw = load_ds_config(cfg.train.deepspeed)
    ep_size = resolve_ep_size(cfg.moe.ep_size, ds_raw, world, experts)
    ds_raw["expert_parallel"] = expert_parallel_section(hf_config, ep_size, ds_raw.get("expert_parallel"))
    if cfg.objective.kd_weight or cfg.objective.z_weight:
        raise RecoverError("--kd_weight and --z_weight belong to the conversion; recovery training minimises "
                           "next-token cross-entropy only: drop them")
    action, resume_from = output_action(cfg, world, TRAINING_RESUME_KEYS)
    if resume_from is not None or action == "restart":
        _check_recover_resume(cfg, Path(cfg.checkpoint.output).expanduser() / "config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise RecoverError(f"--model {model_path}: its tokenizer cannot be loaded ({type(err).__name__}); the export "
                           "folder needs the tokenizer files the exporter copies") from None
    data_cfg = checked_data_config(cfg, tokenizer, hf_config)
    resolve_ds_config(ds_raw, cfg, world, Path(cfg.checkpoint.output) / "tensorboard", bf16_available=False)
    return RecoveryPlan(cfg=cfg, output=Path(cfg.checkpoint.output).expanduser(), model_path=str(folder),
                        hf_config=hf_config, meta=meta, adapter=adapter, tokenizer=tokenizer, data_cfg=data_cfg,
                        ds_raw=ds_raw, ep_size=ep_size, action=action, resume_from=resume_from)


# ====================================================================== model and optimiser

def _is_router(name: str) -> bool:
    return name.endswith(".mlp.gate.weight")


def _in_moe_block(name: str) -> bool:
    return ".mlp." in name


def select_trainable(model: nn.Module, trainable: str, base_lr: float, router_lr_scale: float,
                     weights_lr_scale: float) -> list[dict]:
    """requires_grad per --trainable (assignment: routers; ffn: the MoE blocks; all: everything) and
    the parameter groups, by the HF names before AutoEP replaces the blocks (DeepSpeed re-points the
    groups at the replacement's parameters)."""
    routers, weights = [], []
    for name, p in model.named_parameters():
        train = trainable == "all" or _is_router(name) or (trainable == "ffn" and _in_moe_block(name))
        p.requires_grad_(train)
        if train:
            (routers if _is_router(name) else weights).append(p)
    # Named groups: DeepSpeed splits each into its expert ("moe") and other parameters after the
    # AutoEP replacement (ZeRO-2 reduces expert gradients over the expert-data-parallel group only).
    groups = [{"name": "routers", "params": routers, "lr": base_lr * router_lr_scale, "weight_decay": 0.0},
              {"name": "weights", "params": weights, "lr": base_lr * weights_lr_scale}]
    return [g for g in groups if g["params"]]


def build_engine(plan: RecoveryPlan, ds: dict):
    """(engine, keep-alive) with every MoE block an AutoEPMoELayer over expert-parallel groups."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    apply_autoep_compat()
    cfg = plan.cfg
    hf_ds = None
    if zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds)   # transformers keeps a weak reference: keep it alive
    model = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=precision_dtype(ds))
    model.config.use_cache = False
    o = cfg.objective
    groups = select_trainable(model, o.trainable, float(ds["optimizer"]["params"]["lr"]), o.router_lr_scale,
                              o.weights_lr_scale)
    if o.trainable != "all":
        model.enable_input_require_grads()   # ZeRO-3 needs a gradient path through frozen embeddings
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    layers = autoep_layers(engine.module)
    if len(layers) != plan.hf_config.num_hidden_layers:
        raise RecoverError(f"AutoEP replaced {len(layers)} of {plan.hf_config.num_hidden_layers} MoE blocks; "
                           "every layer of an export of ours is sparse, so the expert_parallel patterns do not fit")
    return engine, hf_ds


def autoep_layers(model: nn.Module) -> list[nn.Module]:
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, AutoEPMoELayer)]


# ====================================================================== training

@dataclass
class RecoveryState:
    step: int = 0
    losses: list = field(default_factory=list)     # (step, mean CE over ranks)
    loop_seconds: float | None = 0.0               # the training loop's time (runframe.add_loop_time)

    @property
    def last_loss(self) -> float:
        return self.losses[-1][1] if self.losses else float("nan")


def save_recovery_checkpoint(engine, plan: RecoveryPlan, state: RecoveryState) -> CheckpointInfo:
    client = {"dotmoe_recover": {"step": state.step, "micro_step": state.step * plan.cfg.data.grad_accum,
                                 "losses": state.losses, "loop_seconds": state.loop_seconds,
                                 "ep_size": plan.ep_size}}
    return save_checkpoint(engine, checkpoint_dir(plan.output), state.step, client, {"rng": rng_state()},
                           keep=plan.cfg.checkpoint.keep_checkpoints)


def resume_recovery(engine, info: CheckpointInfo) -> RecoveryState:
    client, rank_state = load_checkpoint(engine, info)
    ours = client.get("dotmoe_recover")
    if ours is None:
        raise CheckpointError(f"{info.path} was not written by a recovery run (no 'dotmoe_recover' client state); "
                              "pass --overwrite or another --output")
    set_rng_state(rank_state["rng"])
    return RecoveryState(step=int(ours["step"]), losses=[tuple(x) for x in ours.get("losses", [])],
                         loop_seconds=ours.get("loop_seconds"))


def log_expert_load(monitor: Monitor, layers: list[nn.Module], step: int) -> None:
    """Share of routed tokens per expert since the last call (AutoEP counts them in each layer's
    tokens_per_expert buffer), summed over ranks: per-expert means over layers, the coefficient of
    variation per layer, and a histogram. Collective; resets the counters."""
    counts = torch.stack([layer.tokens_per_expert.detach().float().cpu() for layer in layers]).double()
    counts = dist.all_reduce_sum(counts)
    for layer in layers:
        layer.tokens_per_expert.zero_()
    share = counts / counts.sum(1, keepdim=True).clamp_min(1)
    cv = share.std(1, unbiased=False) / share.mean(1)
    scalars = {f"router/load/expert_{e:02d}": v for e, v in enumerate(share.mean(0).tolist())}
    scalars |= {f"router/load_cv/layer_{i:02d}": v for i, v in enumerate(cv.tolist())}
    scalars["router/load_cv"] = cv.mean().item()
    monitor.scalars(step, scalars)
    monitor.histogram(step, "router/load", share.float())


def train_recovery(engine, plan: RecoveryPlan, packed: PackedData, state: RecoveryState, monitor: Monitor,
                   stop: StopSignal) -> bool:
    """Train from `state.step` to --steps. False if a stop signal ended it (after a checkpoint)."""
    cfg = plan.cfg
    d, t = cfg.data, cfg.train
    gas = d.grad_accum
    batches = train_batches(packed.train, seed=t.seed, rank=dist.rank(), world_size=dist.world_size(),
                            micro_batch_size=d.batch_size, start_step=state.step * gas)
    speed = Throughput()
    layers = autoep_layers(engine.module)
    tokens_per_micro = d.batch_size * d.seq_len * dist.world_size()
    engine.train()
    clock = time.perf_counter()
    while state.step < t.steps:
        total = torch.zeros(1, dtype=torch.float64)
        for _ in range(gas):
            ids = next(batches).to(engine.device)
            loss = token_nll(engine(input_ids=ids).logits, ids).mean()
            engine.backward(loss)
            engine.step()
            total += loss.item()
            speed.add(tokens_per_micro)
        state.step += 1
        clock = add_loop_time(state, clock)
        ce = (dist.all_reduce_sum(total) / (gas * dist.world_size())).item()
        state.losses.append((state.step, ce))
        rate = speed.rate()
        monitor.scalars(state.step, {"loss/total": ce, "loss/ce": ce, "train/lr": engine.get_lr()[0],
                                     "train/tokens_per_s": rate, **memory_gb()})
        monitor.progress(state.step, ce, rate)
        if state.step % t.log_every == 0 or state.step == t.steps:
            log_expert_load(monitor, layers, state.step)
        stopping = stop_requested(stop, state.step, cfg)
        every = cfg.checkpoint.checkpoint_every
        if stopping or (every and state.step % every == 0) or state.step == t.steps:
            save_recovery_checkpoint(engine, plan, state)
            monitor.flush()
        if stopping:
            return False
    return True


# ====================================================================== export

def _all_experts(local: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """[E, ...] from each EP rank's [E_local, ...] block (collective over the layer's EP group),
    in expert order as AutoEP's placement descriptor records it."""
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

    if layer.ep_size == 1:
        return local
    import torch.distributed as tdist

    parts = [torch.empty_like(local) for _ in range(layer.ep_size)]
    tdist.all_gather(parts, local.contiguous(), group=layer.ep_group)
    out = local.new_empty((layer.num_experts, *local.shape[1:]))
    for r, part in enumerate(parts):
        for j, e in enumerate(autoep_experts_for_rank(layer.expert_placement_descriptor, r)):
            out[e] = part[j]
    return out


@dataclass
class _Unit:
    params: list[nn.Parameter]
    tensors: list[tuple[str, torch.Tensor]]     # written as they are
    layer_idx: int | None = None
    moe: nn.Module | None = None


def _units(model: nn.Module) -> list[_Unit]:
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    before, after, seen, reached = [], [], set(), False
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith("model.layers."):
            reached = True
            continue
        if id(t) in seen:
            if not tied:
                raise ExportError(f"{name} shares its tensor with another weight but tie_word_embeddings is False")
            continue
        seen.add(id(t))
        (after if reached else before).append(_Unit([t] if isinstance(t, nn.Parameter) else [], [(name, t)]))
    units = before
    for i, layer in enumerate(model.model.layers):
        tensors = [(f"model.layers.{i}.{n}", t) for n, t in layer.state_dict(keep_vars=True).items()
                   if not n.startswith("mlp.")]
        non_expert = [p for n, p in layer.named_parameters() if not n.startswith("mlp.experts.")]
        units.append(_Unit(non_expert, tensors, layer_idx=i, moe=layer.mlp))
    return units + after


def _moe_plan(adapter: FamilyAdapter, i: int, moe: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    L = adapter.layout
    E, (C, d) = moe.num_experts, tensor_shape(moe.experts.w1)[1:]
    out = [(L.router.format(i=i), (E, d))]
    for e in range(E):
        out += [(L.expert_gate.format(i=i, e=e), (C, d)), (L.expert_up.format(i=i, e=e), (C, d)),
                (L.expert_down.format(i=i, e=e), (d, C))]
    shared = moe.shared_experts
    if shared is not None and L.shared_gate and tensor_shape(shared.gate_proj.weight)[0] > 0:
        out += [(L.shared_gate.format(i=i), tensor_shape(shared.gate_proj.weight)),
                (L.shared_up.format(i=i), tensor_shape(shared.up_proj.weight)),
                (L.shared_down.format(i=i), tensor_shape(shared.down_proj.weight))]
    if moe.shared_experts_gate is not None and L.shared_expert_gate:
        out.append((L.shared_expert_gate.format(i=i), tensor_shape(moe.shared_experts_gate.weight)))
    return out


def _moe_tensors(adapter: FamilyAdapter, i: int, moe: nn.Module):
    """The layer's on-disk tensors in `_moe_plan` order (the non-expert ones already gathered)."""
    L = adapter.layout
    yield L.router.format(i=i), moe.router.gate.weight
    w = moe.experts
    with dist.gathered([w.w1, w.w3, w.w2]):      # ZeRO-3: whole within the expert-data-parallel group
        gate, up, down = (_all_experts(p.detach(), moe) for p in (w.w1, w.w3, w.w2))
    for e in range(moe.num_experts):
        yield L.expert_gate.format(i=i, e=e), gate[e]
        yield L.expert_up.format(i=i, e=e), up[e]
        yield L.expert_down.format(i=i, e=e), down[e]
    del gate, up, down
    shared = moe.shared_experts
    if shared is not None and L.shared_gate and tensor_shape(shared.gate_proj.weight)[0] > 0:
        yield L.shared_gate.format(i=i), shared.gate_proj.weight
        yield L.shared_up.format(i=i), shared.up_proj.weight
        yield L.shared_down.format(i=i), shared.down_proj.weight
    if moe.shared_experts_gate is not None and L.shared_expert_gate:
        yield L.shared_expert_gate.format(i=i), moe.shared_experts_gate.weight


def export_recovered(model: nn.Module, adapter: FamilyAdapter, source_dir: str | Path, output_dir: str | Path, *,
                     recovery: dict, is_writer: bool = True, dtype: torch.dtype | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the trained expert-parallel `model` as the same HF MoE checkpoint as `source_dir`.

    Collective (every rank calls it; `is_writer` on one). One decoder layer is whole at a time:
    its non-expert parameters gathered by ZeRO-3, its experts gathered within their expert-data-
    parallel group and all-gathered over their expert-parallel group. config.json, the generation
    config and tokenizer files are copied from `source_dir`; its dotmoe.json gets `recovery`
    appended to a "recoveries" list, and the model card a section about it."""
    source_dir = Path(source_dir)
    out = check_output_dir(output_dir, overwrite=True, source_dir=source_dir)
    dtype = dtype or model.get_input_embeddings().weight.dtype
    units = _units(model)
    plan: list[PlannedTensor] = []
    for unit in units:
        for name, t in unit.tensors:
            plan.append(PlannedTensor(name, tensor_shape(t), dtype if t.is_floating_point() else t.dtype))
        if unit.moe is not None:
            plan += [PlannedTensor(name, shape, dtype) for name, shape in _moe_plan(adapter, unit.layer_idx, unit.moe)]
    tmp = out.parent / f".{out.name}.partial-recover"
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    writer = StreamingShardWriter(tmp, plan, max_shard_bytes, enabled=is_writer)
    try:
        for unit in units:
            with dist.gathered(unit.params):
                for name, t in unit.tensors:
                    writer.write(name, t)
                if unit.moe is not None:
                    for name, t in _moe_tensors(adapter, unit.layer_idx, unit.moe):
                        writer.write(name, t)
        writer.close()
    except BaseException:
        writer.abort()
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not is_writer:
        return out
    try:
        for fname in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if (source_dir / fname).is_file():
                shutil.copy2(source_dir / fname, tmp / fname)
        meta = read_dotmoe(source_dir)
        meta.setdefault("recoveries", []).append(recovery)
        write_json(tmp / "dotmoe.json", meta)
        card = (source_dir / "README.md").read_text() if (source_dir / "README.md").is_file() else ""
        (tmp / "README.md").write_text(card + _recovery_card(recovery))
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _recovery_card(rec: dict) -> str:
    return (f"\n## Recovery training\n\n{rec['steps']} steps of next-token training ({rec['trainable']} trainable) "
            f"on `{rec['data']}`, {rec['world_size']} rank(s), experts spread over expert-parallel groups of "
            f"{rec['ep_size']} (DeepSpeed AutoEP, ZeRO stage {rec['zero_stage']}); final training loss "
            f"{rec['final_loss']:.4f}.\n\n```\n{rec['command']}\n```\n")


# ====================================================================== the run

def run_recovery(cfg: RunConfig) -> int:
    return launch(cfg, preflight_recovery, _run)


def _run(plan: RecoveryPlan, info: dist.DistInfo, wall_start: float) -> int:
    cfg = plan.cfg
    ds = open_run(plan, info)
    experts = num_experts_of(plan.hf_config)
    say(f"{plan.action} recovery run: {plan.model_path} ({plan.hf_config.model_type}, {experts} experts, "
         f"top-{plan.hf_config.num_experts_per_tok}), {info.world_size} rank(s), expert-parallel size "
         f"{plan.ep_size} ({experts // plan.ep_size} experts per rank), ZeRO stage {zero_stage(ds)}, "
         f"{precision_dtype(ds)}, trainable {cfg.objective.trainable}; output {plan.output}")
    packed = load_data(plan)
    engine, hf_ds = build_engine(plan, ds)

    def resumed() -> RecoveryState:
        state = resume_recovery(engine, plan.resume_from)
        say(f"resumed from {plan.resume_from.path} at step {state.step}")
        return state

    stop, state = start_or_resume(resumed if plan.resume_from is not None else None, RecoveryState)
    monitor = Monitor(plan.output / "tensorboard" / "dotmoe", cfg.train.steps, state.step, enabled=info.is_main)
    if monitor.bar is not None:
        monitor.bar.set_description("recovering")
    resumed_loop_seconds = state.loop_seconds
    try:
        try:
            finished = train_recovery(engine, plan, packed, state, monitor, stop)
        finally:
            stop.uninstall()
        if not finished:
            return stopped_exit(stop, state.step)
        res = finish_recovery(engine, plan, packed, state, monitor, wall_start, zero_stage(ds), resumed_loop_seconds)
    finally:
        monitor.close()
    if info.is_main:
        print(f"recovered model: {res['export']}  held-out perplexity {res['eval']['perplexity']:.2f}  "
              f"final training loss {state.last_loss:.4f}", flush=True)
    del hf_ds
    return 0


def finish_recovery(engine, plan: RecoveryPlan, packed: PackedData, state: RecoveryState, monitor: Monitor,
                    wall_start: float, stage: int, resumed_loop_seconds: float | None = 0.0) -> dict:
    cfg = plan.cfg
    engine.eval()
    recovery = {"steps": cfg.train.steps, "ep_size": plan.ep_size, "world_size": dist.world_size(),
                "zero_stage": stage, "trainable": cfg.objective.trainable, "data": cfg.data.data,
                "seq_len": cfg.data.seq_len, "seed": cfg.train.seed, "final_loss": state.last_loss,
                "source": public_model_name(plan.model_path), "command": portable_command()}
    export_dir = None
    if cfg.eval.export:
        export_dir = str(export_recovered(engine.module, plan.adapter, plan.model_path, plan.output / "model",
                                          recovery=recovery, is_writer=dist.is_main()))
    if packed.eval is None:
        raise DataError("no held-out split was built; pass --eval_data or --eval_fraction")
    ev = perplexity(engine.module, packed.eval, batch_size=cfg.eval.eval_batch_size, max_blocks=cfg.eval.eval_blocks,
                    device=engine.device)
    monitor.scalars(cfg.train.steps, {"eval/ppl_recovered": ev.ppl})
    res = {"phase": "recover", "model": plan.model_path, "steps": cfg.train.steps, "world_size": dist.world_size(),
           "ep_size": plan.ep_size, "zero_stage": stage, "eval": ev.to_dict(), "final_train_loss": state.last_loss,
           "losses": state.losses, "export": export_dir, "wall_seconds": time.perf_counter() - wall_start,
           "loop_seconds": state.loop_seconds}
    res["run_seconds"] = run_seconds(res["wall_seconds"], resumed_loop_seconds)
    if dist.is_main():
        atomic_write_text(plan.output / "results.json", json.dumps(res, indent=1) + "\n")   # never torn by a kill
    return res
