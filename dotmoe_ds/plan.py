"""Per-GPU memory plan of a DOT-MoE run under DeepSpeed: does it fit, and if not, what to change.

    python tools/plan_memory.py --model llama-3-70b --nodes 8 --gpus_per_node 8 --gpu_memory_gb 80 \\
        --ds_config ds_configs/z3.json --num_experts 8 --top_k 2 --seq_len 4096
    exit status 0: fits; 3: does not fit (the message names the biggest term and what to change);
    2: bad input (unknown model, unreadable DeepSpeed config, an impossible MoE budget)

`--model` is a preset (`--list_presets`), a hub id with a preset shape (meta-llama/Meta-Llama-3-70B),
a model folder or its config.json, or a hub id whose config is in the local Hugging Face cache.
The SLURM launchers run this before anything is loaded and refuse a plan that does not fit;
`dotmoe plan` calls `plan_memory(...)`. Pure Python, no torch import: it takes a fraction of a second.

How each term is counted (per GPU; W ranks; a = bytes per element of the model dtype; t = micro batch
x seq_len tokens; d hidden, f d_ff, V vocab, L layers, E' score columns = E (+1 with a shared expert)):
  model weights       a x params / W under ZeRO-3 (0 with offload_param), else a x params. Tensors
                      below stage3_param_persistence_threshold stay whole on every rank.
  DOT-MoE params      scores [f, E'] fp32 and router [E, d] per layer, sharded the same way.
  frozen FFN copy     when the FFN weights train and teacher='original' (the trainer's
                      --teacher original): a x 3 d f per layer, sharded like the weights, part of the layer's
                      gathered unit; no gradient, no optimiser state (dotmoe_ds/reference.py).
  gathered params     ZeRO-3 gathers a whole module before using it; the DOT-MoE FFN is one leaf, and
                      the embedding / LM head are one tensor each. a x (max(largest unit,
                      stage3_max_live_parameters) + stage3_prefetch_bucket_size), at most the whole
                      model: an upper bound.
  gradients           trainable params only (default: scores + router), in their own dtype, / W
                      from ZeRO-2 on, plus ZeRO's fp32 gradient partition for the optimiser.
  reduce buckets      reduce_bucket_size elements per trainable dtype (contiguous_gradients, ZeRO-3).
  optimiser state     AdamW: fp32 master + m + v = 12 bytes per trainable param / W from ZeRO-1 on.
  activations         what autograd keeps for backward, counted tensor by tensor for a Llama-style
                      decoder layer with a DOT-MoE FFN (checked against torch's saved-tensor hooks in
                      tests/test_plan_memory.py). Frozen linear layers keep nothing of their input, so
                      the default run (only scores + router trained) stores far less than fine-tuning.
                      With activation checkpointing: the L layer inputs (a x t x d each), plus one
                      layer recomputed during backward. The reconstruction term (`recon`) adds its
                      fp32 difference to the dense output, 4 x t x d + 4 x t per layer.
  layer working set   one layer's transient fp32 mask [t, f] and the activation gradients of backward.
  logits + loss       HF's loss keeps a x tV logits and 4 x tV fp32 log-probs; backward adds two fp32
                      [t, V] gradients: (a + 12) x t x V at the loss's backward.
  teacher logits      distillation: the dense teacher's logits and both distributions, (a + 8) x t x V.
  Sinkhorn            each stored layer keeps its plan and straight-through assignment (2 x 4 x f x E',
                      in the activations); computing one layer's plan and its implicit backward takes
                      about four more [f, E'] fp32 buffers.
  runtime             CUDA context, NCCL buffers, allocator slack (2 GiB on GPU, 1 GiB on CPU).
The plan fits when the total stays below (1 - margin) x GPU memory (default margin 10%).
"""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dotmoe_ds.config import PHASES, TEACHERS, TRAINABLE  # noqa: E402  (pure Python, no torch)
from dotmoe_ds.spec import MoESpec, SpecError  # noqa: E402  (pure Python, no torch)

