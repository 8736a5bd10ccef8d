"""The same-budget baselines of METHOD.md section 7, and the registry the quality study launches.

`prune` is structured FFN pruning: each layer keeps the `kept_count(spec)` most important neurons
(as many as a token of the MoE budget uses: shared + k * mean capacity), scored by activation-weighted
norm on the calibration tokens, and the result is a *dense* model of the source family with a smaller
`intermediate_size`. During the run every MLP is a `PrunedFFN`: the dense gate/up/down linears (same
parameter names, so ZeRO-3 partitions and checkpoints them unchanged) with a 0/1 neuron mask. Masked
neurons get exactly zero gradient, so fine-tuning the masked model is fine-tuning the sliced one;
`export_pruned` writes the sliced weights as a plain dense checkpoint.

The importance of neuron j is `RMS_t(h_j(x_t)) * ||W_d[:, j]||` (p = 2): its contribution to the FFN
output is `W_d[:, j] h_j(x)`, whose mean squared norm over tokens is `||W_d[:, j]||^2 E[h_j^2]`, so
this ranks neurons by the output energy that removing them loses (the criterion `anchors/prune50.py`
measured). p = 1 (mean |h_j| instead of the RMS) is `neuron_importance(..., p=1)`.

Everything here is pure torch; the trainer does the layer-parallel calibration and the gathers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from . import layer as layer_lib
from .export import (DEFAULT_MAX_SHARD_BYTES, FORMAT_VERSION, ExportError, ExportResult, Gather, ParamCounts,
                     PlannedTensor, tensor_shape, export_units, check_output_dir, publish, stream_units)
from .families import FamilyAdapter
from .objectives import relative_reconstruction_error
from .reference import ReferenceFFN, dense_output
from .provenance import is_hub_id, portable_command, public_model_name
from .spec import MoESpec

PRUNE = "prune"
IMPORTANCE_P = 2.0
IMPORTANCE_CRITERION = ("RMS over calibration tokens of the neuron's activation h_j (the input of down_proj) "
                        "times the norm of its down_proj column")


# ====================================================================== the method registry

@dataclass(frozen=True)
class MethodRun:
    """One method or ablation of the quality study: the trainer flags that select it."""

    name: str
    flags: dict[str, str]
    description: str
    exports: str                    # "moe" (the family's MoE target) or "dense" (the family itself)
    ablation_of: str | None = None

    def argv(self) -> list[str]:
        """The flags as trainer command-line arguments, e.g. ['--method', 'dot', '--assigner', 'softmax']."""
        return [f"--{k}={v}" for k, v in self.flags.items()]


_METHODS = (
    MethodRun("dot", {"method": "dot"}, "DOT-MoE: Sinkhorn assignment with STE, learned with the router; "
              "importance-stratified initialisation", "moe"),
    MethodRun("random", {"method": "random"}, "fixed uniformly random capacity-exact partition; router trained",
              "moe"),
    MethodRun("cluster", {"method": "cluster"}, "fixed balanced k-means partition (MoEfication / LLaMA-MoE); "
              "router trained", "moe"),
    MethodRun(PRUNE, {"method": PRUNE}, "structured FFN pruning to the same active fraction (activation-weighted "
              "norm); a dense model", "dense"),
    MethodRun("dot_no_sinkhorn", {"method": "dot", "assigner": "softmax"}, "DOT without optimal transport: "
              "row softmax of the scores, capacity-exact rounding", "moe", ablation_of="dot"),
    MethodRun("dot_no_routing_ste", {"method": "dot", "routing_ste": "false"}, "DOT without the routing STE "
              "(non-selected experts get no gradient)", "moe", ablation_of="dot"),
    MethodRun("dot_random_init", {"method": "dot", "partition": "random"}, "DOT started from a random "
              "partition instead of the importance-stratified one", "moe", ablation_of="dot"),
)
METHOD_REGISTRY: dict[str, MethodRun] = {m.name: m for m in _METHODS}


def describe_methods() -> dict[str, MethodRun]:
    """Every method and ablation of the study by name (insertion order: methods, then ablations)."""
    return dict(METHOD_REGISTRY)


def method_argv(name: str) -> list[str]:
    """Trainer flags of the method or ablation `name`; a clear error naming the known ones."""
    if name not in METHOD_REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHOD_REGISTRY)}")
    return METHOD_REGISTRY[name].argv()


# ====================================================================== pruning: the math

def kept_count(spec: MoESpec) -> int:
    """Neurons a pruned layer keeps: what one token of the MoE budget uses, shared + k * mean(c_e),
    rounded to the nearest integer (halves up). Not padded: a dense FFN has no expert kernel that
    needs a multiple of 8, and the MoE's own counts exclude its padding."""
    E = spec.num_experts
    twice = 2 * (spec.shared * E + spec.top_k * sum(spec.capacities))
    return (twice + E) // (2 * E)


