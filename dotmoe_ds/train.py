"""The DOT-MoE conversion trainer: dense HF checkpoint in, MoE checkpoint + perplexity table out.

    deepspeed [--num_gpus N] dotmoe_ds/train.py --deepspeed ds_configs/z3.json --model PATH --data PATH
    python dotmoe_ds/train.py                       # one process: the embedded SmolLM2 demo
    dotmoe train ...                                # the same, through the console script

Steps (every rank runs all of them; rank 0 alone writes files):
 1. preflight: flags, output folder, model config and family, budget, data, DeepSpeed config are
    all checked before anything expensive; a problem ends the run with one clear paragraph.
 2. load the dense model (under ZeRO-3 sharded at creation: HfDeepSpeedConfig before
    from_pretrained), swap every MLP for a DotMoEFFN (ZeRO-3 leaf modules), choose what trains,
    deepspeed.initialize.
 3. fresh run: a dense forward over calibration tokens; each layer's owner rank (layer mod world)
    computes its partition and router init from the gathered weights and broadcasts them.
    Resumed run: the latest complete checkpoint instead.
 4. train: CE (+ distillation to the same network in dense mode) + load balance + z-loss (+ the
    layer-local reconstruction term), tau annealed; the routers and weights by DeepSpeed, the
    assignment scores by their own optimizer (score_optim.py); TensorBoard, checkpoints every N
    steps and on SIGTERM/SIGUSR1 (then exit 75).
    Whenever the scores change, each layer's owner rank rounds them to the capacity-exact hard
    assignment and broadcasts it (pin_hard_assignments): no rank rounds every layer.
 5. the pinned hard assignment, streaming export to OUTPUT/model, held-out perplexity of the dense and the
    converted model, a table on stdout and OUTPUT/results.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: import the package by absolute name, and keep this folder off sys.path so
    # that its modules (config, data, evaluate, ...) cannot shadow libraries of the same name.
    _root = str(Path(__file__).resolve().parents[1])
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, _root)

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dotmoe_ds import distributed as dist
from dotmoe_ds.checkpoint import (CheckpointError, CheckpointInfo, StopSignal, atomic_write_text, checkpoint_dir,
                                  load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from dotmoe_ds.config import (ConfigError, RunConfig, load_ds_config, parse_args, precision_dtype,
                              resolve_ds_config, zero_stage)
from dotmoe_ds.data import DataConfig, DataError, PackedData, train_batches
from dotmoe_ds.demo import DemoModelError, resolve_model
from dotmoe_ds.evaluate import perplexity, token_nll
from dotmoe_ds.export import ExportError, export_moe
from dotmoe_ds.families import FamilyAdapter, FamilyError, adapter_for
from dotmoe_ds.layer import DotMoEFFN, set_plan_fn, set_tau
from dotmoe_ds.reference import ReferenceFFN
from dotmoe_ds import baselines
from dotmoe_ds.baselines import PRUNE, PrunedFFN, export_pruned, set_mode   # set_mode: MoE and pruned layers
from dotmoe_ds.monitor import Monitor, RouterAccumulator, Throughput, assignment_stats, memory_gb, router_stats
from dotmoe_ds import partition as partition_lib
from dotmoe_ds.score_optim import ScoreOptimizer, ScoreSchedule, count_flips
from dotmoe_ds.sharded_sinkhorn import broadcast_from_owners, select_plan_fn
from dotmoe_ds.spec import (MoESpec, SpecError, describe_budget, resolve_budget, routed_instead_of_shared,
                            shared_from_fraction)
from dotmoe_ds.runframe import (EXIT_USAGE, PreflightError, add_loop_time, check_causal_lm, checked_data_config,
                                is_main_process, launch, load_data, load_model_config, open_run, output_action,
                                run_seconds, say, start_or_resume, stop_requested, stopped_exit)
from dotmoe_ds.runlock import RunLockError


USER_ERRORS = (ConfigError, PreflightError, SpecError, FamilyError, DataError, DemoModelError, ExportError,
               CheckpointError, RunLockError)
# Config keys a resumed run must share with the run it continues (they shape the model, the data
# order or the optimisation); anything else (e.g. --log_every) may change on resume.
RESUME_KEYS = ("model", "data", "eval_data", "eval_fraction", "seq_len", "batch_size", "grad_accum",
               "text_column", "text_unit", "num_experts", "top_k", "shared_neurons", "method", "partition",
               "beta", "router_init", "router_logit_std", "calib_tokens", "assigner", "routing_ste",
               "kd_weight", "kd_temperature", "lb_weight", "z_weight", "tau_start", "tau_end", "tau_schedule",
               "trainable", "scores_lr_scale", "router_lr_scale", "weights_lr_scale", "steps", "seed",
               "recon_weight", "scores_lr_schedule", "scores_settle_frac", "max_flip_frac", "teacher", "flip_check")


# ====================================================================== preflight

@dataclass
class Plan:
    """Everything preflight resolved; nothing here cost more than reading small files."""

    cfg: RunConfig
    output: Path
    model_path: str
    hf_config: Any
    adapter: FamilyAdapter
    spec: MoESpec
    tokenizer: Any
    data_cfg: DataConfig
    ds_raw: dict
    action: str                         # fresh | overwrite | restart (no checkpoint yet) | resume
    resume_from: CheckpointInfo | None = None
    notes: list[str] = field(default_factory=list)


def budget_spec(m, d_ff: int) -> MoESpec:
    """The exact MoESpec of the budget flags (--num_experts/--top_k/--shared_neurons or --shared_fraction,
    or --expert_size, --active_fraction, --capacities); a SpecError naming the nearest exact budgets
    otherwise."""
    from dotmoe_ds.config import MoEArgs
    shared = m.shared_neurons
    if m.shared_fraction:
        if m.capacities:
            raise SpecError("--capacities lists the routed experts, so the shared expert is what they leave of "
                            "d_ff: give --shared_neurons, not --shared_fraction")
        shared = shared_from_fraction(d_ff, m.shared_fraction, m.expert_size or m.num_experts)
    return resolve_budget(d_ff, num_experts=m.num_experts, top_k=m.top_k, shared=shared,
                          expert_size=m.expert_size, active_fraction=m.active_fraction, capacities=m.capacities,
                          default_num_experts=MoEArgs.num_experts, default_top_k=MoEArgs.top_k)


def family_budget(m, hf_config, adapter: FamilyAdapter) -> MoESpec:
    """budget_spec checked against the family's export. A shared expert asked for as a share of d_ff
    (--shared_fraction, the recipe's way) that the family cannot export becomes routed neurons, with
    the top-k that keeps the active share; a shared expert asked for in neurons stays an error."""
    spec = budget_spec(m, int(hf_config.intermediate_size))
    try:
        adapter.validate(hf_config, spec)
    except FamilyError as err:
        if not (spec.has_shared and m.shared_fraction):
            raise
        routed = routed_instead_of_shared(spec)
        say(f"note: no shared expert for this model ({str(err).split('. ')[0]}); its neurons are routed "
            f"instead and top_k is {routed.top_k} ({describe_budget(spec)} asked)")
        adapter.validate(hf_config, routed)
        spec = routed
    return spec


def preflight(cfg: RunConfig) -> Plan:
    """Every check that needs no weights, no tokenising and no process group."""
    from transformers import AutoTokenizer

    world = dist.env_info().world_size
    model_path = resolve_model(cfg.model.model)   # packaged aliases (demo, qwen-coder) become folders
    hf_config = load_model_config(model_path)
    check_causal_lm(hf_config, cfg.model.model)
    adapter = adapter_for(hf_config)
    spec = family_budget(cfg.moe, hf_config, adapter)
    # The resolved budget is what config.json records (and what a resumed run is compared against).
    cfg.moe.num_experts, cfg.moe.top_k = spec.num_experts, spec.top_k
    cfg.moe.shared_neurons, cfg.moe.shared_fraction = spec.shared, 0.0
    say(f"budget: {describe_budget(spec)}")
    action, resume_from = output_action(cfg, world, RESUME_KEYS)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as err:
        raise PreflightError(f"--model {cfg.model.model}: its tokenizer cannot be loaded ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); the model folder needs its "
                             "tokenizer files") from None
    data_cfg = checked_data_config(cfg, tokenizer, hf_config)
    ds_raw = load_ds_config(cfg.train.deepspeed)
    resolve_ds_config(ds_raw, cfg, world, Path(cfg.checkpoint.output) / "tensorboard", bf16_available=False)
    return Plan(cfg=cfg, output=Path(cfg.checkpoint.output).expanduser(), model_path=model_path,
                hf_config=hf_config, adapter=adapter, spec=spec, tokenizer=tokenizer, data_cfg=data_cfg,
                ds_raw=ds_raw, action=action, resume_from=resume_from)


# ====================================================================== objective

class _AttachAux(torch.autograd.Function):
    """Identity on a layer's output whose backward also starts the layer's auxiliary loss.

    Under ZeRO-3 a DotMoEFFN's parameters are re-gathered when the gradient reaches the layer's
    output; an auxiliary loss summed into the total loss would reach the router before that (its
    graph nodes are the newest) and find the weights released. Entering through the output keeps
    the router's backward inside the gathered window. `aux` is already weighted and scaled.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype, ctx.aux_device = aux.shape, aux.dtype, aux.device
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=ctx.aux_device)