GiB = 1024 ** 3
EXIT_FITS, EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT = 0, 2, 3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class PlanError(ValueError):
    """Input the planner cannot use; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------- models

# Shapes of the config.json of each model (hub ids map to the same shape), so a plan needs no download.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=128256, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, tie_word_embeddings=False),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=152064, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, tie_word_embeddings=True),
}
ALIASES = {
    "meta-llama/meta-llama-3-70b": "llama-3-70b", "meta-llama/meta-llama-3-70b-instruct": "llama-3-70b",
    "meta-llama/llama-3.1-70b": "llama-3-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3-70b",
    "meta-llama/llama-3.3-70b-instruct": "llama-3-70b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b", "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
    "meta-llama/llama-3.1-8b": "llama-3-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3-8b",
    "qwen/qwen2.5-72b": "qwen2.5-72b", "qwen/qwen2.5-72b-instruct": "qwen2.5-72b",
    "huggingfacetb/smollm2-135m": "smollm2-135m", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "smollm2": "smollm2-135m", "demo": "smollm2-135m",
}
DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2")
# MoE model_type -> (experts key, per-expert intermediate key, shared-expert intermediate key)
MOE_TYPES = {"mixtral": ("num_local_experts", "intermediate_size", None),
             "qwen2_moe": ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"),
             "qwen3_moe": ("num_experts", "moe_intermediate_size", None),
             "flex_olmo": ("num_experts", "intermediate_size", None)}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a decoder-only SwiGLU model (dense, or an exported MoE)."""

    name: str
    model_type: str
    hidden: int
    intermediate: int            # dense d_ff, or each routed expert's size in an MoE model
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    experts: int = 0             # routed experts of an MoE model; 0 for a dense model
    experts_per_token: int = 0
    shared_intermediate: int = 0  # Qwen2-MoE's shared expert

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str = "model") -> "ModelShape":
        mt = cfg.get("model_type")
        if mt not in DENSE_TYPES and mt not in MOE_TYPES:
            raise PlanError(f"{name}: model_type {mt!r} is not one the planner knows "
                            f"({', '.join(DENSE_TYPES + tuple(MOE_TYPES))})")
        try:
            d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            kw: dict[str, Any] = dict(
                name=name, model_type=mt, hidden=d, layers=int(cfg["num_hidden_layers"]), heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or d // heads), vocab=int(cfg["vocab_size"]),
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
            if mt in MOE_TYPES:
                ek, fk, sk = MOE_TYPES[mt]
                kw.update(intermediate=int(cfg[fk]), experts=int(cfg[ek]),
                          experts_per_token=int(cfg["num_experts_per_tok"]),
                          shared_intermediate=int(cfg.get(sk) or 0) if sk else 0)
            else:
                kw.update(intermediate=int(cfg["intermediate_size"]))
        except KeyError as err:
            raise PlanError(f"{name}: config has no {err.args[0]!r}; is it a causal LM config.json?") from None
        return cls(**kw)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    # Parameter tensors of one decoder layer, as (numel, count) pairs, so that ZeRO-3's persistence
    # threshold (small tensors stay whole on every rank) can be applied tensor by tensor.
    def layer_tensors(self) -> list[tuple[int, int]]:
        d, hd, q, kv = self.hidden, self.head_dim, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [(d * q, 2), (d * kv, 2)]                      # q, o ; k, v
        if self.model_type in ("qwen2", "qwen2_moe"):
            out += [(q, 1), (kv, 2)]                         # q, k, v biases
        if self.model_type in ("qwen3", "qwen3_moe"):
            out += [(hd, 2)]                                 # per-head q/k norms
        if self.model_type in ("olmo2", "flex_olmo"):
            out += [(q, 1), (kv, 1)]                         # full-width q/k norms
        out += [(d, 2)]                                      # the layer's two norms
        if self.is_moe:
            out += [(self.intermediate * d, 3 * self.experts), (self.experts * d, 1)]
            if self.shared_intermediate:
                out += [(self.shared_intermediate * d, 3), (d, 1)]   # shared expert and its gate
        else:
            out += [(self.intermediate * d, 3)]
        return out

    @property
    def layer_params(self) -> int:
        return sum(n * c for n, c in self.layer_tensors())

    @property
    def expert_params_per_layer(self) -> int:
        return 3 * self.intermediate * self.hidden * self.experts if self.is_moe else 0

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.layers * self.layer_params + self.embedding_params + head + self.hidden  # + final norm


def load_model_shape(model: str | dict | ModelShape) -> ModelShape:
    """A ModelShape from a preset/alias, a config.json or model folder, a cached hub id, or a dict."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        return ModelShape.from_config(model, model.get("_name_or_path", "config"))
    key = ALIASES.get(str(model).lower(), str(model).lower())
    if key in PRESETS:
        return ModelShape.from_config(PRESETS[key], key)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return ModelShape.from_config(json.loads(path.read_text()), str(model))
        except json.JSONDecodeError as err:
            raise PlanError(f"{path} is not valid JSON: {err}") from None
    cached = _hub_cache_config(str(model))
    if cached is not None:
        return ModelShape.from_config(json.loads(Path(cached).read_text()), str(model))
    raise PlanError(f"cannot find a model config for {model!r}: give a model folder, a config.json, a hub id "
                    f"already in the local Hugging Face cache, or a preset ({', '.join(PRESETS)})")


def _hub_cache_config(repo_id: str) -> str | None:
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return found if isinstance(found, str) else None


# ------------------------------------------------------------------------------------- DeepSpeed

@dataclass(frozen=True)
class DeepSpeedSettings:
    """The parts of a DeepSpeed config that decide memory. None means DeepSpeed's own default;
    "auto" values are resolved as transformers' DeepSpeed integration does (from the hidden size)."""

    zero_stage: int = 3
    dtype: str = "bf16"
    offload_param: str = "none"        # none | cpu | nvme
    offload_optimizer: str = "none"
    micro_batch: int | None = None     # train_micro_batch_size_per_gpu
    optimizer: str = "adamw"
    reduce_bucket_size: float | str | None = None
    prefetch_bucket_size: float | str | None = None
    max_live_parameters: float | str | None = None
    param_persistence_threshold: float | str | None = None
    contiguous_gradients: bool = True
    expert_parallel_size: int = 1      # expert_parallel.autoep_size (AutoEP)
    grad_accum_dtype: str | None = None   # data_types.grad_accum_dtype (None: the model dtype)
    communication_dtype: str | None = None  # communication_data_type (None: the model dtype)
    source: str = "defaults"

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "dict") -> "DeepSpeedSettings":
        zero = cfg.get("zero_optimization") or {}
        dtype = "fp32"
        for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
            if _enabled(cfg.get(key)):
                # "auto" is the trainer's choice: bf16 on GPU, fp32 on CPU (resolved with the device)
                dtype = "auto" if cfg[key].get("enabled") == "auto" else name
                break
        micro = cfg.get("train_micro_batch_size_per_gpu")
        ep = cfg.get("expert_parallel") or {}
        return cls(
            zero_stage=int(zero.get("stage", 0)), dtype=dtype,
            offload_param=_offload_device(zero.get("offload_param")),
            offload_optimizer=_offload_device(zero.get("offload_optimizer")),
            micro_batch=int(micro) if isinstance(micro, (int, float)) else None,
            optimizer=str((cfg.get("optimizer") or {}).get("type", "adamw")).lower(),
            reduce_bucket_size=zero.get("reduce_bucket_size"),
            prefetch_bucket_size=zero.get("stage3_prefetch_bucket_size"),
            max_live_parameters=zero.get("stage3_max_live_parameters"),
            param_persistence_threshold=zero.get("stage3_param_persistence_threshold"),
            contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
            expert_parallel_size=int(ep.get("autoep_size", 1)) if _enabled(ep) else 1,
            grad_accum_dtype=_dtype_name((cfg.get("data_types") or {}).get("grad_accum_dtype")),
            communication_dtype=_dtype_name(cfg.get("communication_data_type")),
            source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> "DeepSpeedSettings":
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"DeepSpeed config {p} does not exist; pass an existing file (ds_configs/z3.json)")
        try:
            return cls.from_dict(json.loads(p.read_text()), str(p))
        except json.JSONDecodeError as err:
            raise PlanError(f"DeepSpeed config {p} is not valid JSON: {err}") from None

    def resolved(self, hidden: int, device: str = "gpu") -> "DeepSpeedSettings":
        """Concrete numbers: DeepSpeed's defaults for absent keys, transformers' rules for "auto"."""
        def pick(value, default, auto):
            return auto if value == "auto" else (default if value is None else float(value))
        dtype = self.dtype if self.dtype != "auto" else ("bf16" if device == "gpu" else "fp32")
        return replace(self, dtype=dtype,
                       reduce_bucket_size=pick(self.reduce_bucket_size, 5e8, hidden * hidden),
                       prefetch_bucket_size=pick(self.prefetch_bucket_size, 5e7, int(0.9 * hidden * hidden)),
                       max_live_parameters=pick(self.max_live_parameters, 1e9, 1e9),
                       param_persistence_threshold=pick(self.param_persistence_threshold, 1e5, 10 * hidden))

    @property
    def bytes_per_element(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def grad_accum_bytes(self) -> int:
        return DTYPE_BYTES[self.grad_accum_dtype or self.dtype]

    @property
    def comm_bytes(self) -> int:
        return DTYPE_BYTES[self.communication_dtype or self.dtype]


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled", False) not in (False, "false", 0)


def _dtype_name(value: Any) -> str | None:
    """DeepSpeed's dtype spellings (fp32, float32, bf16, bfloat16, fp16, float16) -> our names."""
    if value is None:
        return None
    v = str(value).lower().replace("torch.", "")
    names = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
             "fp16": "fp16", "float16": "fp16", "half": "fp16"}
    if v not in names:
        raise PlanError(f"unknown dtype {value!r} in the DeepSpeed config; use fp32, bf16 or fp16")
    return names[v]


