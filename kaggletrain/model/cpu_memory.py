"""Keep the CPU heap from growing with the number of chunks / checkpointed blocks (glibc only).

On CPU, PyTorch allocates tensors with the C library's malloc. glibc serves buffers below its mmap
threshold (which adapts upwards, to 32 MiB on 64-bit, as soon as a large buffer is freed) from the heap,
and freed heap memory stays resident. Chunked training (`use_chunking`) and gradient checkpointing
recompute one chunk / block at a time in the backward pass: each recomputation frees and reallocates
the same activations, but in a heap already cut up by the previous ones, so the heap (and the process's
resident memory) keeps growing: measured 2.4x the peak of one unchunked chunk for 32 chunks, and gradient
checkpointing saving 1.8x instead of 6.7x (benchmarks/bench_context_memory.py).

The fix here: before each chunk (its forward, and its recomputation in the backward pass) and, with
gradient checkpointing, before each block's forward (not its recomputation: the heap fragments in the
forward, and trimming in the backward only made every recomputed block page its buffers in again; see
the note above _checkpointed in model.py), `release()` calls glibc's
`malloc_trim(0)` when the heap holds more than 16 MiB of free memory. That hands the heap's free pages back
to the OS (madvise), so the resident set is what the live tensors need, plus at most those 16 MiB and one
chunk's / block's churn. Cost: pages touched again fault in, about 0.13 s of system time per 2,048-token
chunk of a 64-wide model (T = 65,536: +3.7 s of system time on a ~8 s step); pinning glibc's mmap
threshold instead (MALLOC_MMAP_THRESHOLD_=131072) makes every large buffer a fresh mmap and costs about
3x more. Results are unchanged (bit-identical). It runs only for CPU tensors, only where glibc is found,
and only in chunked training with gradients and in gradient checkpointing; other steps are untouched.

Switch it off with the environment variable ``KAGGLETRAIN_CPU_MALLOC_TRIM=0`` or `set_enabled(False)`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

ENV = "KAGGLETRAIN_CPU_MALLOC_TRIM"

_enabled: Optional[bool] = None   # None: read the environment on first use
_libc = None
_libc_loaded = False
calls = 0                          # how many trims ran (tests, diagnostics)
MIN_FREE = 16 * 2**20              # trim only when the heap holds at least this much free memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_libc():
    global _libc, _libc_loaded
    if not _libc_loaded:
        _libc_loaded = True
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.malloc_trim.restype = ctypes.c_int
                _libc = lib
                try:  # glibc >= 2.33; without it every release() trims
                    lib.mallinfo2.restype = _MallInfo2
                    lib.mallinfo2.argtypes = []
                except AttributeError:
                    pass
            except (OSError, AttributeError):   # musl and others have no malloc_trim
                _libc = None
    return _libc


def available() -> bool:
    """glibc's malloc_trim can be called in this process."""
    return _load_libc() is not None


def enabled() -> bool:
    """Trimming is switched on (environment or `set_enabled`) and available."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    return _enabled and available()


def set_enabled(on: Optional[bool]) -> None:
    """True/False: switch on/off for this process; None: back to the environment variable's choice."""
    global _enabled
    _enabled = None if on is None else bool(on)


def heap_free_bytes() -> Optional[int]:
    """Bytes free inside glibc's main heap (resident unless trimmed), or None where unknown."""
    lib = _load_libc()
    if lib is None or not hasattr(lib, "mallinfo2"):
        return None
    info = lib.mallinfo2()
    return int(info.fordblks)


def release(device_type: str = "cpu", min_free: Optional[int] = None) -> bool:
    """Before a chunk / checkpointed block (CPU only): if the heap holds more than `min_free` (default
    MIN_FREE) free bytes, hand its free pages back to the OS. True if it trimmed."""
    global calls
    if device_type != "cpu" or not enabled():
        return False
    free = heap_free_bytes()
    if free is not None and free < (MIN_FREE if min_free is None else min_free):
        return False
    _libc.malloc_trim(0)
    calls += 1
    return True