class AuxLosses:
    """Forward hooks adding each layer's load-balance, z-loss and (with `recon_weight` > 0) its
    relative reconstruction error to the backward pass, and summing their values for logging (mean
    over layers). The reconstruction error is computed by the layer itself (`DotMoEFFN.recon`,
    `PrunedFFN.recon`, in the same forward: one more down projection) when `recon_weight` > 0; a
    pruned layer has no router, so no load balance or z-loss."""

    def __init__(self, layers: list[DotMoEFFN | PrunedFFN], lb_weight: float, z_weight: float, grad_accum: int,
                 recon_weight: float = 0.0):
        self.layers, self.lb_weight, self.z_weight = layers, lb_weight, z_weight
        self.recon_weight = recon_weight
        for layer in layers:
            layer.recon = recon_weight > 0
        # Mean over layers; DeepSpeed divides the main loss by the accumulation steps, so do we.
        self.scale = 1.0 / (max(len(layers), 1) * grad_accum)
        self.lb_sum = 0.0
        self.z_sum = 0.0
        self.count = 0
        self.recon_sum = 0.0
        self.recon_count = 0
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module: DotMoEFFN | PrunedFFN, args, output):
        recon, module.last_recon = module.last_recon, None
        if not module.training or module.mode == "dense" or not torch.is_grad_enabled():
            return output
        if recon is not None:
            self.recon_sum += float(recon.detach())
            self.recon_count += 1
            if recon.requires_grad and self.recon_weight > 0:
                output = _AttachAux.apply(output, recon * (self.recon_weight * self.scale))
        stats = getattr(module, "last_router_stats", None)    # a pruned layer has no router
        if stats is None:
            return output
        module.last_router_stats = stats.__class__(   # keep only detached values for the monitor
            load_balance=stats.load_balance.detach(), z_loss=stats.z_loss.detach(), load=stats.load,
            entropy=stats.entropy)
        self.lb_sum += float(stats.load_balance.detach())
        self.z_sum += float(stats.z_loss.detach())
        self.count += 1
        aux = stats.load_balance * self.lb_weight + stats.z_loss * self.z_weight
        if not aux.requires_grad or (self.lb_weight == 0 and self.z_weight == 0):
            return output
        return _AttachAux.apply(output, aux * self.scale)

    def take(self) -> tuple[float, float]:
        """Mean load-balance and z-loss over the layer forwards since the last call."""
        n = max(self.count, 1)
        out = (self.lb_sum / n, self.z_sum / n)
        self.lb_sum = self.z_sum = 0.0
        self.count = 0
        return out

    def take_recon(self) -> float:
        """Mean relative reconstruction error over the layer forwards since the last call (0 when
        it is not computed)."""
        out = self.recon_sum / max(self.recon_count, 1)
        self.recon_sum, self.recon_count = 0.0, 0
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of T^2 KL(teacher || student) at temperature T (Hinton et al.)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (t * t) * (p.exp() * (p - s)).sum(-1).mean()


