"""The one dispatch point for the WKV-7 operator.

    y, state = wkv(r, w, k, v, a, b, state=None, impl="auto")

r, w, k, v, a, b: [B, T, H, N] (float32, float16, bfloat16 or float64). `w` is the raw decay logit
(decay computed in float32 inside). `a` is the in-context "a_in" (= -kk) and `b` is "b_in" (= kk * a).
state: optional [B, H, N, N] float32 initial state, layout [batch, head, value, key].
Returns y in the dtype of r and the final state in float32 (float64 for float64 inputs).

Implementations:
  "sequential": ops/wkv_reference.py, the plain recurrence (reference; slow).
  "chunked":    ops/wkv_chunked.py, chunk-parallel PyTorch with autograd (CPU and GPU fallback).
  "cuda":       rwkv_cuda/, the compiled kernel (GPU only; falls back to "chunked" if it can't load). With
                KAGGLETRAIN_WKV_EMULATE=1, CPU tensors run its sources through the CPU emulator (slow; tests).
  "auto":       cuda on GPU when the kernel loads, else chunked; sequential for single tokens.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from kaggletrain.ops.decay import decay_log
from kaggletrain.ops.wkv_reference import wkv_sequential

IMPLS = ("auto", "sequential", "chunked", "cuda")

__all__ = ["wkv", "decay_log", "IMPLS", "resolve_impl"]


def _chunked(*args, **kwargs):
    from kaggletrain.ops.wkv_chunked import wkv_chunked

    return wkv_chunked(*args, **kwargs)


def _cuda_available_for(r: torch.Tensor) -> bool:
    if r.dtype == torch.float64:
        return False
    if r.device.type == "cpu":  # the kernels' sources through the CPU emulator: tests of the CUDA path only
        return _emulating() and int(r.shape[-1]) in _kernel_head_sizes()
    return r.is_cuda and _kernel_loads(int(r.shape[-1]))


def _kernel_head_sizes() -> tuple:
    from rwkv_cuda.loader import HEAD_SIZES

    return HEAD_SIZES


@torch.compiler.assume_constant_result
def _emulating() -> bool:
    """KAGGLETRAIN_WKV_EMULATE=1 (rwkv_cuda/emulated.py): CPU tensors take the "cuda" path, emulated."""
    try:
        from rwkv_cuda.emulated import enabled
    except ImportError:
        return False
    return enabled()


@torch.compiler.assume_constant_result
def _kernel_loads(head_size: int) -> bool:
    """Whether the CUDA kernel builds/loads for this head size; a constant while torch.compile traces (the
    loader's file lock and build cache are nothing for it to trace)."""
    try:
        from rwkv_cuda import kernel_available
    except ImportError:
        return False
    return kernel_available(head_size)


_kernel_rehearsal = []  # non-empty inside rehearse_kernel_operators()


@contextlib.contextmanager
def rehearse_kernel_operators():
    """Inside: "auto" and "cuda" resolve to the CUDA kernel's operators for any device, with neither the
    kernel nor a GPU present. Only for fake tensors (train/memory_rehearsal.py), whose operator calls run
    the operators' fake functions: shapes and dtypes of what the kernel returns and keeps for backward."""
    _kernel_rehearsal.append(True)
    try:
        yield
    finally:
        _kernel_rehearsal.pop()


def kernel_applies(impl: str, head_size: int) -> bool:
    """Whether a GPU would run the WKV as the CUDA kernel: `impl` (model.wkv_impl) auto or cuda, and a kernel built
    for this head size (the question the rehearsal, and the dry run's warnings about the GPU, ask)."""
    return impl in ("auto", "cuda") and int(head_size) in _kernel_head_sizes()


def resolve_impl(impl: str, r: torch.Tensor) -> str:
    """Which implementation `wkv(..., impl=impl)` will actually run for inputs like `r`."""
    if impl not in IMPLS:
        raise ValueError(f"wkv impl must be one of {IMPLS}, got {impl!r}")
    if _kernel_rehearsal and r.shape[1] > 1 and r.dtype != torch.float64 and kernel_applies(impl, r.shape[-1]):
        return "cuda"
    if impl == "cuda":
        if _cuda_available_for(r):
            return "cuda"
        if r.device.type == "cpu" and r.dtype != torch.float64 and not _emulating():
            _warn_no_gpu_for_cuda()  # (on a GPU the loader's own warning says why the kernel is not there)
        return "chunked"
    if impl != "auto":
        return impl
    if r.shape[1] == 1:
        return "sequential"
    return "cuda" if _cuda_available_for(r) else "chunked"


_warned_no_gpu = []


def _warn_no_gpu_for_cuda() -> None:
    """Once per process: impl "cuda" was asked for explicitly, but the tensors are on the CPU."""
    if not _warned_no_gpu:
        _warned_no_gpu.append(True)
        warnings.warn("WKV implementation 'cuda' (model.wkv_impl) needs a CUDA GPU, but the model runs on the CPU: "
                      "using the PyTorch chunked WKV instead ('auto' picks the kernel on a GPU and this on a CPU)",
                      RuntimeWarning, stacklevel=3)


def wkv(r, w, k, v, a, b, state=None, impl: str = "auto"):
    # The recurrence manages its own precision (float32 state and accumulation): never under autocast.
    with torch.autocast(device_type=r.device.type, enabled=False):
        return _dispatch(r, w, k, v, a, b, state, impl)


def _dispatch(r, w, k, v, a, b, state, impl):
    which = resolve_impl(impl, r)
    if which == "sequential":
        return wkv_sequential(r, w, k, v, a, b, state)
    if which == "cuda":
        from rwkv_cuda import wkv_cuda

        return wkv_cuda(r, w, k, v, a, b, state, rehearsal=bool(_kernel_rehearsal))
    return _chunked(r, w, k, v, a, b, state)