def _offload_device(section: Any) -> str:
    if not isinstance(section, dict):
        return "none"
    return str(section.get("device", "none")).lower()


# ------------------------------------------------------------------------------------------ plan

@dataclass(frozen=True)
class MemoryTerm:
    name: str
    bytes: float
    detail: str
    advice: str


@dataclass
class MemoryPlan:
    """Per-GPU memory of one run; `fits` says whether the total stays below (1 - margin) x capacity."""

    model: ModelShape
    world_size: int
    capacity_bytes: float
    margin: float
    terms: list[MemoryTerm]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        return sum(t.bytes for t in self.terms)

    @property
    def usable_bytes(self) -> float:
        return (1.0 - self.margin) * self.capacity_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    @property
    def biggest(self) -> MemoryTerm:
        """The biggest term a setting can change (the fixed runtime overhead is not one)."""
        return max((t for t in self.terms if t.name != "runtime"), key=lambda t: t.bytes)

    def term(self, name: str) -> MemoryTerm:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no term {name!r}; terms are {[t.name for t in self.terms]}")

    def table(self) -> str:
        m, s = self.model, self.settings
        head = (f"DOT-MoE memory plan ({s.get('phase', 'convert')}): {m.name}, "
                f"{_count(m.total_params)} params; {s.get('nodes')} nodes x {s.get('gpus_per_node')} "
                f"= {self.world_size} ranks; {self.capacity_bytes / GiB:.0f} GiB per {s.get('device', 'gpu')}\n"
                f"  {s.get('ds_summary', '')}\n  {s.get('run_summary', '')}")
        width = max(len(t.name) for t in self.terms)
        rows = [f"  {t.name:<{width}}  {t.bytes / GiB:9.2f} GiB  {t.detail}" for t in self.terms]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        foot = (f"  {'total':<{width}}  {self.total_bytes / GiB:9.2f} GiB  of {self.usable_bytes / GiB:.1f} GiB usable "
                f"({self.capacity_bytes / GiB:.0f} GiB less {self.margin:.0%} margin): {verdict}")
        return "\n".join([head, *rows, foot])

    def refusal(self) -> str:
        """Why the plan does not fit and what to change (empty when it fits)."""
        if self.fits:
            return ""
        b = self.biggest
        return (f"the plan needs {self.total_bytes / GiB:.1f} GiB per GPU but only {self.usable_bytes / GiB:.1f} GiB "
                f"are usable; the biggest term is '{b.name}' ({b.bytes / GiB:.1f} GiB): {b.advice}")


