"""Model-family knowledge, and only here: where the MLPs are, and what MoE architecture they export to.

Each supported dense family has one adapter (METHOD.md section 6):

    llama, mistral  ->  Mixtral    (MixtralForCausalLM)
                        with a shared expert: Qwen2-MoE (Qwen2MoeForCausalLM, zero q/k/v biases)
    qwen2           ->  Qwen2-MoE  (Qwen2MoeForCausalLM, shared expert supported)
    qwen3           ->  Qwen3-MoE  (Qwen3MoeForCausalLM)
                        with a shared expert: Qwen3-Next (Qwen3NextForCausalLM, full attention only)
    olmo2           ->  FlexOlmo   (FlexOlmoForCausalLM, no shared expert: no exact target)

A family whose usual target has no shared expert may name a second adapter for conversions that
have one (`shared_expert_adapter`); `for_spec(spec)` picks the adapter that exports a budget.

An adapter knows the dense model_types it accepts, how to reach each decoder layer's MLP and its
SwiGLU parts, how to build the target's config from the dense config and a `MoESpec`, and the
target's on-disk tensor names for one MoE block. Adding a family means adding one adapter class
and one entry in `ADAPTERS`; nothing else in the package looks at `model_type`.

On-disk format. transformers v5 keeps MoE experts as fused 3D tensors in memory but reads the
per-expert layout that the hub checkpoints, vLLM and transformers v4 use, converting it at load
(`transformers/conversion_mapping.py`). We write that per-expert layout:
  Mixtral:            block_sparse_moe.gate.weight [E, d], block_sparse_moe.experts.{e}.w1 (gate),
                      .w3 (up) [c, d], .w2 (down) [d, c]
  Qwen2/3-MoE, FlexOlmo: mlp.gate.weight [E, d], mlp.experts.{e}.{gate,up,down}_proj.weight;
  Qwen2-MoE also:     mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight [1, d]

Routing in all four targets is softmax (fp32) -> top-k -> renormalise (Mixtral always; the others
when norm_topk_prob=True, which we set), then sum_e w_e * expert_e(x). DOT-MoE's gate is k * w_e,
so k is folded into each exported down projection (`ExpertWeights.down` already carries it).
Qwen2-MoE adds sigmoid(shared_expert_gate(x)) * shared_expert(x); a zero gate weight gives exactly
0.5, so the shared down projection is exported times 2 (both factors are exact in binary floats).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from .layer import ExpertWeights
from .spec import MoESpec


class FamilyError(ValueError):
    """A model or budget this family's export cannot represent exactly; the message says what to do."""


# transformers v5 runs experts with torch grouped_mm by default, which needs every stride to be a
# multiple of 16 bytes ("strides should be multiple of 16 bytes" otherwise): 8 neurons cover bf16/fp16.
EXPERT_SIZE_MULTIPLE = 8

MakeFFN = Callable[[int, nn.Linear, nn.Linear, nn.Linear, Callable[[Tensor], Tensor]], nn.Module]

# Dense-config keys that describe only the dense MLP (replaced by the MoE fields) or bookkeeping.
_MLP_KEYS = frozenset({"intermediate_size", "mlp_bias"})
_META_KEYS = frozenset({"model_type", "architectures", "transformers_version", "_name_or_path", "dtype",
                        "torch_dtype", "auto_map", "_attn_implementation_autoset", "id2label", "label2id",
                        "problem_type", "output_attentions", "output_hidden_states", "return_dict",
                        "chunk_size_feed_forward", "is_encoder_decoder", "use_cache"})


@dataclass(frozen=True)
class MoETensorLayout:
    """On-disk names of one layer's MoE block; `{i}` is the layer index, `{e}` the expert index."""

    router: str
    expert_gate: str
    expert_up: str
    expert_down: str
    shared_gate: str | None = None
    shared_up: str | None = None
    shared_down: str | None = None
    shared_expert_gate: str | None = None


_QWEN_LAYOUT = MoETensorLayout(
    router="model.layers.{i}.mlp.gate.weight",
    expert_gate="model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    expert_up="model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    expert_down="model.layers.{i}.mlp.experts.{e}.down_proj.weight",
)


