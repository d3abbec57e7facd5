"""Device and precision choice.

auto: bf16 only where the GPU does bf16 natively (A100/H100...), fp16 + GradScaler on T4-class GPUs
(sm_75 has no bf16), fp32 on CPU. fp16 always trains with loss scaling, on a CPU too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kaggletrain.errors import ConfigError


@dataclass
class Precision:
    name: str                       # fp32 | fp16 | bf16
    amp_dtype: Optional[torch.dtype]
    use_scaler: bool


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but no CUDA GPU is visible (use auto or cpu)")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the keyword
        return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> Precision:
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if native_bf16(device) else "fp16"
    if precision == "fp32":
        return Precision("fp32", None, False)
    if precision == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if precision == "fp16":
        # Loss scaling on every device: fp16's range (gradients under 6e-8 flush to zero) is the same on a
        # CPU, where GradScaler works too (torch >= 2.3), so a laptop run checks the T4's path.
        return Precision("fp16", torch.float16, True)
    raise ConfigError(f"train.precision: expected auto, fp32, fp16 or bf16, got {precision!r}")
