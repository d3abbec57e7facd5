"""The matrix products of a CPU decode step: which code computes x W^T.

A decode step multiplies a few activation rows (the batch) by every weight matrix once, so its speed is
set by how well a small-M product streams the weights. Measured on an AMD EPYC VM with torch 2.13
(float32, 2 threads, weights cold in cache; benchmarks/bench_infer_cpu.py for the whole step):

  - the compiled kernel (`kt_linear`, decode_cpu.cpp, loaded by cpu_kernel.py) is fastest for every
    product of the step at batch 1 and at batch 8 (KernelProducts has the numbers);
  - without it, oneDNN's fused linear (`torch.ops.mkldnn._linear_pointwise`, the op TorchInductor's CPU
    backend emits) beats MKL: x W^T at batch 1, and at batch > 1 the column form (W x^T)^T, which lets
    oneDNN block over the weight's rows (1.3-1.7x faster than x W^T; MKL's small-M sgemm takes a
    generic, non-AVX2 path on AMD CPUs);
  - without either, F.linear.

`products_for` picks the form; every form computes x W^T for x [B, in] and a weight [out, in] of any
strides (results differ only by summation order), and may return a non-contiguous [B, out].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kaggletrain.infer.cpu_kernel import linear_unchecked, step_kernel

_ONEDNN: Optional[bool] = None


def onednn_ok() -> bool:
    """Whether oneDNN's fused linear exists and gives x W^T for both operand orders and for strided
    weights; probed once per process."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            lp = torch.ops.mkldnn._linear_pointwise
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
            ref = x @ w.t()
            _ONEDNN = bool(torch.backends.mkldnn.is_available()
                           and torch.allclose(lp(x, w, None, "none", [], ""), ref, atol=1e-5)
                           and torch.allclose(lp(x, w.t().contiguous().t(), None, "none", [], ""), ref, atol=1e-5)
                           and torch.allclose(lp(w, x, None, "none", [], "").t(), ref, atol=1e-5))
        except Exception:  # an op missing from this torch build, or a build without oneDNN
            _ONEDNN = False
    return _ONEDNN


class TorchProducts:
    """F.linear / addmm: GPUs, half precision, and CPUs with neither the compiled kernel nor oneDNN."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def add(self, res: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """res + x W^T."""
        return torch.addmm(res, x, w.t())

    def small(self, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x W^T (+ bias) for the LoRA products (w [out, in], often a transposed view). oneDNN's fixed
        cost per call (~40 us) exceeds these products' work, so both oneDNN forms keep MKL for them."""
        return F.linear(x, w) if bias is None else torch.addmm(bias, x, w.t())


class OneDNNRows(TorchProducts):
    """x W^T through oneDNN (batch 1 on a CPU)."""

    def __call__(self, x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    def add(self, res, x, w):
        return res + self(x, w)


class OneDNNCols(OneDNNRows):
    """(W x^T)^T through oneDNN: the weight is the left operand (batch > 1 on a CPU). Returns a transposed
    view ([B, out] with strides (1, B)): callers that need rows contiguous copy (a 768 x 8 copy costs about
    30 us, the head's 65536 x 8 about 2 ms, so the head's logits stay a view)."""

    def __call__(self, x, w):
        return torch.ops.mkldnn._linear_pointwise(w, x, None, "none", [], "").t()


class KernelProducts(TorchProducts):
    """The compiled small-batch product (`kt_linear` in decode_cpu.cpp), `fallback`'s form for weights it
    can't take (strided). Measured per product on the benchmark VM (float32, 2 threads, cold weights)
    against the best oneDNN form: batch 1, 768 x 768 0.14 against 0.25 ms, 3072 x 768 0.52 against 0.61,
    768 x 3072 0.42 against 0.54; batch 8 (with prefetch), 0.22 against 0.23-0.33, 0.76 against
    0.83-1.25, 0.73 against 1.06-1.51, and the 65536 x 768 head 16.4 against 16.5; the LoRA products
    2-3x faster than MKL at either batch (no per-call library overhead)."""

    def __init__(self, lib, fallback: TorchProducts):
        self.lib, self.fallback = lib, fallback

    def _run(self, x, w, bias, add):
        return linear_unchecked(self.lib, x.contiguous(), w, bias, add)

    def __call__(self, x, w):
        return self._run(x, w, None, None) if w.is_contiguous() else self.fallback(x, w)

    def add(self, res, x, w):
        if w.is_contiguous() and res.is_contiguous():
            return self._run(x, w, None, res)
        return self.fallback.add(res, x, w)

    def small(self, x, w, bias=None):
        if w.is_contiguous() and (bias is None or bias.is_contiguous()):
            return self._run(x, w, bias, None)
        return self.fallback.small(x, w, bias)


def products_for(batch: int, device: torch.device, dtype: torch.dtype) -> TorchProducts:
    """The product form for a decode step of `batch` rows whose activations and weights have `dtype`."""
    if device.type != "cpu" or dtype != torch.float32:
        return TorchProducts()
    base = (OneDNNRows() if batch == 1 else OneDNNCols()) if onednn_ok() else TorchProducts()
    lib = step_kernel()
    return KernelProducts(lib, base) if lib is not None else base


def weights_prefer_transposed() -> bool:
    """Whether a CPU decode step streams the FFN key faster stored as [C, 4C] (MKL gemv: neither oneDNN
    nor the compiled kernel here); both of those want the parameter's own [4C, C] layout."""
    return not onednn_ok() and step_kernel(warn=False) is None