def plan_memory(model: str | dict | ModelShape, *, nodes: int, gpus_per_node: int, gpu_memory_gb: float,
                ds_config: str | Path | dict | DeepSpeedSettings | None = None, num_experts: int = 8,
                top_k: int = 2, shared_neurons: int = 0, seq_len: int = 4096, micro_batch: int | None = None,
                activation_checkpointing: bool = True, distillation: bool = False,
                trainable: str = "assignment", phase: str = "convert", margin: float = 0.1,
                runtime_gb: float | None = None, device: str = "gpu", teacher: str = "trained",
                recon: bool = False) -> MemoryPlan:
    """Per-GPU memory of a DOT-MoE conversion ('convert') or of an exported MoE's recovery training
    ('recover', expert-parallel). `gpu_memory_gb` is GiB per rank; `trainable` is 'assignment'
    (scores + router, the default), 'ffn' (also the FFN weights) or 'all'; `teacher` is the trainer's
    --teacher ('original' keeps a frozen FFN copy while the FFN weights train); `recon` is a
    conversion with the reconstruction term (--recon_weight > 0, as in the dot50 recipe). Raises
    PlanError for input it cannot use (including an impossible MoE budget)."""
    if teacher not in TEACHERS:
        raise PlanError(f"teacher must be one of {', '.join(TEACHERS)}, got {teacher!r}")
    shape = load_model_shape(model)
    _check_args(nodes, gpus_per_node, gpu_memory_gb, seq_len, micro_batch, trainable, phase, margin, device)
    ds = _settings(ds_config).resolved(shape.hidden, device)
    if phase == "convert":
        if shape.is_moe:
            raise PlanError(f"{shape.name} is already an MoE ({shape.model_type}); the conversion needs a dense "
                            "model (use phase='recover' to plan recovery training of an exported MoE)")
        try:
            spec = MoESpec.uniform(shape.intermediate, num_experts, top_k, shared_neurons)
        except SpecError as err:
            raise PlanError(str(err)) from None
        columns = spec.num_columns
    else:
        if not shape.is_moe:
            raise PlanError(f"{shape.name} is a dense model; recovery training needs the exported MoE folder")
        columns, num_experts, top_k = 0, shape.experts, shape.experts_per_token
        if trainable == "assignment":
            trainable = "all"   # there is no assignment left to learn after export
        recon = False           # nor a dense output to reconstruct
    world = nodes * gpus_per_node
    mb = micro_batch or ds.micro_batch or 1
    tokens = mb * seq_len
    a = ds.bytes_per_element
    d, f, V, L = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    ep = ds.expert_parallel_size if phase == "recover" else 1
    if phase == "recover" and (world % ep or num_experts % ep):
        raise PlanError(f"expert_parallel.autoep_size={ep} must divide both the world size ({world}) and the "
                        f"number of experts ({num_experts}); change autoep_size in the DeepSpeed config or the "
                        "number of nodes/GPUs")

    # --- parameters: dense model weights and DOT-MoE's own
    z3 = ds.zero_stage == 3
    persist = ds.param_persistence_threshold if z3 else float("inf")
    layer_tensors = shape.layer_tensors()
    other_tensors = [(shape.embedding_params, 1 if shape.tied_embeddings else 2), (d, 1)]
    dot_tensors = [(f * columns, 1), (num_experts * d, 1)] if columns else []   # scores, router
    # the frozen original FFN (reference.py): kept when a conversion trains the FFN weights
    reference_tensors = [(d * f, 3)] if columns and trainable != "assignment" and teacher == "original" else []

    def resident(tensors, layers, dtype_bytes):
        """Bytes one rank holds of these parameter tensors (ZeRO-3 shards all but small ones)."""
        total = 0.0
        for numel, count in tensors:
            sharded = z3 and numel >= persist
            total += layers * count * numel * dtype_bytes / (world if sharded else 1)
        return total

    def on_device(tensors, layers, dtype_bytes):
        """`resident`, less what ZeRO-3's parameter offload keeps in CPU memory: all but the persistent
        (small, unsharded) tensors."""
        if z3 and ds.offload_param != "none":
            tensors = [(n, c) for n, c in tensors if n < persist]
        return resident(tensors, layers, dtype_bytes)

    weights = on_device(layer_tensors, L, a) + on_device(other_tensors, 1, a)
    dot_params = resident(dot_tensors[:1], L, 4) + resident(dot_tensors[1:], L, a) if columns else 0.0
    reference = on_device(reference_tensors, L, a)

    terms: list[MemoryTerm] = []
    more_gpus = ("use more GPUs (nodes), ZeRO-3, or offload the parameters to CPU "
                 "(ds_configs/z3_offload.json)")
    off = " (offloaded)" if z3 and ds.offload_param != "none" else ""
    terms.append(MemoryTerm("model weights", weights,
                            f"{_count(shape.total_params)} x {a} B" + (f" / {world} (ZeRO-3){off}" if z3 else ""),
                            more_gpus))
    if columns:
        terms.append(MemoryTerm("DOT-MoE scores + router", dot_params,
                                f"{L} x ([{f}, {columns}] fp32 + [{num_experts}, {d}])" + (f" / {world}" if z3 else ""),
                                "use fewer experts"))
    if reference_tensors:
        terms.append(MemoryTerm("frozen FFN copy (teacher)", reference,
                                f"{L} x 3 x [{f}, {d}] x {a} B" + (f" / {world}" if z3 else "") + off,
                                "pass --teacher trained (the teacher then drifts with the trained FFN "
                                "weights), use more GPUs, or offload the parameters"))

    # --- ZeRO-3 working set of gathered parameters
    if z3:
        unit = shape.layer_params + sum(n * c for n, c in dot_tensors + reference_tensors)
        if phase == "recover":
            unit = shape.layer_params - shape.expert_params_per_layer * (1 - 1 / ep)
        unit = max(unit, shape.embedding_params)
        # never more than the whole model (the bound matters for small models only)
        live = min(max(unit, ds.max_live_parameters) + ds.prefetch_bucket_size, shape.total_params)
        terms.append(MemoryTerm("gathered params (ZeRO-3)", live * a,
                                f"max(largest module {_count(unit)}, max_live {_count(ds.max_live_parameters)})"
                                f" + prefetch {_count(ds.prefetch_bucket_size)}, at most the model",
                                "lower stage3_max_live_parameters and stage3_prefetch_bucket_size in the "
                                "DeepSpeed config"))

    # --- trainable parameters: gradients, reduce buckets, optimiser state
    n_trainable = _trainable_params(shape, trainable, columns, num_experts)
    grad_shard = world if ds.zero_stage >= 2 else 1
    opt_shard = world if ds.zero_stage >= 1 else 1
    grads = n_trainable * ds.grad_accum_bytes / grad_shard
    if ds.zero_stage >= 1 and ds.offload_optimizer == "none":
        grads += 4 * n_trainable / opt_shard     # the fp32 copy the optimiser step works on
    terms.append(MemoryTerm("gradients", grads,
                            f"{_count(n_trainable)} trainable ({trainable}) x ({ds.grad_accum_bytes} + 4) B"
                            + (f" / {grad_shard}" if grad_shard > 1 else ""),
                            "train fewer parameters (--trainable assignment) or use more GPUs"))
    if z3 and ds.contiguous_gradients:
        # allocated whole at start (stage3.py), in the communication dtype
        terms.append(MemoryTerm("gradient reduce bucket", ds.reduce_bucket_size * ds.comm_bytes,
                                f"reduce_bucket_size {ds.reduce_bucket_size / 1e6:.0f}M x {ds.comm_bytes} B",
                                "lower reduce_bucket_size in the DeepSpeed config"))
    state_bytes = _optimizer_bytes(ds.optimizer) + (4 if a < 4 or ds.zero_stage >= 1 else 0)
    opt = 0.0 if ds.offload_optimizer != "none" else n_trainable * state_bytes / opt_shard
    terms.append(MemoryTerm("optimizer state", opt,
                            f"{state_bytes} B x {_count(n_trainable)}" + (f" / {opt_shard}" if opt_shard > 1 else "")
                            + (" (offloaded)" if ds.offload_optimizer != "none" else ""),
                            "offload the optimizer (offload_optimizer in the DeepSpeed config), train fewer "
                            "parameters, or use more GPUs"))

    # --- activations
    per_layer = layer_activation_bytes(shape, tokens, a, trainable=trainable, columns=columns,
                                       experts=num_experts, top_k=top_k, recon=recon)
    act_advice = ("turn on activation checkpointing, or " if not activation_checkpointing else "") + (
        f"lower the sequence length (now {seq_len}) or the micro batch (now {mb})")
    if activation_checkpointing:
        stored = L * a * tokens * d
        terms.append(MemoryTerm("activations (checkpointed)", stored,
                                f"{L} layer inputs of {tokens} tokens x {d} x {a} B", act_advice))
        work = per_layer
        work_detail = f"one layer recomputed ({per_layer / GiB:.2f} GiB) + "
    else:
        stored = L * per_layer
        terms.append(MemoryTerm("activations (stored)", stored,
                                f"{L} layers x {per_layer / GiB:.3f} GiB (no checkpointing)", act_advice))
        work, work_detail = 0.0, ""
    f_active = f if phase == "convert" else top_k * f + shape.shared_intermediate
    transients = (4 * tokens * f if columns else 0) + 3 * a * tokens * f_active + 2 * a * tokens * d
    terms.append(MemoryTerm("layer working set", work + transients,
                            work_detail + "fp32 mask and activation gradients of one layer", act_advice))
    terms.append(MemoryTerm("logits + loss", (a + 12) * tokens * V,
                            f"({a} + 12) B x {tokens} tokens x {V} vocab",
                            f"lower the sequence length (now {seq_len}) or the micro batch (now {mb}): "
                            "logits cost (a + 12) bytes per token and vocabulary entry"))
    if distillation:
        terms.append(MemoryTerm("teacher logits (distillation)", (a + 8) * tokens * V,
                                f"({a} + 8) B x {tokens} x {V}",
                                "turn off distillation, or lower the sequence length or micro batch"))
    if columns:   # one layer at a time; the plan kept for backward is part of the activations
        terms.append(MemoryTerm("Sinkhorn working set", 4 * 4 * f * columns,
                                f"kernel, potentials, plan and its gradient: 4 x [{f}, {columns}] fp32",
                                "use fewer experts"))
    runtime = runtime_gb if runtime_gb is not None else (2.0 if device == "gpu" else 1.0)
    terms.append(MemoryTerm("runtime", runtime * GiB,
                            "CUDA context, NCCL, allocator slack" if device == "gpu" else "Python, torch, DeepSpeed",
                            "nothing to change here; the other terms must make room"))

    ds_summary = (f"DeepSpeed: ZeRO-{ds.zero_stage}, {ds.dtype}, {ds.optimizer}, offload param={ds.offload_param} "
                  f"optimizer={ds.offload_optimizer}" + (f", expert parallel {ep}" if ep > 1 else "")
                  + f" [{ds.source}]")
    run_summary = (f"run: E={num_experts} k={top_k}" + (f" shared={shared_neurons}" if shared_neurons else "")
                   + f", seq_len={seq_len} micro_batch={mb}, activation checkpointing "
                   + ("on" if activation_checkpointing else "off")
                   + (", distillation" if distillation else "")
                   + (", reconstruction term" if recon else "") + f", trainable={trainable}")
    return MemoryPlan(model=shape, world_size=world, capacity_bytes=gpu_memory_gb * GiB, margin=margin,
                      terms=terms, settings=dict(phase=phase, nodes=nodes, gpus_per_node=gpus_per_node,
                                                 device=device, ds_summary=ds_summary, run_summary=run_summary,
                                                 tokens=tokens, micro_batch=mb))