def tau_at(step: int, steps: int, start: float, end: float, schedule: str) -> float:
    """Temperature of optimizer step `step` (0-based): cosine/linear from `start` to `end`."""
    if schedule == "constant" or steps <= 1:
        return start if schedule == "constant" or steps < 1 else end
    frac = min(max(step / (steps - 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * frac
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


# ====================================================================== model setup

def train_mode_of(method: str) -> str:
    return "ste" if method == "dot" else "hard"


def build_model(plan: Plan, ds: dict):
    """The dense model (sharded at creation under ZeRO-3) with DotMoEFFN layers swapped in."""
    from transformers import AutoModelForCausalLM

    cfg, spec = plan.cfg, plan.spec
    dtype = precision_dtype(ds)
    hf_ds = None
    if zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds)   # must stay alive: transformers keeps only a weak reference
    model = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=dtype)
    model.config.use_cache = False
    tau0 = cfg.objective.tau_start

    def make_ffn(i, gate, up, down, act):
        return DotMoEFFN(gate, up, down, act, spec, beta=cfg.moe.beta, tau=tau0,
                         sinkhorn_iters=cfg.moe.sinkhorn_iters, assigner=cfg.moe.assigner,
                         routing_ste=cfg.moe.routing_ste, mode="dense")

    # --method prune: a dense model keeping its most important neurons (baselines.py)
    layers = plan.adapter.swap_in(model, PrunedFFN.wrap if cfg.moe.method == PRUNE else make_ffn)
    if dtype != torch.float32:
        # DeepSpeed's mixed-precision optimizers flatten every trainable parameter into one buffer
        # of the model dtype (ZeRO-3 asserts a single dtype), so Theta is stored in that dtype too;
        # the optimizer still keeps an fp32 master copy and the layer runs Sinkhorn in fp32.
        for layer in (layer for layer in layers if isinstance(layer, DotMoEFFN)):
            layer.scores.data = layer.scores.data.to(dtype)
    if keeps_reference(cfg):
        attach_references(layers, ds, dtype)
    if zero_stage(ds) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        # One gather per layer forward; data-dependent masks inside cannot desynchronise ranks.
        set_z3_leaf_modules(model, [DotMoEFFN, PrunedFFN])
    return model, layers, hf_ds


def keeps_reference(cfg: RunConfig) -> bool:
    """Whether the conversion layers keep a frozen copy of the dense FFN (reference.py): only when
    the FFN weights train (else 'dense' mode is the original model already) and --teacher original."""
    return cfg.objective.trainable != "assignment" and cfg.objective.teacher == "original"


@torch.no_grad()
def attach_references(layers: list, ds: dict, dtype: torch.dtype) -> None:
    """Gives every conversion layer `reference`, a frozen copy of its dense weights. Under ZeRO-3 the
    copy is created sharded (zero.Init) and filled one layer at a time inside a gather, so no rank
    ever holds more than one layer's FFN whole. Collective under ZeRO-3."""
    z3 = zero_stage(ds) == 3
    init = contextlib.nullcontext
    if z3:
        import deepspeed

        init = lambda: deepspeed.zero.Init(config_dict_or_path=ds)   # noqa: E731
    for layer in layers:
        src = (layer.gate_proj, layer.up_proj, layer.down_proj)
        with init():
            ref = ReferenceFFN(layer.gate_proj.in_features, layer.gate_proj.out_features, layer.act_fn,
                               dtype=dtype, device=None if z3 else layer.gate_proj.weight.device)
        params = [lin.weight for lin in src] + [lin.weight for lin in ref.linears()]
        with dist.gathered(params, modifier_rank=0):
            for mine, theirs in zip(ref.linears(), src):
                mine.weight.copy_(theirs.weight)
        layer.reference = ref


def select_trainable(model, layers: list[DotMoEFFN], cfg: RunConfig, base_lr: float) -> list[dict]:
    """requires_grad per METHOD.md section 5 / 7, and the DeepSpeed optimizer's parameter groups.

    The assignment scores are never DeepSpeed's (requires_grad False): with --method dot they are
    learned by the ScoreOptimizer of train_loop (score_optim.py: their own Adam, lr and schedule,
    outside the weights' gradient clipping); for the fixed-partition baselines they stay frozen."""
    o, method = cfg.objective, cfg.moe.method
    for p in model.parameters():
        p.requires_grad_(o.trainable == "all")
    routers: list = []
    if method == PRUNE:   # no scores, no router: the kept weights when weights train, else nothing
        baselines.mark_trainable(model, o.trainable)
    for layer in (layer for layer in layers if isinstance(layer, DotMoEFFN)):
        layer.scores.requires_grad_(False)   # learned (method dot) by train_loop's ScoreOptimizer
        layer.router.weight.requires_grad_(True)
        routers.append(layer.router.weight)
        if o.trainable == "ffn":
            for lin in (layer.gate_proj, layer.up_proj, layer.down_proj):
                lin.weight.requires_grad_(True)
    for layer in layers:   # the frozen original FFN (--teacher original) never trains, even with 'all'
        if layer.reference is not None:
            layer.reference.requires_grad_(False)
    special = {id(p) for p in routers} | {id(layer.scores) for layer in layers
                                                   if isinstance(layer, DotMoEFFN)}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    groups = [{"params": routers, "lr": base_lr * o.router_lr_scale, "weight_decay": 0.0},
              {"params": weights, "lr": base_lr * o.weights_lr_scale}]
    # The input embeddings' output must require grad even when the embeddings are frozen: ZeRO-3
    # reduces a leaf module's gradients when the gradient reaches its inputs, and would otherwise do
    # so for the first layer before its scores' gradient exists.
    model.enable_input_require_grads()
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing: it works with frozen inputs and ZeRO-3's parameter hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return [g for g in groups if g["params"]]


# ====================================================================== initialisation

@torch.no_grad()
def capture_mlp_inputs(engine, layers: list[DotMoEFFN], calib: torch.Tensor, max_tokens: int) -> dict[int, torch.Tensor]:
    """MLP inputs `[T, d]` (fp32, CPU) of the layers this rank owns, from one dense forward of `calib`
    (the same blocks on every rank). Collective."""
    captured: dict[int, list[torch.Tensor]] = {}
    me = dist.rank()
    handles = []
    for i, layer in enumerate(layers):
        if dist.owner_of(i) == me:
            def hook(module, args, i=i):
                captured.setdefault(i, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
            handles.append(layer.register_forward_pre_hook(hook))
    set_mode(engine.module, "dense")
    was_training = engine.module.training
    engine.module.eval()
    try:
        engine.module(input_ids=calib.to(engine.device))
    finally:
        engine.module.train(was_training)
        for h in handles:
            h.remove()
    return {i: torch.cat(xs)[:max_tokens] for i, xs in captured.items()}


def init_layer(layer: DotMoEFFN, i: int, cfg: RunConfig, weights: tuple, x: torch.Tensor) -> tuple:
    """(partition, router weight) of layer `i` from its dense weights and calibration inputs."""
    g, u, d = weights
    spec, m = layer.spec, cfg.moe
    seed = cfg.train.seed * 1_000_003 + i
    h = None
    if cfg.partition in ("coactivation", "importance") or m.router_init == "lstsq":
        h = layer.act_fn(x @ g.T) * (x @ u.T)
    if cfg.partition == "random":
        part = partition_lib.random_partition(spec, seed)
    elif cfg.partition == "kmeans":
        part = partition_lib.kmeans_partition(g, u, spec, seed, down_weight=d)
    elif cfg.partition == "importance":
        part = partition_lib.importance_partition(partition_lib.activation_importance(h, d, p=2), spec)
    else:
        # With a shared expert it takes the neurons of largest activation-weighted RMS norm (the
        # pruning criterion of baselines.neuron_importance); the rest are clustered by co-activation.
        importance = partition_lib.activation_importance(h, d, p=2) if spec.has_shared else None
        part = partition_lib.coactivation_partition(h, spec, seed, down_weight=d, importance=importance)
    if m.router_init == "zero":
        router = torch.zeros(spec.num_experts, g.shape[1])
    elif m.router_init == "gate_mean":
        router = partition_lib.router_init(g, part, spec, hidden_states=x, logit_std=m.router_logit_std)
    else:
        norms = partition_lib.expert_output_norms(h, d, part, spec)
        router = partition_lib.fit_router_lstsq(x, norms, logit_std=m.router_logit_std)
    return part, router


def initialise_assignment(engine, layers: list[DotMoEFFN], cfg: RunConfig, calib: torch.Tensor) -> dict:
    """Partition and router of every layer, each computed by its owner rank and broadcast."""
    start = time.perf_counter()
    inputs = capture_mlp_inputs(engine, layers, calib, cfg.moe.calib_tokens)
    me = dist.rank()
    owned: dict[int, tuple] = {}
    for i, layer in enumerate(layers):
        ws = [layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight]
        with dist.gathered(ws):
            if dist.owner_of(i) == me:
                # partition.py computes on CPU (its k-means is cheap next to training)
                owned[i] = tuple(w.detach().float().cpu().clone() for w in ws)
    results = {i: init_layer(layers[i], i, cfg, owned.pop(i), inputs[i]) for i in sorted(owned)}
    for i, layer in enumerate(layers):
        with dist.gathered([layer.scores, layer.router.weight], modifier_rank=dist.owner_of(i)):
            if dist.owner_of(i) == me:
                part, router = results[i]
                layer.scores.data.copy_(partition_lib.initial_scores(part, layer.spec, cfg.moe.beta))
                layer.router.weight.data.copy_(router.to(layer.router.weight.dtype))
    # The optimizer keeps its own fp32 copy of the trainable weights; it must see the new values.
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    return {"init_seconds": time.perf_counter() - start, "calibration_tokens": int(calib.numel())}


@torch.no_grad()
def initialise_pruning(engine, layers: list[PrunedFFN], cfg: RunConfig, calib: torch.Tensor, kept: int) -> dict:
    """--method prune: each layer keeps its `kept` most important neurons by activation-weighted norm
    on the calibration tokens (METHOD.md section 7), computed by the layer's owner rank inside the
    gather of its three weights (nothing is copied) and broadcast. Collective."""
    start = time.perf_counter()
    # Before set_kept every neuron is kept, so this forward is the dense model's.
    inputs = capture_mlp_inputs(engine, layers, calib, cfg.moe.calib_tokens)
    me = dist.rank()
    for i, layer in enumerate(layers):
        ws = [layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight]
        choice = None
        with dist.gathered(ws):
            if dist.owner_of(i) == me:
                importance = baselines.neuron_importance(inputs.pop(i), *ws, layer.act_fn)
                choice = baselines.choose_kept(importance, kept)
        layer.set_kept(dist.broadcast_object(choice, src=dist.owner_of(i)))
    return {"init_seconds": time.perf_counter() - start, "calibration_tokens": int(calib.numel()),
            "what": f"kept {kept} of {layers[0].d_ff} neurons per layer ({baselines.IMPORTANCE_CRITERION})"}


@torch.no_grad()
def pin_hard_assignments(layers: list[DotMoEFFN]) -> None:
    """Round every layer's scores to its capacity-exact hard assignment, layer-parallel: rank
    `l mod world` rounds layer l (under ZeRO-3 every rank joins the gather of the small scores) and
    broadcasts it; every rank pins the results. Called whenever the scores change (after the
    initialisation, a resume, each optimizer step), so the forwards, the monitor and the export
    reuse them. Collective."""
    me = dist.rank()
    assignments = []
    for i, layer in enumerate(layers):
        layer.pin_hard_assignment(None)
        with dist.gathered([layer.scores]):
            if dist.owner_of(i) == me:
                assign = layer.hard_assignment().clone()
            else:
                assign = torch.empty(layer.spec.d_ff, dtype=torch.int64, device=layer.scores.device)
        assignments.append(assign.contiguous())
    for layer, assign in zip(layers, broadcast_from_owners(assignments)):
        layer.pin_hard_assignment(assign)


def frozen_assignment_state(layers: list[DotMoEFFN]) -> dict[int, torch.Tensor]:
    """Scores that the DeepSpeed optimizer does not hold (all of them: frozen for random/cluster, learned
    by the ScoreOptimizer for dot), for checkpoints."""
    out = {}
    for i, layer in enumerate(layers):
        if not layer.scores.requires_grad:
            with dist.gathered([layer.scores]):
                out[i] = layer.scores.detach().cpu().clone()
    return out


def restore_frozen_assignment(layers: list[DotMoEFFN], frozen: dict[int, torch.Tensor]) -> None:
    for i, layer in enumerate(layers):
        if i in frozen:
            with dist.gathered([layer.scores], modifier_rank=0):
                if dist.is_main():
                    layer.scores.data.copy_(frozen[i].to(layer.scores.device))


# ====================================================================== training loop

@dataclass
class LoopState:
    step: int = 0
    previous_assignment: list | None = None
    last_loss: float = float("nan")
    losses: list = field(default_factory=list)     # (step, total) per step, for the results
    initial_assignment: list | None = None         # hard assignment at step 0 (assign/moved_from_start)
    score_opt: dict | None = None                  # this rank's ScoreOptimizer state (checkpoints)
    # Seconds in the training loop up to `step`, summed over the invocations that reached it: what an
    # uninterrupted run spends there (the steps a killed invocation took after its last checkpoint
    # are redone, and counted once). None when resumed from a checkpoint that did not record it.
    loop_seconds: float | None = 0.0


def _log_assignment(monitor: Monitor, layers, state: LoopState, step: int, router_acc: RouterAccumulator) -> None:
    if not layers:   # a pruned model: no assignment, no router
        return
    scalars, current, confidence = assignment_stats(layers, state.previous_assignment)
    state.previous_assignment = current
    rscalars, loads = router_stats(router_acc)
    router_acc.reset()
    monitor.scalars(step, {**scalars, **rscalars})
    monitor.histogram(step, "router/load", loads)
    monitor.histogram(step, "assign/plan_confidence", confidence)


def flip_scalars(layers: list[DotMoEFFN], before: list[torch.Tensor], initial: list[torch.Tensor] | None
                 ) -> dict[str, float]:
    """Neurons that changed expert in this step, per layer and in all; the share of neurons away
    from their step-0 expert. Reads the pinned assignments: every rank has them, no communication."""
    out: dict[str, float] = {}
    total, moved, neurons = 0, 0, 0
    for i, (layer, old) in enumerate(zip(layers, before)):
        now = layer.hard_assignment()
        flips = count_flips(old, now)
        out[f"assign/flips/layer_{i:02d}"] = flips
        total += flips
        neurons += now.numel()
        if initial is not None and i < len(initial):
            moved += count_flips(initial[i], now)
    out["assign/flips"] = total
    if initial is not None:
        out["assign/moved_from_start"] = moved / max(neurons, 1)
    return out


def train_loop(engine, layers: list[DotMoEFFN], plan: Plan, packed: PackedData, state: LoopState,
               monitor: Monitor, stop: StopSignal, aux: AuxLosses) -> bool:
    """Train from `state.step` to the configured steps. Returns False if stopped by a signal."""
    cfg = plan.cfg
    o, d, t = cfg.objective, cfg.data, cfg.train
    gas = d.grad_accum
    train_mode = train_mode_of(cfg.moe.method)
    batches = train_batches(packed.train, seed=t.seed, rank=dist.rank(), world_size=dist.world_size(),
                            micro_batch_size=d.batch_size, start_step=state.step * gas)
    router_acc = RouterAccumulator()
    speed = Throughput()
    tokens_per_micro = d.batch_size * d.seq_len * dist.world_size()
    engine.train()
    set_mode(engine.module, train_mode)
    pin_hard_assignments(layers)
    if state.previous_assignment is None:
        state.previous_assignment = assignment_stats(layers, None)[1]
    if state.initial_assignment is None:
        state.initial_assignment = [layer.hard_assignment().clone().cpu() for layer in layers]
    score_opt = None
    if cfg.moe.method == "dot" and layers:
        # The scores' own optimizer (score_optim.py): outside DeepSpeed's clipping and schedule.
        base_lr = float(plan.ds_raw["optimizer"]["params"]["lr"])
        betas = plan.ds_raw["optimizer"]["params"].get("betas", (0.9, 0.95))
        score_opt = ScoreOptimizer(layers, ScoreSchedule(base_lr * o.scores_lr_scale, t.steps, o.scores_lr_schedule,
                                                         o.scores_settle_frac),
                                   betas=betas, max_flip_frac=o.max_flip_frac,
                                   flip_check=o.flip_check == "recon")
        score_opt.load_state_dict(state.score_opt)
    ckpt_dir = checkpoint_dir(plan.output)
    clock = time.perf_counter()
    while state.step < t.steps:
        tau = tau_at(state.step, t.steps, o.tau_start, o.tau_end, o.tau_schedule)
        set_tau(engine.module, tau)
        # fp16's dynamic loss scale is in the scores' collected gradients too (1 in fp32 / bf16)
        grad_scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
        sums = torch.zeros(3, dtype=torch.float64)     # ce, kd, total (without aux)
        for _ in range(gas):
            ids = next(batches).to(engine.device)
            teacher = None
            if o.kd_weight > 0:
                set_mode(engine.module, "dense")
                with torch.no_grad():
                    teacher = engine.module(input_ids=ids).logits.detach()
                set_mode(engine.module, train_mode)
            logits = engine(input_ids=ids).logits
            ce = token_nll(logits, ids).mean()
            loss = ce
            kd = torch.zeros((), device=ce.device)
            if teacher is not None:
                kd = kd_loss(logits[:, :-1], teacher[:, :-1], o.kd_temperature)
                loss = loss + o.kd_weight * kd
                del teacher
            engine.backward(loss)
            engine.step()
            router_acc.add(layers)
            sums += torch.tensor([ce.item(), kd.item(), loss.item()], dtype=torch.float64)
            speed.add(tokens_per_micro)
        assign_scalars = {}
        if score_opt is not None:   # the scores' step, then the new hard assignment and its flips
            before = [layer.hard_assignment().clone() for layer in layers]
            done = score_opt.step(state.step, grad_scale)
            pin_hard_assignments(layers)
            assign_scalars = flip_scalars(layers, before, state.initial_assignment)
            assign_scalars.update({"assign/scores_lr": done["lr"], "assign/step_scale": done["step_scale"],
                                   "assign/scores_grad_norm": done["grad_norm"], "assign/skipped": done["skipped"]})
            if score_opt.flip_check:
                assign_scalars["assign/undone_layers"] = done["undone"]
        state.step += 1
        clock = add_loop_time(state, clock)
        lb, z = aux.take()
        recon = aux.take_recon()
        ce_m, kd_m, main = (dist.all_reduce_sum(sums) / (gas * dist.world_size())).tolist()
        total = main + o.lb_weight * lb + o.z_weight * z + o.recon_weight * recon
        state.last_loss = total
        state.losses.append((state.step, total))
        rate = speed.rate()
        monitor.scalars(state.step, {"loss/total": total, "loss/ce": ce_m, "loss/kd": kd_m,
                                     "loss/load_balance": lb, "loss/z": z, "loss/recon": recon, "train/tau": tau,
                                     "train/lr": engine.get_lr()[0], "train/tokens_per_s": rate,
                                     **assign_scalars, **memory_gb()})
        monitor.progress(state.step, total, rate)
        if state.step % t.log_every == 0 or state.step == t.steps:
            _log_assignment(monitor, layers, state, state.step, router_acc)
        stopping = stop_requested(stop, state.step, cfg)
        every = cfg.checkpoint.checkpoint_every
        if stopping or (every and state.step % every == 0) or state.step == t.steps:
            state.score_opt = None if score_opt is None else score_opt.state_dict()
            save_run_checkpoint(engine, layers, ckpt_dir, state, cfg)
            monitor.flush()
        if stopping:
            return False
    return True


def save_run_checkpoint(engine, layers, ckpt_dir: Path, state: LoopState, cfg: RunConfig) -> CheckpointInfo:
    client = {"dotmoe": {"step": state.step, "micro_step": state.step * cfg.data.grad_accum,
                         "previous_assignment": state.previous_assignment,
                         "initial_assignment": state.initial_assignment,
                         "losses": state.losses, "loop_seconds": state.loop_seconds,
                         "frozen_scores": frozen_assignment_state(layers),
                         "kept_neurons": baselines.kept_state(engine.module)}}
    return save_checkpoint(engine, ckpt_dir, state.step, client, {"rng": rng_state(), "scores_opt": state.score_opt},
                           keep=cfg.checkpoint.keep_checkpoints)


def resume(engine, layers, info: CheckpointInfo) -> LoopState:
    client, rank_state = load_checkpoint(engine, info)
    ours = client.get("dotmoe")
    if ours is None:
        raise CheckpointError(f"{info.path} was not written by the dotmoe trainer (no 'dotmoe' client state)")
    restore_frozen_assignment(layers, ours.get("frozen_scores", {}))
    baselines.restore_kept_state(engine.module, ours.get("kept_neurons", {}))
    set_rng_state(rank_state["rng"])
    return LoopState(step=int(ours["step"]), previous_assignment=ours.get("previous_assignment"),
                     losses=list(ours.get("losses", [])), initial_assignment=ours.get("initial_assignment"),
                     score_opt=rank_state.get("scores_opt"), loop_seconds=ours.get("loop_seconds"),
                     last_loss=ours["losses"][-1][1] if ours.get("losses") else float("nan"))


# ====================================================================== finish

def results_table(res: dict) -> str:
    dense, conv = res["dense"], res["converted"]
    spec = res["budget"]
    name, active = f"{res['method']} MoE (E={spec['num_experts']}, k={spec['top_k']})", spec["active_fraction"]
    if res.get("pruned"):
        name = f"pruned dense ({res['pruned']['kept_neurons']} of {spec['d_ff']} neurons)"
        active = res["pruned"]["active_fraction"]
    # With --trainable ffn/all the dense mode runs the trained weights, unless --teacher original.
    weights = res.get("dense_weights", "original")
    dense_name = {"original": "dense", "trained": "dense (trained weights, every neuron)"}.get(weights,
                                                                                           f"dense ({weights})")
    rows = [("model", "held-out ppl", "mean NLL", "active FFN"),
            (dense_name, f"{dense['perplexity']:.2f}", f"{dense['mean_nll']:.4f}", "100%"),
            (name, f"{conv['perplexity']:.2f}", f"{conv['mean_nll']:.4f}", f"{active:.0%}")]
    width = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(width[c]) if c == 0 else cell.rjust(width[c]) for c, cell in enumerate(r))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"perplexity retention (dense / converted): {res['retention']:.1%}   "
                 f"({dense['tokens']} held-out tokens)")
    return "\n".join(lines)


