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


# ---------------------------------------------------------------------- budget flags

def _parse_capacities(capacities) -> tuple[int, ...]:
    if isinstance(capacities, str):
        parts = [p for p in capacities.replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise SpecError(f"--capacities must be comma-separated neuron counts (e.g. 64,64,128), got "
                            f"{capacities!r}") from None
    return tuple(int(c) for c in capacities or ())


def resolve_budget(d_ff: int, *, num_experts: int, top_k: int, shared: int = 0, expert_size: int = 0,
                   active_fraction: float = 0.0, capacities=(), default_num_experts: int | None = None,
                   default_top_k: int | None = None) -> MoESpec:
    """The MoESpec the budget flags ask for, exactly, or a SpecError naming the nearest exact budgets.

    capacities:      explicit routed capacities (E = their count); they plus `shared` must make d_ff.
    expert_size:     routed experts of this many neurons: E = (d_ff - shared) / expert_size.
    active_fraction: k is chosen so that (shared + k * mean capacity) / d_ff equals it exactly.
    `num_experts` / `top_k` equal to their defaults (`default_*`) count as not given when a budget
    flag derives them; a given value that disagrees is refused.
    """
    if shared < 0:
        raise SpecError(f"--shared_neurons must be >= 0, got {shared}")
    if shared >= d_ff:
        raise SpecError(f"--shared_neurons={shared} is not smaller than the model's d_ff={d_ff} "
                        "(intermediate_size): the routed experts need at least one neuron each; use at most "
                        f"{d_ff - 1} shared neurons (half of d_ff or less is usual)")
    caps = _parse_capacities(capacities)
    if caps and expert_size:
        raise SpecError("--capacities and --expert_size both set the expert sizes; give one of them")
    routed = d_ff - shared

    def given(value, default):
        return default is None or value != default

    if caps:
        if given(num_experts, default_num_experts) and num_experts != len(caps):
            raise SpecError(f"--num_experts={num_experts} but --capacities lists {len(caps)} experts; drop "
                            "--num_experts or make them agree")
        if sum(caps) != routed:
            raise SpecError(
                f"--capacities sum to {sum(caps)} but d_ff={d_ff} minus --shared_neurons={shared} leaves "
                f"{routed}: capacities that do not add up would drop or invent neurons. Make them sum to "
                f"{routed} (e.g. change the last one to {caps[-1] + routed - sum(caps)})")
        num_experts = len(caps)
    elif expert_size:
        if expert_size < 0:
            raise SpecError(f"--expert_size must be positive, got {expert_size}")
        if routed % expert_size:
            sizes = sorted({c for c in range(1, routed + 1) if routed % c == 0}, key=lambda c: (abs(c - expert_size), c))[:3]
            lo = (routed // expert_size) * expert_size
            shareds = sorted(d_ff - m for m in (lo, lo + expert_size) if 0 <= d_ff - m < d_ff and m > 0)
            raise SpecError(
                f"--expert_size={expert_size} does not divide the {routed} routed neurons (d_ff={d_ff} minus "
                f"--shared_neurons={shared}). Nearest exact budgets: --expert_size "
                f"{' or '.join(map(str, sorted(sizes)))} with --shared_neurons {shared}, or --expert_size "
                f"{expert_size} with --shared_neurons {' or '.join(map(str, shareds))}")
        E = routed // expert_size
        if given(num_experts, default_num_experts) and num_experts != E:
            raise SpecError(f"--num_experts={num_experts} disagrees with --expert_size={expert_size}, which gives "
                            f"{E} experts of the {routed} routed neurons; drop one of the two")
        num_experts = E
    if num_experts < 1 or num_experts > routed:
        raise SpecError(f"--num_experts={num_experts} must be between 1 and the {routed} routed neurons")
    if active_fraction:
        from fractions import Fraction

        f = Fraction(active_fraction).limit_denominator(10**6)
        if not 0 < f <= 1:
            raise SpecError(f"--active_fraction must be in (0, 1], got {active_fraction}")
        # (shared + k * routed / E) / d_ff = f  =>  k = (f * d_ff - shared) * E / routed
        k = (f * d_ff - shared) * num_experts / routed
        if k.denominator != 1 or not 1 <= k <= num_experts:
            options = []
            for kk in sorted({max(1, min(num_experts, int(k))), max(1, min(num_experts, int(k) + 1))}):
                options.append(f"--top_k {kk} gives {float((shared + Fraction(kk * routed, num_experts)) / d_ff):.4g}")
                # or keep k and move neurons between the shared and the routed experts
                s = (f * d_ff * num_experts - kk * d_ff) / (num_experts - kk) if kk < num_experts else None
                if s is not None and s.denominator == 1 and 0 <= s < d_ff - num_experts:
                    options.append(f"--top_k {kk} --shared_neurons {int(s)} gives exactly {float(f):.4g}")
            raise SpecError(
                f"--active_fraction={active_fraction} cannot be met exactly with {num_experts} experts of the "
                f"{routed} routed neurons and {shared} shared (it needs top_k={float(k):.4g}). Nearest exact "
                f"budgets: {'; '.join(options)}")
        if given(top_k, default_top_k) and top_k != int(k):
            raise SpecError(f"--top_k={top_k} disagrees with --active_fraction={active_fraction}, which needs "
                            f"top_k={int(k)}; drop one of the two")
        top_k = int(k)
    if caps:
        return MoESpec.custom(d_ff, caps, top_k=top_k, shared=shared)
    return MoESpec.uniform(d_ff, num_experts, top_k=top_k, shared=shared)


def shared_from_fraction(d_ff: int, fraction: float, routed_multiple: int) -> int:
    """Shared-expert neurons nearest `fraction` of d_ff that leave the routed neurons a (positive)
    multiple of `routed_multiple` (the number of equal experts, or the expert size)."""
    if not 0 <= fraction < 1:
        raise SpecError(f"--shared_fraction must be in [0, 1), got {fraction}")
    if routed_multiple < 1 or routed_multiple > d_ff:
        raise SpecError(f"cannot split d_ff={d_ff} into routed experts of a multiple of {routed_multiple} neurons")
    routed = routed_multiple * max(1, round((1 - fraction) * d_ff / routed_multiple))
    return d_ff - min(routed, d_ff // routed_multiple * routed_multiple)


def routed_instead_of_shared(spec: MoESpec) -> MoESpec:
    """The same number of experts over all of d_ff, no shared expert, with the top-k nearest the
    spec's active share: for a family whose export has no shared expert."""
    k = min(spec.num_experts, max(1, round(spec.active_fraction * spec.num_experts)))
    return MoESpec.uniform(spec.d_ff, spec.num_experts, top_k=k)


def describe_budget(spec: MoESpec) -> str:
    """One line: '512 shared + 16 x 64, top-4: 768 of 1536 neurons active (50.0%)'."""
    caps = spec.capacities
    routed = f"{len(caps)} x {caps[0]}" if len(set(caps)) == 1 else f"{len(caps)} experts {list(caps)}"
    active = spec.active_fraction * spec.d_ff
    return (f"{spec.shared} shared + {routed}, top-{spec.top_k}: {active:g} of {spec.d_ff} neurons active "
            f"({spec.active_fraction:.1%})")