def layer_activation_bytes(shape: ModelShape, tokens: int, a: int, *, trainable: str = "assignment",
                           columns: int = 0, experts: int = 8, top_k: int = 2, recon: bool = False) -> float:
    """Bytes autograd keeps for backward in one decoder layer (Llama-style, SDPA attention).

    Counted tensor by tensor (t tokens): each RMSNorm keeps its fp32 input and rsqrt (4td + 4t);
    attention keeps q, k, v, its output (a x t x (2 q + 2 kv) width) and the fp32 log-sum-exp (4th);
    the SwiGLU keeps gate, act(gate), up (3 a t f); DOT-MoE adds h and the mask (2 a t f), the
    router's input (a t d), small [t, E] routing tensors and the plan/assignment [f, E'].
    Trainable linear layers also keep their input; frozen ones keep nothing of it. The reconstruction
    term (`recon`, DOT-MoE only) keeps the fp32 difference to the dense output and each token's
    denominator (4td + 4t); its target is computed without gradient.
    """
    t, d = tokens, shape.hidden
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * (4 * t * d + 4 * t)
    attention = a * t * (2 * q + 2 * kv) + 4 * t * shape.heads
    if shape.is_moe:   # recovery training of an exported MoE: top_k experts per token (+ shared)
        k, fe, E = shape.experts_per_token, shape.intermediate, shape.experts
        f_act = k * fe + shape.shared_intermediate
        mlp = 3 * a * t * f_act + a * t * d + 20 * t * E + 12 * t * k + 8 * t + 4 * E   # + router input
        if trainable in ("ffn", "all"):
            mlp += a * t * f_act + a * k * t * d                                  # down input, expert inputs
    else:
        f = shape.intermediate
        mlp = 3 * a * t * f
        if columns:
            mlp += (2 * a * t * f + a * t * d + 20 * t * experts + 12 * t * top_k + 8 * t + 4 * experts
                    + 2 * 4 * f * columns)
            if recon:
                mlp += 4 * t * d + 4 * t
        if trainable in ("ffn", "all"):
            mlp += a * t * f + (0 if columns else a * t * d)                       # down input (+ gate/up input)
    if trainable == "all":   # trainable norm weights keep their normalised input, q/k/v and o_proj theirs
        attention += 3 * a * t * d
    return float(norms + attention + mlp)