def neuron_importance(inputs: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor,
                      act_fn: Callable[[Tensor], Tensor], p: float = IMPORTANCE_P, chunk: int = 512) -> Tensor:
    """`mean_t(|h_j(x_t)|^p)^(1/p) * ||W_d[:, j]||` per neuron `[d_ff]` (fp32), from the MLP inputs
    `[T, d]` and the SwiGLU weights, in chunks of tokens so `h` is never `[T, d_ff]` at once. Computed
    on the weights' device."""
    if inputs.dim() != 2 or inputs.shape[1] != gate_weight.shape[1]:
        raise ValueError(f"inputs must be [tokens, {gate_weight.shape[1]}], got {tuple(inputs.shape)}")
    if inputs.shape[0] == 0:
        raise ValueError("no calibration tokens: neuron importance needs at least one MLP input")
    if p <= 0:
        raise ValueError(f"p must be positive, got {p}")
    dev = gate_weight.device
    g, u = gate_weight.float(), up_weight.float()
    acc = torch.zeros(g.shape[0], dtype=torch.float64, device=dev)
    for start in range(0, inputs.shape[0], chunk):
        x = inputs[start:start + chunk].to(dev).float()
        h = (act_fn(x @ g.T) * (x @ u.T)).abs()
        acc += (h if p == 1 else h.pow(p)).sum(0).double()
    mag = acc / inputs.shape[0]
    mag = mag if p == 1 else mag.pow(1.0 / p)
    return (mag.float() * down_weight.float().norm(dim=0)).cpu()


def choose_kept(importance: Tensor, kept: int) -> Tensor:
    """The `kept` most important neurons, ascending (dense order is kept). Ties go to the lower index."""
    if not 1 <= kept <= importance.numel():
        raise ValueError(f"kept={kept} must be between 1 and the {importance.numel()} neurons")
    order = torch.argsort(importance, descending=True, stable=True)
    return order[:kept].sort().values


@dataclass
class PrunedWeights:
    """One layer's kept neurons and its sliced SwiGLU weights (fresh copies)."""

    kept: Tensor      # [m] ascending dense neuron indices
    gate: Tensor      # [m, d] = W_g[kept]
    up: Tensor        # [m, d] = W_u[kept]
    down: Tensor      # [d, m] = W_d[:, kept]


def slice_swiglu(gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor, kept: Tensor) -> PrunedWeights:
    kept = kept.to(gate_weight.device)
    return PrunedWeights(kept=kept.cpu(), gate=gate_weight[kept].detach().clone(),
                         up=up_weight[kept].detach().clone(), down=down_weight[:, kept].detach().clone())


