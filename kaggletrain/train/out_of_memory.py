"""Recognising an out-of-memory error, on the GPU or the CPU.

CUDA's allocator raises `torch.OutOfMemoryError`. The CPU allocator raises a plain RuntimeError
("DefaultCPUAllocator: can't allocate memory"), and Python code (numpy, the data path) raises MemoryError:
one test for all three, so that the dry run's batch search and the trainer's one-line error work on a
laptop as on a GPU.
"""

from __future__ import annotations

import torch

# RuntimeError texts of allocations that failed: the CPU allocator's (both spellings torch has used), and
# CUDA errors raised outside the caching allocator (cuBLAS workspaces, kernels' own buffers).
_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
             "CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _MESSAGES)


def describe(e: BaseException) -> str:
    """The error's first non-empty line, shortened (torch's messages run to a paragraph)."""
    for line in str(e).splitlines():
        line = line.strip()
        if line:
            # The CPU allocator's message starts with a C++ assertion: "[enforce fail at alloc_cpu.cpp:127] err == 0."
            line = line[max(0, line.find("DefaultCPUAllocator")):]
            return line[:240]
    return type(e).__name__