def _trainable_params(shape: ModelShape, trainable: str, columns: int, experts: int) -> int:
    """How many parameters the run trains: scores + router, plus the FFN weights, or everything."""
    L, d = shape.layers, shape.hidden
    dot = L * (shape.intermediate * columns + experts * d) if columns else 0
    if trainable == "ffn":
        return dot + L * (shape.expert_params_per_layer if shape.is_moe else 3 * shape.intermediate * d)
    if trainable == "all":
        return dot + shape.total_params
    return dot


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n)}"


def _optimizer_bytes(name: str) -> int:
    if "adam" in name or "lamb" in name:
        return 8          # m and v, fp32
    if "lion" in name or "sgd" in name and "momentum" in name:
        return 4
    return 0 if "sgd" in name else 8


def _settings(ds_config) -> DeepSpeedSettings:
    if ds_config is None:
        return DeepSpeedSettings()
    if isinstance(ds_config, DeepSpeedSettings):
        return ds_config
    if isinstance(ds_config, dict):
        return DeepSpeedSettings.from_dict(ds_config)
    return DeepSpeedSettings.from_json(ds_config)


def _check_args(nodes, gpus_per_node, gpu_memory_gb, seq_len, micro_batch, trainable, phase, margin, device):
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch < 1):
        raise PlanError(f"micro_batch must be a positive integer, got {micro_batch!r}")
    if not gpu_memory_gb > 0:
        raise PlanError(f"gpu_memory_gb must be positive, got {gpu_memory_gb!r}")
    if trainable not in TRAINABLE:
        raise PlanError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if phase not in PHASES:
        raise PlanError(f"phase must be one of {PHASES}, got {phase!r}")
    if not 0 <= margin < 1:
        raise PlanError(f"margin must be in [0, 1), got {margin!r}")
    if device not in ("gpu", "cpu"):
        raise PlanError(f"device must be 'gpu' or 'cpu', got {device!r}")