class PrunedFFN(nn.Module):
    """A dense SwiGLU MLP restricted to its kept neurons by a 0/1 mask.

    Modes: 'dense' (the original MLP: the distillation teacher and the dense reference; `reference`
    when the trainer keeps one, as DotMoEFFN) and 'hard'
    (pruned: `W_d (h(x) * mask)`, equal to the sliced MLP of `materialise()` to float precision).
    Until `set_kept` is called every neuron is kept, so the calibration forward is the dense model.
    The mask is a buffer (not trained, not ZeRO-partitioned); the trainer checkpoints it explicitly.
    """

    MODES = ("dense", "hard")

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear,
                 act_fn: Callable[[Tensor], Tensor], mode: str = "hard"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.d_ff = gate_proj.out_features
        self.register_buffer("keep_mask", torch.ones(self.d_ff, dtype=torch.bool, device=gate_proj.weight.device),
                             persistent=False)
        self.mode = mode
        # The layer-local reconstruction term, as DotMoEFFN computes it (the study gives every method
        # the same objective): set by the trainer's AuxLosses, read and cleared by its hook.
        self.recon = False
        self.last_recon: Tensor | None = None
        self.reference: ReferenceFFN | None = None   # as DotMoEFFN.reference (the frozen original MLP)

    @classmethod
    def wrap(cls, layer_idx: int, gate_proj, up_proj, down_proj, act_fn) -> "PrunedFFN":
        """`FamilyAdapter.swap_in`'s factory."""
        return cls(gate_proj, up_proj, down_proj, act_fn)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"a pruned FFN has modes {self.MODES}, got {mode!r}")
        self._mode = mode

    def extra_repr(self) -> str:
        return f"d_ff={self.d_ff}, kept={self.kept_count}, mode={self.mode}"

    @property
    def kept_count(self) -> int:
        return int(self.keep_mask.sum())

    def kept_neurons(self) -> Tensor:
        """Ascending dense indices of the kept neurons (CPU)."""
        return torch.nonzero(self.keep_mask).squeeze(1).cpu()

    @torch.no_grad()
    def set_kept(self, kept: Tensor) -> None:
        kept = torch.as_tensor(kept).long()
        if kept.dim() != 1 or kept.numel() == 0 or kept.min() < 0 or kept.max() >= self.d_ff or \
                kept.unique().numel() != kept.numel():
            raise ValueError(f"kept must be distinct neuron indices in [0, {self.d_ff}), got {kept.numel()} values")
        self.keep_mask.zero_()
        self.keep_mask[kept.to(self.keep_mask.device)] = True

    def forward(self, x: Tensor) -> Tensor:
        if self.mode != "hard":
            return dense_output(self, x)
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        y = self.down_proj(h * self.keep_mask.to(h.dtype))
        if self.recon and self.training and torch.is_grad_enabled():
            with torch.no_grad():   # the target: the dense output of the same input
                dense = dense_output(self, x, h)
            self.last_recon = relative_reconstruction_error(y, dense)
        return y

    @torch.no_grad()
    def materialise(self) -> PrunedWeights:
        """The sliced MLP (needs the weights whole: inside a ZeRO-3 gather)."""
        return slice_swiglu(self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                            self.kept_neurons())


def pruned_layers(model: nn.Module) -> list[PrunedFFN]:
    return [m for m in model.modules() if isinstance(m, PrunedFFN)]


def set_mode(model: nn.Module, mode: str) -> None:
    """Mode of every conversion layer of `model`, DOT-MoE and pruned alike ('dense' or 'hard' for
    pruned layers; a pruned layer trains in 'hard')."""
    layer_lib.set_mode(model, mode)
    for m in pruned_layers(model):
        m.mode = mode


