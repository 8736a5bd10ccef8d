"""The dense FFN as it was before training: a teacher that does not move (`--teacher original`).

With `--trainable ffn` (or `all`) the converted layer trains the very weights its 'dense' mode runs,
so without a copy both the distillation teacher (the model in 'dense' mode) and the reconstruction
target (the dense output of the same input) drift with the student: on SmolLM2 the original model's held-out Austen
perplexity (4 x 256 tokens) is 40.94, the study's 200-step runs end with the dense mode at 39.2-39.4
(learned DOT, pruning), 42.0-42.2 (frozen DOT) and 48.7 (k-means experts). `ReferenceFFN` is a frozen copy of the original gate/up/down weights; a conversion layer
that holds one (`layer.reference`) answers 'dense' mode and its reconstruction target from it
(`dense_output`). It is a submodule of the layer, so ZeRO-3 shards it like any frozen weight (two bytes
per FFN weight in bf16, no gradient, no optimizer state) and gathers it with the layer.

Not the default: on the calibration mix's own validation split the student learned better from the
teacher that adapts with it (`--teacher trained`: 58.45 vs 60.15 perplexity after 60 paired steps,
results/teacher.md), so the copy is for runs that want the original model as the target.

Pure torch; the trainer builds and fills the copies (train.attach_references).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class ReferenceFFN(nn.Module):
    """A frozen SwiGLU MLP: `down(act(gate(x)) * up(x))` with weights that never train."""

    def __init__(self, hidden: int, d_ff: int, act_fn: Callable[[Tensor], Tensor], *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden, d_ff, bias=False, **factory)
        self.up_proj = nn.Linear(hidden, d_ff, bias=False, **factory)
        self.down_proj = nn.Linear(d_ff, hidden, bias=False, **factory)
        self.act_fn = act_fn
        self.requires_grad_(False)

    def linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def dense_output(layer: nn.Module, x: Tensor, h: Tensor | None = None) -> Tensor:
    """The dense FFN's output for input `x`: the layer's frozen reference when it holds one, else its
    own (possibly trained) weights; `h`: their activation `act(gate(x)) * up(x)`, if already computed."""
    reference = getattr(layer, "reference", None)
    if reference is not None:
        return reference(x)
    if h is None:
        h = layer.act_fn(layer.gate_proj(x)) * layer.up_proj(x)
    return layer.down_proj(h)