# ------------------------------------------------------------------------------------------- CLI

def main(model: str = "llama-3-70b", nodes: int = 8, gpus_per_node: int = 8, gpu_memory_gb: float = 80,
         ds_config: str | None = None, num_experts: int = 8, top_k: int = 2, shared_neurons: int = 0,
         seq_len: int = 4096, micro_batch: int | None = None, activation_checkpointing: bool = True,
         distillation: bool = False, trainable: str = "assignment", phase: str = "convert",
         margin: float = 0.1, runtime_gb: float | None = None, device: str = "gpu",
         teacher: str = "trained", recon: bool = False, list_presets: bool = False) -> int:
    """Print the per-GPU memory plan; exit 0 if it fits, 3 if not, 2 on bad input."""
    if list_presets:
        for name, cfg in PRESETS.items():
            print(f"{name:14s} {ModelShape.from_config(cfg, name).total_params / 1e9:7.2f}B  "
                  f"aliases: {', '.join(k for k, v in ALIASES.items() if v == name)}")
        return EXIT_FITS
    try:
        plan = plan_memory(model, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gb=gpu_memory_gb,
                           ds_config=ds_config, num_experts=num_experts, top_k=top_k,
                           shared_neurons=shared_neurons, seq_len=seq_len, micro_batch=micro_batch,
                           activation_checkpointing=activation_checkpointing, distillation=distillation,
                           trainable=trainable, phase=phase, margin=margin, runtime_gb=runtime_gb,
                           device=device, teacher=teacher, recon=recon)
    except PlanError as err:
        print(f"plan_memory: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(plan.table())
    if not plan.fits:
        print(f"plan_memory: refusing to start: {plan.refusal()}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS


def cli(argv: list[str] | None = None) -> int:
    """The command line (`python tools/plan_memory.py ...`, `dotmoe plan ...`): flags parsed by fire,
    returns the exit status instead of printing it."""
    import fire

    status = {"code": EXIT_FITS}

    @functools.wraps(main)
    def run(*args, **kwargs) -> None:
        status["code"] = main(*args, **kwargs)

    try:
        fire.Fire(run, command=list(sys.argv[1:] if argv is None else argv), name="plan_memory")
    except fire.core.FireExit as done:      # --help, or flags fire could not parse
        return int(done.code or 0)
    return status["code"]


if __name__ == "__main__":
    sys.exit(cli())