@dataclass(frozen=True)
class FamilyAdapter:
    """Base adapter: a dense HF decoder whose layers live at `model.layers[i].mlp`.

    Subclasses set the class attributes and override `_moe_fields` (the target's MoE config
    fields) and, where a dense setting has no exact counterpart, `_check_dense_config`.
    """

    name: ClassVar[str]
    dense_model_types: ClassVar[tuple[str, ...]]
    target_model_type: ClassVar[str]
    target_architecture: ClassVar[str]
    layout: ClassVar[MoETensorLayout]
    supports_shared_expert: ClassVar[bool] = False
    # The adapter that exports this family's conversions with a shared expert, when the usual
    # target has none (e.g. Llama -> Qwen2-MoE); None: `supports_shared_expert` says it all.
    shared_expert_adapter: ClassVar["FamilyAdapter | None"] = None
    # Factor on the exported shared down projection so the target's shared gate multiplies it by 1.
    shared_down_scale: ClassVar[float] = 1.0
    # Dense-config keys the target does not have, with the value that makes them a no-op there.
    neutral_dense_keys: ClassVar[dict] = {}
    # Dense-config keys that transformers' dense modelling code does not read at all.
    ignored_dense_keys: ClassVar[frozenset[str]] = frozenset()
    # Target-config keys that its modelling code reads although they are not declared fields.
    extra_target_keys: ClassVar[frozenset[str]] = frozenset()
    layers_path: ClassVar[str] = "model.layers"
    # The dense config's FFN width field (every supported family names it so).
    intermediate_size_key: ClassVar[str] = "intermediate_size"

    # ------------------------------------------------------------------ model structure
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a dense (or converted) model, in order."""
        obj = model
        for part in self.layers_path.split("."):
            if not hasattr(obj, part):
                raise FamilyError(f"{type(model).__name__} has no '{self.layers_path}': is it a "
                                  f"{self.name} causal LM (e.g. from AutoModelForCausalLM)?")
            obj = getattr(obj, part)
        return obj

    def layer_prefix(self, layer_idx: int) -> str:
        """The state-dict prefix of decoder layer `layer_idx`, e.g. 'model.layers.3.'."""
        return f"{self.layers_path}.{layer_idx}."

    def dense_mlp_tensor_names(self, layer_idx: int) -> tuple[str, str, str]:
        """On-disk (gate, up, down) weight names of layer `layer_idx`'s dense MLP."""
        prefix = self.layer_prefix(layer_idx)
        return (f"{prefix}mlp.gate_proj.weight", f"{prefix}mlp.up_proj.weight", f"{prefix}mlp.down_proj.weight")

    def pruned_config(self, config: PretrainedConfig, intermediate_size: int) -> PretrainedConfig:
        """The dense config with a narrower FFN (the prune baseline's export), all else unchanged."""
        self.check_dense_config(config)
        if not 1 <= intermediate_size <= getattr(config, self.intermediate_size_key):
            raise FamilyError(f"a pruned FFN keeps between 1 and {getattr(config, self.intermediate_size_key)} "
                              f"neurons, not {intermediate_size}")
        out = copy.deepcopy(config)
        setattr(out, self.intermediate_size_key, int(intermediate_size))
        return out

    def mlps(self, model: nn.Module) -> list[nn.Module]:
        return [layer.mlp for layer in self.layers(model)]

    def mlp_parts(self, mlp: nn.Module, layer_idx: int | None = None
                  ) -> tuple[nn.Linear, nn.Linear, nn.Linear, Callable[[Tensor], Tensor]]:
        """(gate_proj, up_proj, down_proj, act_fn) of a SwiGLU MLP; a clear error for anything else."""
        where = f"layer {layer_idx}'s MLP" if layer_idx is not None else "the MLP"
        parts = []
        for attr in ("gate_proj", "up_proj", "down_proj"):
            mod = getattr(mlp, attr, None)
            if not isinstance(mod, nn.Linear):
                raise FamilyError(
                    f"{where} ({type(mlp).__name__}) is not a SwiGLU MLP: DOT-MoE needs gate_proj, up_proj "
                    f"and down_proj linear layers, and {attr} is {type(mod).__name__ if mod is not None else 'missing'}")
            if mod.bias is not None:
                raise FamilyError(
                    f"{where} has a bias on {attr} (mlp_bias=True): {self.target_architecture} experts have "
                    "no biases, so this model cannot be exported exactly; use a model without MLP biases")
            parts.append(mod)
        act_fn = getattr(mlp, "act_fn", None)
        if not callable(act_fn):
            raise FamilyError(f"{where} ({type(mlp).__name__}) has no act_fn: not a SwiGLU MLP")
        return parts[0], parts[1], parts[2], act_fn

    def swap_in(self, model: nn.Module, make_ffn: MakeFFN) -> list[nn.Module]:
        """Replace every layer's `mlp` with `make_ffn(layer_idx, gate_proj, up_proj, down_proj, act_fn)`.

        All MLPs are checked before the first is replaced, so a refusal leaves the model untouched.
        Returns the new modules in layer order.
        """
        layers = self.layers(model)
        parts = [self.mlp_parts(layer.mlp, i) for i, layer in enumerate(layers)]
        new = []
        for i, (layer, (gate, up, down, act)) in enumerate(zip(layers, parts)):
            layer.mlp = make_ffn(i, gate, up, down, act)
            new.append(layer.mlp)
        return new

    # ------------------------------------------------------------------ checks
    @property
    def carries_shared_expert(self) -> bool:
        """Whether some export target of this family holds a shared expert exactly."""
        return self.supports_shared_expert or self.shared_expert_adapter is not None

    def for_spec(self, spec: MoESpec) -> "FamilyAdapter":
        """The adapter that exports `spec`: this one, or the family's shared-expert target."""
        if spec.has_shared and not self.supports_shared_expert and self.shared_expert_adapter is not None:
            return self.shared_expert_adapter
        return self

    def check_spec(self, spec: MoESpec) -> None:
        if spec.has_shared and not self.supports_shared_expert:
            with_shared = [a.name for a in ADAPTERS if a.carries_shared_expert]
            raise FamilyError(
                f"a shared expert ({spec.shared} neurons) cannot be exported for {self.name}: its target "
                f"{self.target_architecture} has no shared expert, and no standard architecture was found "
                f"that carries one exactly with this family's attention (see README, 'Shared experts by "
                f"family'). Set --shared_neurons 0; shared experts are supported for: {', '.join(with_shared)}")

    def check_dense_config(self, config: PretrainedConfig) -> None:
        """Refuse dense settings the target cannot reproduce exactly (before any work is done)."""
        if config.model_type not in self.dense_model_types:
            raise FamilyError(f"the {self.name} adapter handles model_type {self.dense_model_types}, "
                              f"not {config.model_type!r}")
        if getattr(config, "mlp_bias", False):
            raise FamilyError(f"{config.model_type} with mlp_bias=True cannot be exported: "
                              f"{self.target_architecture} experts have no biases")

    def validate(self, config: PretrainedConfig, spec: MoESpec) -> None:
        """Every check that needs no weights: call it before loading or training."""
        if self.for_spec(spec) is not self:
            return self.for_spec(spec).validate(config, spec)
        self.check_dense_config(config)
        self.check_spec(spec)
        d_ff = config.intermediate_size
        if spec.d_ff != d_ff:
            raise FamilyError(f"the MoE budget is for d_ff={spec.d_ff} but the model's intermediate_size "
                              f"is {d_ff}; build the MoESpec from the model config")
        self.target_config(config, spec)

    # ------------------------------------------------------------------ target config
    def expert_intermediate_size(self, spec: MoESpec, multiple: int = EXPERT_SIZE_MULTIPLE) -> int:
        """The one intermediate size every exported expert has: the largest capacity rounded up to
        `multiple`; smaller experts are zero-padded (exact)."""
        if multiple < 1:
            raise FamilyError(f"the expert size multiple must be >= 1, got {multiple}")
        return -(-spec.max_capacity // multiple) * multiple

    def _moe_fields(self, config: PretrainedConfig, spec: MoESpec, expert_size: int,
                    router_aux_loss_coef: float) -> dict:
        raise NotImplementedError

    def _equivalent(self, key: str, dense_value, target_value, config: PretrainedConfig) -> bool:
        return dense_value == target_value

    def _dense_settings(self, config: PretrainedConfig) -> dict:
        """The dense config's settings that the target must reproduce (after `check_dense_config`)."""
        skip = _MLP_KEYS | _META_KEYS | self.ignored_dense_keys
        return {k: v for k, v in config.to_dict().items() if k not in skip}

    def target_config(self, config: PretrainedConfig, spec: MoESpec, *, expert_size: int | None = None,
                      router_aux_loss_coef: float = 0.001, dtype: torch.dtype | None = None
                      ) -> PretrainedConfig:
        """The export's config: the dense config's attention, RoPE, norm, embedding and token settings
        carried over unchanged, plus the MoE fields. A declared dense setting that the target has no
        field for is an error unless it has its neutral value (e.g. attention_bias=False for Mixtral)."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if self.for_spec(spec) is not self:
            return self.for_spec(spec).target_config(config, spec, expert_size=expert_size,
                                                     router_aux_loss_coef=router_aux_loss_coef, dtype=dtype)
        self.check_dense_config(config)
        self.check_spec(spec)
        target_cls = CONFIG_MAPPING[self.target_model_type]
        target_keys = {f.name for f in dataclasses.fields(target_cls)} | self.extra_target_keys
        dense_keys = {f.name for f in dataclasses.fields(type(config))}
        carried = {}
        for key, value in self._dense_settings(config).items():
            # Keys the dense config class does not declare (e.g. SmolLM2's is_llama_config) are
            # extras its model code does not use; they travel along verbatim.
            if key in target_keys or key not in dense_keys:
                carried[key] = value
            elif key in self.neutral_dense_keys:
                if value != self.neutral_dense_keys[key]:
                    raise FamilyError(
                        f"{config.model_type} with {key}={value!r} cannot be exported exactly: "
                        f"{self.target_architecture} has no {key} setting (only {key}="
                        f"{self.neutral_dense_keys[key]!r} is supported)")
            else:
                raise FamilyError(
                    f"dense config setting {key}={value!r} has no counterpart in {self.target_architecture}; "
                    f"teach the {self.name} adapter in dotmoe_ds/families.py whether it matters")
        if expert_size is None:
            expert_size = self.expert_intermediate_size(spec)
        if expert_size < spec.max_capacity:
            raise FamilyError(f"expert_size={expert_size} is smaller than the largest expert ({spec.max_capacity})")
        moe = self._moe_fields(config, spec, expert_size, router_aux_loss_coef)
        kwargs = {**carried, **moe, "architectures": [self.target_architecture]}
        if dtype is not None:
            kwargs["dtype"] = dtype
        target = target_cls(**kwargs)
        for key, value in carried.items():
            if not self._equivalent(key, value, getattr(target, key, None), config):
                raise FamilyError(
                    f"{self.target_architecture} changed {key} from {value!r} to {getattr(target, key, None)!r}; "
                    f"the export would not be exact")
        self._check_target(config, target)
        return target

    def _check_target(self, config: PretrainedConfig, target: PretrainedConfig) -> None:
        """Family-specific checks of the built target config (settings it derives, not carries)."""

    # ------------------------------------------------------------------ on-disk tensors
    def moe_tensor_shapes(self, layer_idx: int, spec: MoESpec, hidden_size: int, expert_size: int
                          ) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor `moe_tensors` yields for this layer, in the same order."""
        L, C, d, i = self.layout, expert_size, hidden_size, layer_idx
        out = [(L.router.format(i=i), (spec.num_experts, d))]
        for e in range(spec.num_experts):
            out += [(L.expert_gate.format(i=i, e=e), (C, d)), (L.expert_up.format(i=i, e=e), (C, d)),
                    (L.expert_down.format(i=i, e=e), (d, C))]
        out += [(name, shape) for name, shape in self._shared_shapes(i, spec, d)]
        return out

    def _shared_shapes(self, i: int, spec: MoESpec, d: int) -> list[tuple[str, tuple[int, ...]]]:
        return []

    def moe_tensors(self, layer_idx: int, weights: ExpertWeights, expert_size: int
                    ) -> Iterator[tuple[str, Tensor]]:
        """The target's tensors for one layer, in `moe_tensor_shapes` order. Experts smaller than the
        common intermediate size get zero rows in gate/up and zero columns in down: silu(0) * 0 = 0,
        so padding neurons contribute exactly nothing."""
        spec, L, i, C = weights.spec, self.layout, layer_idx, expert_size
        yield L.router.format(i=i), weights.router
        for e in range(spec.num_experts):
            yield L.expert_gate.format(i=i, e=e), _pad_rows(weights.gate[e], C)
            yield L.expert_up.format(i=i, e=e), _pad_rows(weights.up[e], C)
            yield L.expert_down.format(i=i, e=e), _pad_rows(weights.down[e].T, C).T
        yield from self._shared_tensors(i, weights)

    def _shared_tensors(self, i: int, weights: ExpertWeights) -> Iterator[tuple[str, Tensor]]:
        return iter(())

    def added_layer_tensors(self, layer_idx: int, config: PretrainedConfig, dtype: torch.dtype
                            ) -> list[tuple[str, Tensor]]:
        """Tensors the target needs in decoder layer `layer_idx` that the dense model lacks (written
        after the layer's own non-MLP tensors); none by default."""
        return []

    def target_tensor(self, name: str, tensor: Tensor, config: PretrainedConfig) -> Tensor:
        """The target's value of the carried (non-MLP) dense tensor `name`; unchanged by default."""
        return tensor

    def target_tensor_shape(self, name: str, shape: tuple[int, ...], config: PretrainedConfig) -> tuple[int, ...]:
        """The shape `target_tensor` gives the dense tensor `name` of shape `shape`."""
        return shape

    def dense_to_target_name(self, name: str) -> str:
        """On-disk name in the target of a non-MLP dense tensor (attention, norms, embeddings)."""
        return name

    def describe(self) -> str:
        out = f"{'/'.join(self.dense_model_types)} -> {self.target_model_type} ({self.target_architecture})"
        if self.shared_expert_adapter is not None:
            out += f", with a shared expert -> {self.shared_expert_adapter.target_architecture}"
        return out


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


# ---------------------------------------------------------------------- families

@dataclass(frozen=True)
class Qwen2MoeTarget(FamilyAdapter):
    """Export to Qwen2-MoE, the standard architecture with a shared expert.

    Without a shared expert we export shared_expert_intermediate_size=0: transformers builds empty
    (zero-element) shared-expert linears, which its load report lists as MISSING although there is
    nothing to load, and vLLM/SGLang build no shared expert at that size, so we store no tensors for
    it (a loader without a matching parameter could reject them). The shared gate is still written
    (zeros): both always build it.
    """

    target_model_type: ClassVar[str] = "qwen2_moe"
    target_architecture: ClassVar[str] = "Qwen2MoeForCausalLM"
    layout: ClassVar[MoETensorLayout] = dataclasses.replace(
        _QWEN_LAYOUT,
        shared_gate="model.layers.{i}.mlp.shared_expert.gate_proj.weight",
        shared_up="model.layers.{i}.mlp.shared_expert.up_proj.weight",
        shared_down="model.layers.{i}.mlp.shared_expert.down_proj.weight",
        shared_expert_gate="model.layers.{i}.mlp.shared_expert_gate.weight")
    supports_shared_expert: ClassVar[bool] = True
    shared_down_scale: ClassVar[float] = 2.0   # sigmoid(0) = 0.5 exactly

    def _moe_fields(self, config, spec, expert_size, router_aux_loss_coef):
        return dict(intermediate_size=config.intermediate_size,   # unused: every layer is sparse
                    moe_intermediate_size=expert_size,
                    shared_expert_intermediate_size=spec.shared, num_experts=spec.num_experts,
                    num_experts_per_tok=spec.top_k, norm_topk_prob=True, decoder_sparse_step=1,
                    mlp_only_layers=[], router_aux_loss_coef=router_aux_loss_coef,
                    output_router_logits=False, qkv_bias=True)   # Qwen2's q/k/v always have biases

    def _shared_shapes(self, i, spec, d):
        L = self.layout
        out = []
        if spec.has_shared:
            out += [(L.shared_gate.format(i=i), (spec.shared, d)), (L.shared_up.format(i=i), (spec.shared, d)),
                    (L.shared_down.format(i=i), (d, spec.shared))]
        return out + [(L.shared_expert_gate.format(i=i), (1, d))]

    def _shared_tensors(self, i, weights):
        L = self.layout
        if weights.spec.has_shared:
            yield L.shared_gate.format(i=i), weights.shared_gate
            yield L.shared_up.format(i=i), weights.shared_up
            yield L.shared_down.format(i=i), weights.shared_down * self.shared_down_scale
        yield L.shared_expert_gate.format(i=i), weights.router.new_zeros(1, weights.router.shape[1])


@dataclass(frozen=True)
class LlamaSharedExpertAdapter(Qwen2MoeTarget):
    """Llama and Mistral conversions with a shared expert -> Qwen2-MoE (Mixtral has no shared expert).

    Qwen2-MoE's decoder is Llama's (pre-RMSNorm, RoPE, GQA, no o_proj bias) apart from q/k/v biases,
    which we keep on (qkv_bias=True, as every Qwen2-MoE reader expects) and write as zeros. RoPE
    parameters (Llama 3's `llama3` scaling included), tied embeddings, GQA, RMSNorm eps, max positions
    and the activation are carried as fields; `head_dim` is read by transformers' Qwen2-MoE with
    getattr; Mistral's sliding window (all layers or none) becomes use_sliding_window with every
    layer_types entry "sliding_attention". Refused: attention_bias=True (Qwen2-MoE's o_proj has no
    bias) and mlp_bias=True.
    """

    name: ClassVar[str] = "llama/mistral (shared expert)"
    dense_model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral")
    neutral_dense_keys: ClassVar[dict] = {"attention_bias": False}
    ignored_dense_keys: ClassVar[frozenset[str]] = frozenset({"pretraining_tp"})
    extra_target_keys: ClassVar[frozenset[str]] = frozenset({"head_dim"})

    def check_dense_config(self, config):
        super().check_dense_config(config)
        if getattr(config, "attention_bias", False):
            raise FamilyError(
                f"{config.model_type} with attention_bias=True cannot be exported exactly with a shared expert: "
                f"{self.target_architecture}'s o_proj has no bias. Set --shared_neurons 0 or use a model "
                "without attention biases")

    def _dense_settings(self, config):
        settings = super()._dense_settings(config)
        settings.pop("sliding_window", None)   # becomes use_sliding_window + layer_types below
        return settings

    def _sliding_window(self, config) -> int | None:
        return getattr(config, "sliding_window", None)   # Mistral's; Llama configs have none

    def _moe_fields(self, config, spec, expert_size, router_aux_loss_coef):
        fields = super()._moe_fields(config, spec, expert_size, router_aux_loss_coef)
        window = self._sliding_window(config)
        n = config.num_hidden_layers
        fields.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=n,
                      layer_types=["sliding_attention" if window is not None else "full_attention"] * n)
        return fields

    def _check_target(self, config, target):
        window = self._sliding_window(config)
        want = ["sliding_attention" if window is not None else "full_attention"] * config.num_hidden_layers
        if list(target.layer_types) != want or (window is not None and target.sliding_window != window):
            raise FamilyError(f"{self.target_architecture} did not take the sliding window {window} on every "
                              "layer; the export would not be exact")

    def added_layer_tensors(self, layer_idx, config, dtype):
        q = config.num_attention_heads * _head_dim(config)
        kv = config.num_key_value_heads * _head_dim(config)
        prefix = self.layer_prefix(layer_idx) + "self_attn."
        return [(f"{prefix}{name}_proj.bias", torch.zeros(n, dtype=dtype)) for name, n in (("q", q), ("k", kv), ("v", kv))]


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class MixtralTargetAdapter(FamilyAdapter):
    """Llama and Mistral: the same decoder as Mixtral's apart from the MoE block."""

    target_model_type: ClassVar[str] = "mixtral"
    target_architecture: ClassVar[str] = "MixtralForCausalLM"
    layout: ClassVar[MoETensorLayout] = MoETensorLayout(
        router="model.layers.{i}.block_sparse_moe.gate.weight",
        expert_gate="model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
        expert_up="model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
        expert_down="model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    )
    # Mixtral's attention has no biases.
    neutral_dense_keys: ClassVar[dict] = {"attention_bias": False}
    # A Meta training-time setting that transformers' Llama forward never reads.
    ignored_dense_keys: ClassVar[frozenset[str]] = frozenset({"pretraining_tp"})
    shared_expert_adapter: ClassVar[FamilyAdapter | None] = LlamaSharedExpertAdapter()

    def _moe_fields(self, config, spec, expert_size, router_aux_loss_coef):
        # Mixtral always renormalises the top-k probabilities (no norm_topk_prob switch).
        return dict(intermediate_size=expert_size, num_local_experts=spec.num_experts,
                    num_experts_per_tok=spec.top_k, router_aux_loss_coef=router_aux_loss_coef,
                    router_jitter_noise=0.0, output_router_logits=False,
                    sliding_window=getattr(config, "sliding_window", None))


@dataclass(frozen=True)
class LlamaAdapter(MixtralTargetAdapter):
    name: ClassVar[str] = "llama"
    dense_model_types: ClassVar[tuple[str, ...]] = ("llama",)


@dataclass(frozen=True)
class MistralAdapter(MixtralTargetAdapter):
    name: ClassVar[str] = "mistral"
    dense_model_types: ClassVar[tuple[str, ...]] = ("mistral",)


@dataclass(frozen=True)
class Qwen2Adapter(Qwen2MoeTarget):
    """Qwen2 / Qwen2.5 -> Qwen2-MoE (same attention, q/k/v biases and sliding-window settings)."""

    name: ClassVar[str] = "qwen2"
    dense_model_types: ClassVar[tuple[str, ...]] = ("qwen2",)

    def _equivalent(self, key, dense_value, target_value, config):
        # Without use_sliding_window the window size is never read; the two configs store None vs 0.
        if key == "sliding_window" and not config.use_sliding_window:
            return True
        return dense_value == target_value


@dataclass(frozen=True)
class Qwen3SharedExpertAdapter(Qwen2MoeTarget):
    """Qwen3 conversions with a shared expert -> Qwen3-Next (Qwen3NextForCausalLM), every layer full
    attention. Qwen3-MoE has no shared expert; Qwen3-Next's full-attention layers are Qwen3's (per-head
    q/k RMSNorm before RoPE, GQA, head_dim) with three differences, each mapped exactly:
      - gated attention: q_proj also yields a per-head output gate, sigmoid(gate) * attention; its gate
        rows are zero (sigmoid(0) = 0.5) and o_proj is doubled;
      - zero-centred RMSNorms, x * (1 + w): every norm weight is stored as w - 1 (in fp32 1 + (w - 1)
        is w to about one rounding);
      - partial RoPE (default 0.25): partial_rotary_factor is set to 1.0.
    Its MoE block is Qwen2-MoE's (softmax top-k router, shared expert with a sigmoid gate), so the
    routing function is unchanged. Refused: sliding windows (Qwen3-Next has none) and attention_bias.
    """

    name: ClassVar[str] = "qwen3 (shared expert)"
    dense_model_types: ClassVar[tuple[str, ...]] = ("qwen3",)
    target_model_type: ClassVar[str] = "qwen3_next"
    target_architecture: ClassVar[str] = "Qwen3NextForCausalLM"
    _NORMS: ClassVar[tuple[str, ...]] = ("input_layernorm.weight", "post_attention_layernorm.weight",
                                         "self_attn.q_norm.weight", "self_attn.k_norm.weight")

    def check_dense_config(self, config):
        super().check_dense_config(config)
        if getattr(config, "use_sliding_window", False):
            raise FamilyError("this Qwen3 model uses a sliding window; its shared-expert target Qwen3-Next has none, "
                              "so it cannot be exported exactly with a shared expert. Set --shared_neurons 0")
        if getattr(config, "attention_bias", False):
            raise FamilyError("Qwen3 with attention_bias=True cannot be exported exactly with a shared expert "
                              "(Qwen3-Next's gated attention would need its o_proj bias changed). Set "
                              "--shared_neurons 0")
        rope = config.rope_parameters or {}
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise FamilyError("this Qwen3 model uses partial RoPE; only full RoPE is mapped to Qwen3-Next")

    def _dense_settings(self, config):
        settings = super()._dense_settings(config)
        for key in ("layer_types", "max_window_layers", "use_sliding_window", "sliding_window", "rope_parameters"):
            settings.pop(key, None)   # checked above; layer types and RoPE are set in _moe_fields
        return settings

    def _moe_fields(self, config, spec, expert_size, router_aux_loss_coef):
        fields = super()._moe_fields(config, spec, expert_size, router_aux_loss_coef)
        fields.pop("qkv_bias")
        fields.update(layer_types=["full_attention"] * config.num_hidden_layers,
                      rope_parameters={**config.rope_parameters, "partial_rotary_factor": 1.0})
        return fields

    def _check_target(self, config, target):
        rope = {k: v for k, v in target.rope_parameters.items() if k != "partial_rotary_factor"}
        if (set(target.layer_types) != {"full_attention"} or target.rope_parameters["partial_rotary_factor"] != 1.0
                or rope != {k: v for k, v in config.rope_parameters.items() if k != "partial_rotary_factor"}):
            raise FamilyError("Qwen3-Next did not take full attention with full RoPE on every layer; the export "
                              "would not be exact")

    def _layer_part(self, name: str) -> str | None:
        prefix = f"{self.layers_path}."
        if not name.startswith(prefix):
            return None
        return name[len(prefix):].split(".", 1)[1]

    def target_tensor(self, name, tensor, config):
        part = self._layer_part(name)
        if name == "model.norm.weight" or part in self._NORMS:
            return tensor - 1
        if part == "self_attn.o_proj.weight":
            return tensor * 2
        if part == "self_attn.q_proj.weight":
            q = tensor.reshape(config.num_attention_heads, _head_dim(config), -1)
            return torch.cat([q, torch.zeros_like(q)], dim=1).reshape(2 * tensor.shape[0], -1)
        return tensor

    def target_tensor_shape(self, name, shape, config):
        if self._layer_part(name) == "self_attn.q_proj.weight":
            return (2 * shape[0], *shape[1:])
        return shape


@dataclass(frozen=True)
class Qwen3Adapter(FamilyAdapter):
    name: ClassVar[str] = "qwen3"
    dense_model_types: ClassVar[tuple[str, ...]] = ("qwen3",)
    target_model_type: ClassVar[str] = "qwen3_moe"
    target_architecture: ClassVar[str] = "Qwen3MoeForCausalLM"
    layout: ClassVar[MoETensorLayout] = _QWEN_LAYOUT
    # Qwen3-MoE reads head_dim with getattr (Qwen3 models use head_dim != hidden/heads).
    extra_target_keys: ClassVar[frozenset[str]] = frozenset({"head_dim"})
    shared_expert_adapter: ClassVar[FamilyAdapter | None] = Qwen3SharedExpertAdapter()
    def check_dense_config(self, config):
        super().check_dense_config(config)
        types = set(config.layer_types or ["full_attention"])
        if getattr(config, "use_sliding_window", False) and types != {"sliding_attention"}:
            raise FamilyError(
                "this Qwen3 model uses a sliding window on some layers only (layer_types="
                f"{config.layer_types}); Qwen3-MoE applies a window to all layers or none, so it cannot "
                "be exported exactly")
        if not types <= {"full_attention", "sliding_attention"}:
            raise FamilyError(f"unsupported Qwen3 layer_types {sorted(types)}")

    def _dense_settings(self, config):
        # Once checked, layer_types / max_window_layers say no more than use_sliding_window does
        # (Qwen3-MoE has no per-layer attention types).
        settings = super()._dense_settings(config)
        settings.pop("layer_types", None)
        settings.pop("max_window_layers", None)
        return settings

    def _moe_fields(self, config, spec, expert_size, router_aux_loss_coef):
        return dict(moe_intermediate_size=expert_size,
                    intermediate_size=config.intermediate_size, num_experts=spec.num_experts,
                    num_experts_per_tok=spec.top_k, norm_topk_prob=True, decoder_sparse_step=1,
                    mlp_only_layers=[], router_aux_loss_coef=router_aux_loss_coef, output_router_logits=False)


@dataclass(frozen=True)
class Olmo2Adapter(FamilyAdapter):
    """OLMo 2 -> FlexOlmo: the same decoder (post-norms, full-width q/k norms) with an MoE block."""

    name: ClassVar[str] = "olmo2"
    dense_model_types: ClassVar[tuple[str, ...]] = ("olmo2",)
    target_model_type: ClassVar[str] = "flex_olmo"
    target_architecture: ClassVar[str] = "FlexOlmoForCausalLM"
    layout: ClassVar[MoETensorLayout] = _QWEN_LAYOUT

    def _moe_fields(self, config, spec, expert_size, router_aux_loss_coef):
        # FlexOlmo has no separate expert size: intermediate_size is each expert's.
        return dict(intermediate_size=expert_size, num_experts=spec.num_experts,
                    num_experts_per_tok=spec.top_k, norm_topk_prob=True,
                    router_aux_loss_coef=router_aux_loss_coef, output_router_logits=False)


ADAPTERS: tuple[FamilyAdapter, ...] = (LlamaAdapter(), MistralAdapter(), Qwen2Adapter(), Qwen3Adapter(),
                                       Olmo2Adapter())


def supported_families() -> str:
    return "; ".join(a.describe() for a in ADAPTERS)


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for a dense config (or a model's `.config`); an error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.dense_model_types:
            return adapter
    arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
    raise FamilyError(
        f"unsupported model: model_type {model_type!r} ({arch}). dotmoe-ds converts dense SwiGLU models "
        f"of these families: {supported_families()}. To add one, write an adapter in dotmoe_ds/families.py")