def dense_weights(cfg: RunConfig) -> str:
    """What the 'dense' mode runs after training: the original model, or trained weights."""
    trainable = cfg.objective.trainable
    if trainable == "assignment":
        return "original"
    if not keeps_reference(cfg):
        return "trained"
    return "original" if trainable == "ffn" else "original FFN, trained attention and embeddings"


def finish(engine, layers, plan: Plan, packed: PackedData, state: LoopState, monitor: Monitor,
           wall_start: float, resumed_loop_seconds: float | None = 0.0) -> dict:
    """Evaluate and export. `resumed_loop_seconds`: the loop time the resumed checkpoint carried."""
    cfg = plan.cfg
    module = engine.module
    set_tau(module, cfg.objective.tau_end)
    set_mode(module, "hard")
    engine.eval()
    export_info = None
    if cfg.eval.export:
        source = plan.model_path if Path(plan.model_path).is_dir() else None
        export = export_pruned if cfg.moe.method == PRUNE else export_moe   # dense family vs MoE target
        result = export(module, plan.adapter, plan.spec, plan.output / "model", source_dir=source,
                        method=cfg.moe.method, overwrite=True, gather=lambda ps: dist.gathered(ps),
                        is_writer=dist.is_main(),
                        extra_meta={"steps": state.step, "seed": cfg.train.seed,
                                    "tau_end": cfg.objective.tau_end})
        export_info = {"dir": str(result.output_dir), "params": result.params.to_dict()}
    ev = cfg.eval
    if packed.eval is None:
        raise DataError("no held-out split was built; pass --eval_data or --eval_fraction")
    set_mode(module, "dense")
    dense = perplexity(module, packed.eval, batch_size=ev.eval_batch_size, max_blocks=ev.eval_blocks,
                       device=engine.device)
    set_mode(module, "hard")
    converted = perplexity(module, packed.eval, batch_size=ev.eval_batch_size, max_blocks=ev.eval_blocks,
                           device=engine.device)
    res = {"method": cfg.moe.method, "model": cfg.model.model, "steps": state.step,
           "world_size": dist.world_size(), "budget": plan.spec.to_dict(),
           "dense": dense.to_dict(), "converted": converted.to_dict(),
           # what "dense" ran: the original weights, or the trained ones with every neuron active
           # (the original model's numbers then come from `dotmoe eval` of --model)
           "dense_weights": dense_weights(cfg),
           "retention": dense.ppl / converted.ppl,
           "final_train_loss": state.last_loss if state.losses else None,   # None: nothing was trained
           "export": export_info, "wall_seconds": time.perf_counter() - wall_start,
           "loop_seconds": state.loop_seconds}
    res["run_seconds"] = run_seconds(res["wall_seconds"], resumed_loop_seconds)
    pruned = baselines.pruned_layers(module)
    if pruned:
        res["pruned"] = {"kept_neurons": pruned[0].kept_count,
                         "active_fraction": pruned[0].kept_count / plan.spec.d_ff,
                         "importance": baselines.IMPORTANCE_CRITERION}
    monitor.scalars(cfg.train.steps, {"eval/ppl_dense": dense.ppl, "eval/ppl_converted": converted.ppl,
                                      "eval/retention": res["retention"]})
    if dist.is_main():
        table = results_table(res)
        res["table"] = table
        atomic_write_text(plan.output / "results.json", json.dumps(res, indent=1) + "\n")   # the study reads it back
        monitor.text("results", "<pre>" + table + "</pre>", cfg.train.steps)
    return res


