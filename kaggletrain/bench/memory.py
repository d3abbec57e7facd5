"""Peak memory of one benchmark point: the allocator on GPU, the process on CPU.

GPU: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus what was allocated before
the point (tensors only; the CUDA context and the caching allocator's slack are not counted).

CPU (Linux): the process's peak resident set, measured in-process for each point:
  1. `gc.collect()` and glibc `malloc_trim(0)`, with glibc's mmap threshold pinned at 128 KiB, so that
     buffers freed by the previous point go back to the OS instead of staying in the heap (where the next
     point would reuse them without its RSS growing);
  2. the kernel's peak-RSS counter (VmHWM) is reset by writing 5 to /proc/self/clear_refs;
  3. the point runs once (model, optimizer, inputs, one call of each timed function):
     peak = VmHWM - RSS before the point.
Timings need the opposite: with the threshold pinned, every large buffer is a fresh mmap whose pages fault
in on each step (we measured training steps up to 2x slower), so they run with the threshold at 32 MiB,
where glibc's adaptive threshold settles. And a heap that timed runs have filled with large free chunks
serves the next memory pass from those chunks instead of mmap (we measured +30% on the next point). So
the runner measures every point's memory first, and only then times them all (runner.py).
Where clear_refs or glibc is unavailable (macOS, musl), a thread samples the RSS every millisecond
instead (`method` in the results says which was used).
"""

from __future__ import annotations

import ctypes
import gc
import threading
from typing import Optional

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_PINNED = 128 * 1024          # glibc's initial mmap threshold, held fixed
_STEADY = 32 * 1024 * 1024    # where glibc's adaptive threshold ends up after large frees (64-bit)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def set_malloc_mode(pinned: bool) -> None:
    """Pinned: large buffers are mmapped and returned to the OS on free. Else: glibc's steady state."""
    if _LIBC is None:
        return
    threshold = _PINNED if pinned else _STEADY
    _LIBC.mallopt(_M_MMAP_THRESHOLD, threshold)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)


def release() -> None:
    """Free what the previous point left behind (Python garbage, CUDA cache, glibc's free lists)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def cpu_method() -> str:
    if _LIBC is not None and _reset_hwm():
        return ("in-process, per point: glibc mmap threshold pinned at 128 KiB + malloc_trim, VmHWM reset via "
                "/proc/self/clear_refs; peak = VmHWM - RSS before the point")
    return "in-process, per point: RSS sampled every 1 ms by a thread; peak = max RSS - RSS before the point"


class PeakMemory:
    """with PeakMemory(device) as pm: ...   then pm.peak_bytes (> 0 when anything was allocated)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._sampler: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            release()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        set_malloc_mode(pinned=True)
        release()
        self._hwm = _LIBC is not None and _reset_hwm()
        self._base = _rss_bytes()
        if not self._hwm:
            self._max = self._base
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss_bytes())

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return False
        if self._hwm:
            self.peak_bytes = (_status_kib("VmHWM") or 0) * 1024 - self._base
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_bytes = max(self._max, _rss_bytes()) - self._base
        set_malloc_mode(pinned=False)
        return False
