"""Streaming export of a converted model as a standard transformers MoE checkpoint (METHOD.md section 6).

`export_moe` walks the model one unit at a time (the embedding, each decoder layer, the final norm,
the head), materialises that layer's experts, and streams the tensors straight into safetensors
shards whose headers were planned up front from the shapes alone. So the export holds one layer's
tensors at a time whatever the shard size or model size (contract 5 of DESIGN.md). Under ZeRO-3 the
caller passes `gather`, a context-manager factory over a list of parameters (e.g.
`deepspeed.zero.GatheredParameters`), and every rank calls `export_moe` (the gathers are collective)
with `is_writer=True` on one rank only; this module never imports DeepSpeed.

Written files: `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, `config.json`,
`generation_config.json`, the dense model's tokenizer files, `dotmoe.json` (the budget and, per
layer, the dense neuron indices of every expert) and a `README.md` model card. Everything is written
into a hidden sibling directory that is renamed into place at the end, so a crash never leaves a
half-written export under the requested name.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .families import EXPERT_SIZE_MULTIPLE, FamilyAdapter
from .layer import ExpertWeights
from .provenance import is_hub_id, portable_command, public_model_name
from .spec import MoESpec

log = logging.getLogger(__name__)

Gather = Callable[[Sequence[nn.Parameter]], ContextManager]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "vocab.txt", "spiece.model")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
FORMAT_VERSION = 1

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                       torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class ExportError(ValueError):
    """An export that cannot start or would not be correct; the message names the fix."""


@dataclass
class ParamCounts:
    """Parameter counts of the exported model (real neurons only; zero padding excluded)."""

    dense: int     # the dense model the conversion started from
    total: int     # every real parameter of the MoE
    active: int    # used per token: non-expert parameters + shared expert + k experts of mean size
    stored: int    # parameters on disk, zero padding included

    def to_dict(self) -> dict:
        return {"dense": self.dense, "total": self.total, "active": self.active, "stored": self.stored}


@dataclass
class ExportResult:
    output_dir: Path
    params: ParamCounts
    shards: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- output directory

def check_output_dir(output_dir: str | Path, overwrite: bool = False,
                     source_dir: str | Path | None = None) -> Path:
    """Refuse an output directory that would lose data (or a missing source folder), before any
    expensive work starts."""
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a directory; choose another --output_dir")
    if source_dir is not None:
        src = Path(source_dir).expanduser().resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ExportError(f"output directory {out} overlaps the source model {src}; "
                              "choose an --output_dir outside it")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output directory {out} already exists and is not empty; pass --overwrite "
                          "to replace it, or choose another --output_dir")
    if source_dir is not None and not Path(source_dir).is_dir():
        raise ExportError(f"source model directory {source_dir} does not exist")
    return out


# ---------------------------------------------------------------------- streaming safetensors

@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int = 0
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class StreamingShardWriter:
    """Writes tensors, in a fixed planned order, into safetensors shards whose headers are written
    first from the plan; each tensor's bytes go to disk as soon as it arrives."""

    def __init__(self, directory: Path, plan: list[PlannedTensor], max_shard_bytes: int, enabled: bool = True):
        self.directory, self.enabled = directory, enabled
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for p in plan:
            if shards[-1] and size + p.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            p.shard, p.begin, p.end = len(shards) - 1, size, size + p.nbytes
            shards[-1].append(p)
            size += p.nbytes
        self.shards = shards
        n = len(shards)
        self.filenames = [f"model-{s + 1:05d}-of-{n:05d}.safetensors" for s in range(n)]
        self._pending: Iterator[PlannedTensor] = iter(plan)
        self._plan = plan
        self._file = None
        self._open = -1

    def write(self, name: str, tensor: Tensor) -> None:
        try:
            p = next(self._pending)
        except StopIteration:
            raise ExportError(f"internal: tensor {name} was not planned") from None
        if p.name != name or p.shape != tuple(tensor.shape):
            raise ExportError(f"internal: expected {p.name} {list(p.shape)}, got {name} {list(tensor.shape)}")
        if not self.enabled:
            return
        if p.shard != self._open:
            self._close_file()
            self._open_shard(p.shard)
        data = tensor.detach().to(device="cpu", dtype=p.dtype).contiguous()
        if data.numel():
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)

    def _open_shard(self, s: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for p in self.shards[s]:
            header[p.name] = {"dtype": _SAFETENSORS_DTYPES[p.dtype], "shape": list(p.shape),
                              "data_offsets": [p.begin, p.end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)   # tensor data starts 8-byte aligned
        self._file = open(self.directory / self.filenames[s], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._open = s

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> dict:
        """Finish the last shard; returns the index (and writes it when enabled)."""
        if next(self._pending, None) is not None:
            raise ExportError("internal: export ended before every planned tensor was written")
        self._close_file()
        index = {"metadata": {"total_size": sum(p.nbytes for p in self._plan)},
                 "weight_map": {p.name: self.filenames[p.shard] for p in self._plan}}
        if self.enabled:
            write_json(self.directory / "model.safetensors.index.json", index)
        return index

    def abort(self) -> None:
        self._close_file()


# ---------------------------------------------------------------------- the export

@dataclass
class _Unit:
    """What is gathered and written together: one decoder layer, or one top-level tensor."""

    params: list[nn.Parameter]
    tensors: list[tuple[str, Tensor]]    # non-MLP tensors by dense name
    layer_idx: int | None = None
    mlp: nn.Module | None = None


def tensor_shape(t: Tensor) -> tuple[int, ...]:
    # Under ZeRO-3 a parameter is a placeholder outside a gather; ds_shape is its real shape.
    return tuple(getattr(t, "ds_shape", t.shape))


def export_units(model: nn.Module, adapter: FamilyAdapter) -> list[_Unit]:
    layers = adapter.layers(model)
    state = model.state_dict(keep_vars=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: set[int] = set()
    before, after = [], []
    in_layers = f"{adapter.layers_path}."
    reached_layers = False
    for name, t in state.items():
        if name.startswith(in_layers):
            reached_layers = True
            continue
        if id(t) in seen:
            if not tied:
                raise ExportError(f"{name} shares its tensor with another weight but tie_word_embeddings "
                                  "is False; the export cannot tell which to keep")
            continue   # the tied head is the embedding
        seen.add(id(t))
        params = [t] if isinstance(t, nn.Parameter) else []
        (after if reached_layers else before).append(_Unit(params, [(name, t)]))
    units = before
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        if not hasattr(mlp, "materialise"):
            raise ExportError(f"layer {i}'s MLP is {type(mlp).__name__}, not a DOT-MoE layer: convert the "
                              "model first (adapter.swap_in with DotMoEFFN)")
        prefix = adapter.layer_prefix(i)
        tensors = [(prefix + n, t) for n, t in layer.state_dict(keep_vars=True).items()
                   if not n.startswith("mlp.")]
        tensors += adapter.added_layer_tensors(i, model.config, torch.float32)   # e.g. zero q/k/v biases
        units.append(_Unit(list(layer.parameters()), tensors, layer_idx=i, mlp=mlp))
    return units + after


def export_moe(model: nn.Module, adapter: FamilyAdapter, spec: MoESpec, output_dir: str | Path, *,
               source_dir: str | Path | None = None, method: str = "dot", overwrite: bool = False,
               gather: Gather | None = None, dtype: torch.dtype | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, router_aux_loss_coef: float = 0.001,
               expert_size_multiple: int = EXPERT_SIZE_MULTIPLE,
               is_writer: bool = True, command: str | None = None,
               extra_meta: dict | None = None) -> ExportResult:
    """Write the converted `model` (every layer's `mlp` a DotMoEFFN) as `adapter`'s MoE target.

    model:        the conversion model (dense weights + DOT-MoE layers); not modified.
    spec:         the budget every layer was converted with.
    source_dir:   the dense checkpoint folder: its tokenizer files and generation config are copied.
    gather:       `gather(params)` context-manager factory making a unit's parameters whole (ZeRO-3).
    dtype:        on-disk dtype (default: the model's embedding dtype).
    expert_size_multiple: experts are zero-padded to a multiple of this many neurons (exact; 8 keeps
                  transformers' grouped_mm expert kernels usable).
    is_writer:    False on ranks that only take part in the gathers.
    command:      recorded in the model card (default: this process's command line).
    """
    out = check_output_dir(output_dir, overwrite, source_dir)
    adapter = adapter.for_spec(spec)   # e.g. Llama with a shared expert exports to Qwen2-MoE
    dense_config = model.config
    if dtype is None:
        dtype = model.get_input_embeddings().weight.dtype
    expert_size = adapter.expert_intermediate_size(spec, expert_size_multiple)
    target_config = adapter.target_config(dense_config, spec, expert_size=expert_size,
                                          router_aux_loss_coef=router_aux_loss_coef, dtype=dtype)
    gather = gather or (lambda params: contextlib.nullcontext())
    units = export_units(model, adapter)
    hidden = dense_config.hidden_size

    plan: list[PlannedTensor] = []
    moe_names: set[str] = set()
    for unit in units:
        for name, t in unit.tensors:
            t_dtype = dtype if t.is_floating_point() else t.dtype
            plan.append(PlannedTensor(adapter.dense_to_target_name(name),
                                      adapter.target_tensor_shape(name, tensor_shape(t), dense_config), t_dtype))
        if unit.layer_idx is not None:
            for name, shape in adapter.moe_tensor_shapes(unit.layer_idx, spec, hidden, expert_size):
                plan.append(PlannedTensor(name, shape, dtype))
                moe_names.add(name)

    def write_mlp(unit, write) -> dict:
        weights = unit.mlp.materialise()
        _check_layer(weights, spec, unit.layer_idx)
        for name, t in adapter.moe_tensors(unit.layer_idx, weights, expert_size):
            write(name, t)
        return _layer_meta(unit.layer_idx, weights)

    tmp, index, layers_meta = stream_units(out, units, plan, gather=gather, is_writer=is_writer,
                                           max_shard_bytes=max_shard_bytes, tensor_name=adapter.dense_to_target_name,
                                           write_mlp=write_mlp,
                                           tensor_value=lambda name, t: adapter.target_tensor(name, t, dense_config))
    # Tensors the target adds (zero q/k/v biases) are not the dense model's.
    added = {n for i in range(len(layers_meta)) for n, _ in adapter.added_layer_tensors(i, dense_config, dtype)}
    params = _count_params(plan, moe_names, spec, expert_size, hidden, len(layers_meta), added)
    result = ExportResult(out, params, sorted(set(index["weight_map"].values())))
    if not is_writer:
        return result
    source = public_model_name(source_dir if source_dir is not None
                               else getattr(dense_config, "_name_or_path", "") or None)
    command = command if command is not None else portable_command()
    meta = _dotmoe_meta(adapter, spec, expert_size, method, source, dense_config, params, layers_meta, command,
                        extra_meta)
    publish(tmp, out, model, target_config, source_dir, meta, _model_card(meta))
    log.info("exported %s to %s (%d shard(s))", adapter.target_architecture, out, len(result.shards))
    return result


def stream_units(out: Path, units: list, plan: list[PlannedTensor], *, gather: Gather, is_writer: bool,
                 max_shard_bytes: int, tensor_name: Callable[[str], str],
                 write_mlp: Callable[[Any, Callable[[str, torch.Tensor], None]], dict],
                 tensor_value: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> tuple[Path, dict, list]:
    """Stream every unit (its parameters gathered, one unit at a time) into safetensors shards in a
    temporary sibling of `out`: the unit's plain tensors under `tensor_name(name)` (valued
    `tensor_value(name, t)` when given, e.g. a target's re-parametrised norm), then its MLP
    through `write_mlp(unit, write)`, which returns the layer's dotmoe.json record. Returns
    (temporary folder, shard index, layer records); on any failure the folder is removed."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if is_writer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    writer = StreamingShardWriter(tmp, plan, max_shard_bytes, enabled=is_writer)
    layers_meta = []
    try:
        for unit in units:
            with gather(unit.params):
                for name, t in unit.tensors:
                    writer.write(tensor_name(name), tensor_value(name, t) if tensor_value else t)
                if unit.mlp is not None:
                    layers_meta.append(write_mlp(unit, writer.write))
            log.info("exported %s", f"layer {unit.layer_idx}" if unit.layer_idx is not None
                     else unit.tensors[0][0])
        index = writer.close()
    except BaseException:
        writer.abort()
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, index, layers_meta


def publish(tmp: Path, out: Path, model: nn.Module, target_config, source_dir: str | Path | None, meta: dict,
            card: str) -> None:
    """Complete the streamed folder `tmp` (config, generation config, tokenizer files of `source_dir`,
    dotmoe.json `meta`, model card) and move it into place as `out` atomically."""
    try:
        target_config.save_pretrained(tmp)
        _add_legacy_config_keys(tmp / "config.json")
        _write_generation_config(model, target_config, source_dir, tmp)
        if source_dir is not None:
            for fname in TOKENIZER_FILES:
                if (Path(source_dir) / fname).is_file():
                    shutil.copy2(Path(source_dir) / fname, tmp / fname)
        write_json(tmp / "dotmoe.json", meta)
        (tmp / "README.md").write_text(card)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_layer(weights: ExpertWeights, spec: MoESpec, layer_idx: int) -> None:
    if weights.spec != spec:
        raise ExportError(f"layer {layer_idx} was converted with {weights.spec}, but the export is for {spec}: "
                          "every layer must share one budget")


def _layer_meta(layer_idx: int, w: ExpertWeights) -> dict:
    return {"layer": layer_idx,
            "experts": [idx.tolist() for idx in w.expert_neurons],
            "shared": w.shared_neurons.tolist() if w.shared_neurons is not None else None}


def _count_params(plan: list[PlannedTensor], moe_names: set[str], spec: MoESpec, expert_size: int,
                  hidden: int, num_layers: int, added: set[str] = frozenset()) -> ParamCounts:
    numel = {p.name: p.nbytes // torch.empty((), dtype=p.dtype).element_size() for p in plan}
    stored = sum(numel.values())
    non_moe = sum(n for name, n in numel.items() if name not in moe_names)
    moe_stored = stored - non_moe
    per_neuron = 3 * hidden   # one row of gate, one of up, one column of down
    C, E = expert_size, spec.num_experts
    experts_stored = num_layers * E * C * per_neuron
    experts_real = num_layers * sum(spec.capacities) * per_neuron
    always_on = moe_stored - experts_stored     # router, shared expert, shared gate
    mean_c = sum(spec.capacities) / E
    active = non_moe + always_on + round(num_layers * spec.top_k * mean_c * per_neuron)
    added_numel = sum(n for name, n in numel.items() if name in added)
    return ParamCounts(dense=non_moe - added_numel + num_layers * spec.d_ff * per_neuron,
                       total=non_moe + always_on + experts_real, active=active, stored=stored)


def _dotmoe_meta(adapter: FamilyAdapter, spec: MoESpec, expert_size: int, method: str, source: str | None, dense_config,
                 params: ParamCounts, layers: list[dict], command: str, extra: dict | None) -> dict:
    C = expert_size
    padding = [C - c for c in spec.capacities]
    return {
        "format_version": FORMAT_VERSION,
        "method": method,
        "source_model": source,
        "dense_model_type": dense_config.model_type,
        "target_model_type": adapter.target_model_type,
        "target_architecture": adapter.target_architecture,
        "d_ff": spec.d_ff,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "capacities": list(spec.capacities),
        "shared_neurons": spec.shared,
        "active_ffn_fraction": spec.active_fraction,
        "expert_intermediate_size": C,
        "padding": {
            "padded": any(padding),
            "zero_neurons_per_expert": padding,
            "note": ("experts smaller than expert_intermediate_size are padded with zero rows in gate/up "
                     "and zero columns in down (silu(0) * 0 = 0, so the output is unchanged); parameter "
                     "counts exclude the padding"),
        },
        "down_proj_scale": spec.top_k,
        "shared_down_proj_scale": adapter.shared_down_scale if spec.has_shared else None,
        "scales_note": ("each expert's down projection is top_k * W_d[:, S_e] (DOT-MoE gates are k * the "
                        "renormalised top-k probabilities); the shared expert's down projection is multiplied "
                        "by shared_down_proj_scale so the target's shared gate multiplies it by exactly 1"),
        "params": params.to_dict(),
        "command": command,
        "layers": layers,
        **({"extra": extra} if extra else {}),
    }


def _model_card(meta: dict) -> str:
    p = meta["params"]
    src = meta["source_model"] or "(not recorded)"
    caps = meta["capacities"]
    caps_s = f"{caps[0]} neurons each" if len(set(caps)) == 1 else f"capacities {caps}"
    shared = (f", plus a shared expert of {meta['shared_neurons']} neurons" if meta["shared_neurons"] else "")
    pad = (f"\nExperts are stored with {meta['expert_intermediate_size']} neurons; smaller experts are "
           "zero-padded (exact, see `dotmoe.json`). Parameter counts exclude the padding.\n"
           if meta["padding"]["padded"] else "")
    base = f"base_model: {src}\n" if meta["source_model"] and is_hub_id(src) else ""
    return f"""---
library_name: transformers
{base}tags:
- mixture-of-experts
- dot-moe
- moefication
---

# DOT-MoE conversion of {src}

A Mixture-of-Experts made from the dense model `{src}` by splitting each feed-forward layer's
neurons into experts (method: `{meta['method']}`, DOT-MoE: differentiable optimal transport of neurons
onto experts). It is a standard `{meta['target_architecture']}` checkpoint: load it with

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

## Budget

- {meta['num_experts']} routed experts ({caps_s}), top-{meta['top_k']} per token{shared}
- active feed-forward fraction: {meta['active_ffn_fraction']:.1%} of the dense {meta['d_ff']} neurons
- parameters: {p['active']:,} active per token, {p['total']:,} total (dense model: {p['dense']:,});
  both include attention and embeddings, and count k experts of mean size as active
{pad}
`dotmoe.json` records, for every layer, the dense neuron indices of each expert (and of the shared
expert), so the conversion can be audited and reproduced. Each expert's down projection is scaled by
top-k = {meta['top_k']} (the DOT-MoE gate is k times the renormalised router probability).

## Command

```
{meta['command']}
```
"""


def _add_legacy_config_keys(path: Path) -> None:
    """Also state RoPE and dtype the pre-v5 way (rope_theta / rope_scaling / torch_dtype at top level),
    which transformers v4 and the serving engines built on it read; v5 reads either, identically."""
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:   # a single (not per-layer-type) RoPE
        cfg.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            cfg.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if rope.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    write_json(path, cfg)


def _write_generation_config(model: nn.Module, target_config, source_dir, tmp: Path) -> None:
    if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
        shutil.copy2(Path(source_dir) / "generation_config.json", tmp / "generation_config.json")
        return
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(target_config)
    gen.to_json_file(tmp / "generation_config.json")


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export to `out`, replacing what is there only after the new one is complete."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_dotmoe(export_dir: str | Path) -> dict:
    """The `dotmoe.json` of an export."""
    return json.loads((Path(export_dir) / "dotmoe.json").read_text())


def iter_layer_experts(meta: dict) -> Iterable[tuple[int, list[list[int]], list[int] | None]]:
    """(layer index, per-expert dense neuron indices, shared neuron indices) from a `dotmoe.json`."""
    for layer in meta["layers"]:
        yield layer["layer"], layer["experts"], layer["shared"]
