"""Compiled WKV-7 kernel for kaggletrain (CUDA sources + JIT loader).

    from rwkv_cuda import kernel_available, wkv_cuda
    if kernel_available(64):
        y, final_state = wkv_cuda(r, w, k, v, a, b, state)

Importing this package is cheap: nothing is compiled (or even imported from torch) until
`kernel_available` or `wkv_cuda` is first called. See loader.py for the build cache, lock, log and
fallback, function.py for the autograd wrapper, emulated.py for the CPU-emulated build (tests), and for the
algorithms wkv7_kernels.cuh, wkv7_chunk.cuh (chunk-parallel backward sums) and wkv7_scan.cuh (the forward and
the backward recursion in chunks on tensor cores).
"""

from rwkv_cuda.loader import HEAD_SIZES, build_info, kernel_available, load_extension

__all__ = ["kernel_available", "wkv_cuda", "load_extension", "build_info", "HEAD_SIZES"]


def wkv_cuda(r, w, k, v, a, b, state=None, rehearsal=False):
    """WKV-7 forward with autograd on the GPU; see rwkv_cuda.function.wkv_cuda."""
    from rwkv_cuda.function import wkv_cuda as _wkv_cuda

    return _wkv_cuda(r, w, k, v, a, b, state, rehearsal=rehearsal)
