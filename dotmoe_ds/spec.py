"""The budget of one MoE conversion: how many experts, how big, how many active per token.

`MoESpec` is the one object every part of the system agrees on (layer, partitions, export, config).
It validates itself on construction so that bad budgets fail before any model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


class SpecError(ValueError):
    """A conversion budget that cannot work; the message names the problem and the fix."""


@dataclass(frozen=True)
class MoESpec:
    """Neuron budget of one SwiGLU FFN split into experts (METHOD.md section 1).

    d_ff:        hidden units of the dense FFN.
    top_k:       routed experts active per token.
    capacities:  neurons per routed expert, in expert order.
    shared:      neurons of the always-active shared expert (0: none).
    """

    d_ff: int
    top_k: int
    capacities: tuple[int, ...]
    shared: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "capacities", tuple(int(c) for c in self.capacities))
        E = len(self.capacities)
        if self.d_ff <= 0:
            raise SpecError(f"d_ff must be positive, got {self.d_ff}")
        if E == 0:
            raise SpecError("num_experts must be at least 1")
        if E > self.d_ff:
            raise SpecError(
                f"num_experts={E} is larger than d_ff={self.d_ff}: every expert needs at least one "
                f"neuron; use at most {self.d_ff} experts")
        if not 1 <= self.top_k <= E:
            raise SpecError(
                f"top_k={self.top_k} must be between 1 and num_experts={E} (k > E selects experts "
                "that do not exist); lower --top_k or raise --num_experts")
        if self.shared < 0:
            raise SpecError(f"shared_neurons must be >= 0, got {self.shared}")
        if any(c <= 0 for c in self.capacities):
            raise SpecError(f"every expert capacity must be a positive integer, got {list(self.capacities)}")
        if sum(self.capacities) + self.shared != self.d_ff:
            raise SpecError(
                f"expert capacities sum to {sum(self.capacities)} and the shared expert has {self.shared} "
                f"neurons, together {sum(self.capacities) + self.shared}, but d_ff is {self.d_ff}: "
                "capacities plus shared_neurons must add up to d_ff exactly")

    @classmethod
    def uniform(cls, d_ff: int, num_experts: int, top_k: int, shared: int = 0) -> "MoESpec":
        """Equal capacities; when `d_ff - shared` is not divisible, the first experts get one more."""
        if num_experts <= 0:
            raise SpecError(f"num_experts must be at least 1, got {num_experts}")
        routed = d_ff - shared
        if routed < num_experts:
            raise SpecError(
                f"d_ff={d_ff} minus shared_neurons={shared} leaves {routed} neurons for "
                f"{num_experts} experts; every expert needs at least one")
        base, extra = divmod(routed, num_experts)
        caps = tuple(base + (1 if e < extra else 0) for e in range(num_experts))
        return cls(d_ff=d_ff, top_k=top_k, capacities=caps, shared=shared)

    @classmethod
    def custom(cls, d_ff: int, capacities: Sequence[int], top_k: int, shared: int = 0) -> "MoESpec":
        return cls(d_ff=d_ff, top_k=top_k, capacities=tuple(capacities), shared=shared)

    @property
    def num_experts(self) -> int:
        return len(self.capacities)

    @property
    def has_shared(self) -> bool:
        return self.shared > 0

    @property
    def num_columns(self) -> int:
        """Columns of the assignment: the routed experts, then the shared expert if any."""
        return self.num_experts + (1 if self.has_shared else 0)

    @property
    def column_capacities(self) -> tuple[int, ...]:
        """Sinkhorn column marginals: routed capacities, then the shared capacity if any."""
        return self.capacities + ((self.shared,) if self.has_shared else ())

    @property
    def shared_column(self) -> int | None:
        return self.num_experts if self.has_shared else None

    @property
    def max_capacity(self) -> int:
        return max(self.capacities)

    @property
    def active_fraction(self) -> float:
        """(c_0 + k * mean(c_e)) / d_ff: the share of FFN neurons a token uses (METHOD.md section 1)."""
        mean_c = sum(self.capacities) / self.num_experts
        return (self.shared + self.top_k * mean_c) / self.d_ff

    def to_dict(self) -> dict:
        return {"d_ff": self.d_ff, "num_experts": self.num_experts, "top_k": self.top_k,
                "capacities": list(self.capacities), "shared": self.shared,
                "active_fraction": self.active_fraction}
