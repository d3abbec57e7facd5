"""What the numbers were measured on: CPU, GPU, library versions, date, load."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

# Dense (no sparsity) peak tensor-core TFLOP/s per GPU for fp16/bf16 with fp32 accumulation, from the
# vendors' data sheets. Matched against torch.cuda.get_device_name(); the first match wins (so "H100 PCIe"
# precedes "H100"). MFU is reported only for GPUs listed here.
PEAK_TFLOPS = (
    ("T4", {"fp16": 65.0}),
    ("L4", {"fp16": 121.0, "bf16": 121.0}),
    ("A10G", {"fp16": 70.0, "bf16": 70.0}),
    ("A100", {"fp16": 312.0, "bf16": 312.0}),
    ("H100 PCIe", {"fp16": 756.0, "bf16": 756.0}),
    ("H100", {"fp16": 989.0, "bf16": 989.0}),
    ("H200", {"fp16": 989.0, "bf16": 989.0}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Peak fp16/bf16 TFLOP/s of a known GPU (None for fp32, unknown GPUs and CPUs)."""
    for key, table in PEAK_TFLOPS:
        if key in device_name:
            return table.get(precision)
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def describe(device: torch.device) -> dict:
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # psutil is a dependency, but a broken install must not stop a benchmark
        physical, mem_gib = None, None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": physical,
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "load_avg": load_avg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        major, minor = torch.cuda.get_device_capability(idx)
        info["gpu"] = {"name": torch.cuda.get_device_name(idx), "count": torch.cuda.device_count(),
                       "capability": f"{major}.{minor}", "memory_gib": round(props.total_memory / 2**30, 1)}
    return info
