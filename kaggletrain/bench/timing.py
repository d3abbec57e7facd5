"""Timing: warm-up, repeats, device synchronisation, median with spread."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(seconds: list[float]) -> dict:
    """Median, min, max and quartiles (seconds) of repeated timings, with the raw runs."""
    if not seconds:
        raise ValueError("no timings")
    s = sorted(seconds)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1], "q1_s": q1, "q3_s": q3,
            "n": len(s), "runs_s": list(seconds)}


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
            budget_s: float | None = None) -> dict:
    """Call fn `warmup` times untimed, then time `repeats` calls (each synchronised on GPU).

    With `budget_s`, stops early once the repeats have taken that long (but after at least 2 runs)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if budget_s is not None and len(times) >= 2 and time.perf_counter() - start > budget_s:
            break
    return stats(times)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None
