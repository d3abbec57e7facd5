"""Shared by the suites: the run context and number formatting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Context:
    device: torch.device
    quick: bool = False
    repeats: int = 3          # timed runs per measurement
    warmup: int = 1           # untimed runs before them
    device_name: str = "cpu"
    compile: bool = False     # train suite: models compiled as train.compile does (CUDA only)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def half(self) -> str:
        """The half precision this device trains in natively: bf16 (Ampere+), fp16 (T4), or bf16 on CPU."""
        if not self.cuda:
            return "bf16"
        from kaggletrain.train.precision import native_bf16

        return "bf16" if native_bf16(self.device) else "fp16"

    @property
    def train_precision(self) -> str:
        """What `train.precision: auto` picks here."""
        return self.half if self.cuda else "fp32"

    def half_precisions(self) -> list[str]:
        """Half precisions worth measuring: both on CPU (emulated, slow), only native ones on a GPU."""
        if not self.cuda:
            return ["fp16", "bf16"]
        return ["fp16", "bf16"] if self.half == "bf16" else ["fp16"]


def fmt_time(timing: dict | None) -> str:
    """'12.3 ms ±4%': the median, and half the min-max range relative to it (the JSON has every run)."""
    if not timing:
        return "-"
    med, lo, hi = timing["median_s"], timing["min_s"], timing["max_s"]
    spread = f" ±{(hi - lo) / 2 / med * 100:.0f}%" if med > 0 else ""
    return (f"{med:.2f} s" if med >= 1 else f"{med * 1e3:.1f} ms") + spread


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e4:
        return f"{x / 1e3:.1f} k"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


@dataclass
class Bench:
    """What one benchmark point runs: the calls to time (each one step, forward, prefill...) and how many
    tokens each call processes. `info` goes into the result row; `final()` too, after the timings."""

    fns: dict
    tokens: dict
    info: dict = field(default_factory=dict)
    final: Optional[Callable[[], dict]] = None
    budget_s: float = 30.0   # per timed call: stop repeating (after 2 runs) once this much time went by
