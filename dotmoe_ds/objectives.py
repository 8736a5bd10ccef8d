"""Loss terms of the conversion objective that are pure tensor math (no model, no DeepSpeed).

`relative_reconstruction_error`: the layer-local objective of METHOD.md section 5 (the paper's
"against the actual output of the dense model"): for one FFN and the same input x,

    r = mean over tokens of ||y_moe(x) - y_dense(x)||^2 / ||y_dense(x)||^2

The trainer averages r over the layers (AuxLosses) and adds `--recon_weight * r` to the loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

# A token whose dense output is (nearly) zero would make its ratio explode; its denominator is
# floored at this share of the mean squared norm over the tokens of the batch.
RECON_FLOOR = 1e-6


def relative_reconstruction_error(output: Tensor, target: Tensor, floor: float = RECON_FLOOR) -> Tensor:
    """Mean over tokens (every leading dimension) of ||output - target||^2 / ||target||^2, in fp32.

    `target` is the dense FFN output and is treated as a constant (no gradient flows into it);
    the denominator of each token is at least `floor` times the batch's mean ||target||^2.
    """
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
    y = output.float()
    t = target.detach().float()
    num = (y - t).pow(2).sum(-1)
    den = t.pow(2).sum(-1)
    den = torch.maximum(den, (floor * den.mean()).clamp_min(torch.finfo(torch.float32).tiny))
    return (num / den).mean()
