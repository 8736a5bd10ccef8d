"""Held-out evaluation: perplexity of a causal LM on packed blocks, shared over ranks.

Every rank runs the same number of forwards (ZeRO-3 gathers are collective); padding rows that
`data.eval_batches` adds to even out the ranks' shares are left out of the sums. The token
negative log-likelihoods are summed in float64 and all-reduced, so the result does not depend on
the number of ranks or the batch size (beyond float rounding inside the model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dotmoe_ds import distributed as dist
from dotmoe_ds.data import eval_batches


@dataclass
class Perplexity:
    nll_sum: float      # summed token negative log-likelihood (nats)
    tokens: int         # predicted tokens (seq_len - 1 per block)
    blocks: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    def to_dict(self) -> dict:
        return {"perplexity": self.ppl, "mean_nll": self.mean_nll, "tokens": self.tokens, "blocks": self.blocks}


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token NLL `[B, T-1]` (fp32) of logits `[B, T, V]` on their own inputs."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: np.ndarray, *, batch_size: int = 4, max_blocks: int = 0,
               device: torch.device | str | None = None) -> Perplexity:
    """Perplexity of `model` (returns `.logits`) on the first `max_blocks` blocks (0: all). Collective."""
    if max_blocks:
        blocks = blocks[:max_blocks]
    if len(blocks) == 0:
        raise ValueError("no held-out blocks to evaluate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    try:
        for input_ids, real in eval_batches(blocks, rank=dist.rank(), world_size=dist.world_size(),
                                            micro_batch_size=batch_size):
            input_ids = input_ids.to(device)
            logits = model(input_ids=input_ids).logits
            per_token = token_nll(logits, input_ids).double().cpu()
            keep = real.to(torch.float64)
            nll += (per_token.sum(1) * keep).sum()
            tokens += keep.sum() * per_token.shape[1]
    finally:
        model.train(was_training)
    total = dist.all_reduce_sum(torch.stack([nll, tokens]))
    return Perplexity(nll_sum=float(total[0]), tokens=int(total[1]), blocks=len(blocks))
