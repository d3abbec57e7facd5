"""The RWKV-7 decay, in one place.

d = exp(-exp(-softplus(-w) - 0.5)) = exp(-exp(-0.5) * sigmoid(w)), so log d lies in (-0.6065, 0).
Never materialise d in fp16/bf16: with w ~ -8, 1 - d ~ 2e-4 rounds d to exactly 1 (spec, pitfalls).
"""

import math

import torch

DECAY_SCALE = math.exp(-0.5)  # 0.6065306597...


def decay_log(w: torch.Tensor) -> torch.Tensor:
    """log of the decay for a raw logit `w`, in float32 at least (float64 stays float64)."""
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    return -DECAY_SCALE * torch.sigmoid(w)
