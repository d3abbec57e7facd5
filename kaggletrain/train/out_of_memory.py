"""Recognising an out-of-memory error, on the GPU or the CPU.

CUDA's allocator raises `torch.OutOfMemoryError`. The CPU allocator raises a plain RuntimeError
("DefaultCPUAllocator: can't allocate memory"), Python code (numpy, the data path) raises MemoryError, and a
failed mmap (safetensors reading a checkpoint) an error carrying ENOMEM ("Cannot allocate memory (os error 12)"):
one test for all of them, so that the dry run's batch search and the one-line errors work on a laptop as on a GPU.
Needs no torch import of its own: the CLI asks it about any error, also one raised before torch was imported.
"""

from __future__ import annotations

import errno
import os
import sys

# Texts of allocations that failed: the CPU allocator's (both spellings torch has used), CUDA errors raised
# outside the caching allocator (cuBLAS workspaces, kernels' own buffers), and ENOMEM as Rust libraries
# (safetensors) and C libraries word it.
_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
             "CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
             os.strerror(errno.ENOMEM), f"os error {errno.ENOMEM})")


def is_out_of_memory(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
        return True
    if isinstance(e, OSError) and e.errno == errno.ENOMEM:
        return True
    # RuntimeError: torch's; SafetensorError (an Exception of its own): a checkpoint's mmap or write.
    texty = isinstance(e, (RuntimeError, OSError)) or type(e).__name__ == "SafetensorError"
    return texty and any(m in str(e) for m in _MESSAGES)


def reading(path, e: BaseException) -> MemoryError:
    """The error to raise when reading `path` ran out of memory, in place of a file reader's own (which would
    call a sound file truncated or corrupt)."""
    from kaggletrain.bench.common import fmt_bytes  # (imports torch: the readers that call this have it loaded)

    try:
        size_text = f" ({fmt_bytes(os.path.getsize(path))})"
    except OSError:
        size_text = ""
    return MemoryError(f"out of memory reading {path}{size_text}: {describe(e)}")


def describe(e: BaseException) -> str:
    """The error's first non-empty line, shortened (torch's messages run to a paragraph)."""
    for line in str(e).splitlines():
        line = line.strip()
        if line:
            # The CPU allocator's message starts with a C++ assertion: "[enforce fail at alloc_cpu.cpp:127] err == 0."
            line = line[max(0, line.find("DefaultCPUAllocator")):]
            return line[:240]
    return type(e).__name__