def mark_trainable(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """requires_grad of a pruned model, returning the trainable parameters: nothing for 'assignment'
    (there is no router), the MLP weights for 'ffn', everything for 'all' (METHOD.md section 7)."""
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable == "ffn":
        for m in pruned_layers(model):
            for lin in (m.gate_proj, m.up_proj, m.down_proj):
                lin.weight.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def kept_state(model: nn.Module) -> dict[int, Tensor]:
    """{layer index: kept neurons} of a model's pruned layers ({} for none), for checkpoints: the
    mask is a buffer, which neither the optimizer nor a ZeRO-3 checkpoint is relied on to keep."""
    return {i: m.kept_neurons() for i, m in enumerate(pruned_layers(model))}


def restore_kept_state(model: nn.Module, state: dict[int, Tensor]) -> None:
    layers = pruned_layers(model)
    for i, kept in state.items():
        layers[int(i)].set_kept(kept)


# ====================================================================== export

def export_pruned(model: nn.Module, adapter: FamilyAdapter, spec: MoESpec, output_dir: str | Path, *,
                  source_dir: str | Path | None = None, method: str = PRUNE, overwrite: bool = False,
                  gather: Gather | None = None, dtype: torch.dtype | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, is_writer: bool = True,
                  command: str | None = None, extra_meta: dict | None = None) -> ExportResult:
    """Write a pruned model (every layer's `mlp` a PrunedFFN) as a dense checkpoint of its own family
    with `intermediate_size` = the kept neurons; streamed one layer at a time like `export_moe`,
    with the same keyword arguments (every rank calls it under ZeRO-3; `is_writer` on one).
    `spec` is the MoE budget the pruning matches; `dotmoe.json` records it and the kept neurons."""
    out = check_output_dir(output_dir, overwrite, source_dir)
    dense_config = model.config
    if dtype is None:
        dtype = model.get_input_embeddings().weight.dtype
    units = export_units(model, adapter)
    mlps = [u.mlp for u in units if u.mlp is not None]
    if not all(isinstance(m, PrunedFFN) for m in mlps):
        raise ExportError("export_pruned needs every layer's MLP to be a PrunedFFN; use export_moe for DOT-MoE layers")
    counts = sorted({m.kept_count for m in mlps})
    if len(counts) != 1:
        raise ExportError(f"the layers keep different numbers of neurons ({counts}); a dense config has one "
                          "intermediate_size, so every layer must keep the same number")
    kept = counts[0]
    target_config = adapter.pruned_config(dense_config, kept)
    target_config.architectures = [type(model).__name__]
    target_config.dtype = dtype
    target_config.use_cache = True   # the trainer turns the KV cache off for training only
    gather = gather or (lambda params: contextlib.nullcontext())
    hidden = dense_config.hidden_size

    plan: list[PlannedTensor] = []
    mlp_names: set[str] = set()
    for unit in units:
        for name, t in unit.tensors:
            plan.append(PlannedTensor(name, tensor_shape(t), dtype if t.is_floating_point() else t.dtype))
        if unit.layer_idx is not None:
            g, u, d = adapter.dense_mlp_tensor_names(unit.layer_idx)
            for name, shape in ((g, (kept, hidden)), (u, (kept, hidden)), (d, (hidden, kept))):
                plan.append(PlannedTensor(name, shape, dtype))
                mlp_names.add(name)

    def write_mlp(unit, write) -> dict:
        w = unit.mlp.materialise()
        for name, t in zip(adapter.dense_mlp_tensor_names(unit.layer_idx), (w.gate, w.up, w.down)):
            write(name, t)
        return {"layer": unit.layer_idx, "kept": w.kept.tolist()}

    tmp, index, layers_meta = stream_units(out, units, plan, gather=gather, is_writer=is_writer,
                                           max_shard_bytes=max_shard_bytes, tensor_name=lambda name: name,
                                           write_mlp=write_mlp)
    params = _count_params(plan, mlp_names, spec.d_ff, hidden, len(mlps))
    result = ExportResult(out, params, sorted(set(index["weight_map"].values())))
    if not is_writer:
        return result
    source = public_model_name(source_dir if source_dir is not None
                               else getattr(dense_config, "_name_or_path", "") or None)
    meta = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "source_model": source,
        "dense_model_type": dense_config.model_type,
        "target_model_type": target_config.model_type,
        "target_architecture": type(model).__name__,
        "d_ff": spec.d_ff,
        "intermediate_size": kept,
        "kept_neurons": kept,
        "active_ffn_fraction": kept / spec.d_ff,
        "matched_budget": spec.to_dict(),
        "importance": {"criterion": IMPORTANCE_CRITERION, "p": IMPORTANCE_P},
        "params": params.to_dict(),
        "command": command if command is not None else portable_command(),
        "layers": layers_meta,
        **({"extra": extra_meta} if extra_meta else {}),
    }
    publish(tmp, out, model, target_config, source_dir, meta, _model_card(meta))
    return result


def _count_params(plan: list[PlannedTensor], mlp_names: set[str], d_ff: int, hidden: int, num_layers: int) -> ParamCounts:
    numel = {p.name: p.nbytes // torch.empty((), dtype=p.dtype).element_size() for p in plan}
    stored = sum(numel.values())
    non_mlp = sum(n for name, n in numel.items() if name not in mlp_names)
    return ParamCounts(dense=non_mlp + num_layers * d_ff * 3 * hidden, total=stored, active=stored, stored=stored)


def _model_card(meta: dict) -> str:
    p, b = meta["params"], meta["matched_budget"]
    src = meta["source_model"] or "(not recorded)"
    base = f"base_model: {src}\n" if meta["source_model"] and is_hub_id(src) else ""
    return f"""---
library_name: transformers
{base}tags:
- pruning
- dot-moe-baseline
---

# Structured FFN pruning of {src}

A dense `{meta['target_architecture']}` whose feed-forward layers keep {meta['kept_neurons']} of their
{meta['d_ff']} neurons ({meta['active_ffn_fraction']:.1%}), the same active fraction as a Mixture-of-Experts
with {b['num_experts']} experts, top-{b['top_k']}{f", a shared expert of {b['shared']}" if b['shared'] else ""}.
This is the `prune` baseline of the DOT-MoE study. Neurons were ranked by {meta['importance']['criterion']}
on calibration text; `dotmoe.json` lists the kept neurons of every layer.

- parameters: {p['total']:,} (dense model: {p['dense']:,})

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

## Command

```
{meta['command']}
```
"""