# ====================================================================== the run

def run(cfg: RunConfig) -> int:
    return launch(cfg, preflight, _run)


def _run(plan: Plan, info: dist.DistInfo, wall_start: float) -> int:
    import deepspeed

    cfg = plan.cfg
    ds = open_run(plan, info)
    say(f"{plan.action} run: {cfg.model.model} ({plan.hf_config.model_type}, {plan.adapter.describe()}), "
         f"{info.world_size} rank(s), ZeRO stage {zero_stage(ds)}, {precision_dtype(ds)}; budget "
         f"E={plan.spec.num_experts} k={plan.spec.top_k} shared={plan.spec.shared} "
         f"({plan.spec.active_fraction:.0%} of the FFN active); output {plan.output}")

    packed = load_data(plan)

    model, layers, hf_ds = build_model(plan, ds)
    # The router and assignment machinery (aux losses, monitors, frozen scores) runs on the DOT-MoE
    # layers; a pruned model (--method prune) has none, only its PrunedFFN `layers`.
    moe_layers = [layer for layer in layers if isinstance(layer, DotMoEFFN)]
    # Every rank joins each plan's collectives: soft/ste forwards run on all ranks (data parallel);
    # hard and dense modes (evaluation, export, calibration) never compute a plan.
    plan_fn, plan_msg = select_plan_fn(cfg.moe.sinkhorn_mode, d_ff=plan.spec.d_ff)
    set_plan_fn(model, plan_fn)
    say(plan_msg)
    groups = select_trainable(model, layers, cfg, float(ds["optimizer"]["params"]["lr"]))
    # A pruned model's layers get the reconstruction term too (no router: no load balance, no z-loss).
    aux = AuxLosses(moe_layers or layers, cfg.objective.lb_weight, cfg.objective.z_weight, cfg.data.grad_accum,
                    cfg.objective.recon_weight)
    if not groups:   # nothing trains (--method prune --trainable assignment): no optimizer, no steps
        ds = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
        say("nothing to train: the model is evaluated and exported as initialised")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups or None, config=ds)

    def resumed() -> LoopState:
        state = resume(engine, moe_layers, plan.resume_from)
        say(f"resumed from {plan.resume_from.path} at step {state.step}")
        return state

    def started() -> LoopState:
        n_calib = max(1, -(-cfg.moe.calib_tokens // cfg.data.seq_len))
        calib = torch.from_numpy(packed.train[:n_calib].astype("int64"))
        if cfg.moe.method == PRUNE:
            init = initialise_pruning(engine, layers, cfg, calib, baselines.kept_count(plan.spec))
        else:
            init = initialise_assignment(engine, layers, cfg, calib)
        what = init.get("what") or f"initial partition '{cfg.partition}' and router '{cfg.moe.router_init}'"
        say(f"{what} in {init['init_seconds']:.1f} s")
        return LoopState()

    # From here on a stop signal is a flag honoured at the first step boundary (with a checkpoint),
    # also when it arrives during the resume or the initialisation.
    stop, state = start_or_resume(resumed if plan.resume_from is not None else None, started)

    monitor = Monitor(plan.output / "tensorboard" / "dotmoe", cfg.train.steps, state.step, enabled=info.is_main)
    resumed_loop_seconds = state.loop_seconds
    try:
        try:
            finished = (train_loop(engine, moe_layers, plan, packed, state, monitor, stop, aux)
                        if groups else True)
        finally:
            stop.uninstall()
        if not finished:
            return stopped_exit(stop, state.step)
        aux.remove()
        res = finish(engine, layers, plan, packed, state, monitor, wall_start, resumed_loop_seconds)
    finally:
        monitor.close()
    if info.is_main:
        print(res["table"], flush=True)
        if res["export"]:
            print(f"converted model: {res['export']['dir']}", flush=True)
    del hf_ds
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Noise that says nothing about the run: DeepSpeed calls deprecated torch.distributed names, and
    # the first layer's ZeRO-3 backward hook fires on outputs only (expected, see select_trainable).
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    try:
        cfg = parse_args(argv)
        if cfg is None:
            return 0
        if cfg.train.phase == "recover":   # expert-parallel training of an exported MoE (recover.py)
            from dotmoe_ds.recover import run_recovery

            return run_recovery(cfg)
        return run(cfg)
    except USER_ERRORS as err:
        if is_main_process():
            print(f"dotmoe: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE


if __name__ == "__main__":
    from dotmoe_ds.distributed import exit_process

    exit_process(main())
