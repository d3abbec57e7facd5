"""The matrix products of a CPU decode step: which library and which operand order.

A decode step multiplies a few activation rows (the batch) by every weight matrix once, so its speed is
set by how a library's small-M kernels stream the weights. Measured on an AMD EPYC VM with torch 2.13
(float32, 2 threads, weights cold in cache; benchmarks/bench_infer_cpu.py for the whole step):

  - batch 1: oneDNN's fused linear (`torch.ops.mkldnn._linear_pointwise`, the op TorchInductor's CPU
    backend emits) streams weights faster than MKL's gemv (F.linear) for every shape here; for the
    65536 x 768 head it is fastest from a [C, V] copy.
  - batch > 1: MKL's small-M sgemm takes a generic, non-AVX2 path on AMD CPUs, and even oneDNN's x W^T
    runs at about a third of peak. Putting the large weight on the left, (W x^T)^T, lets oneDNN's kernel
    block over the weight's rows and is 1.3-1.7x faster again (for the head: 14-18 ms against 23-27 ms
    at batch 8).

`products_for` picks the form; every form computes x W^T for x [B, in] and a weight [out, in] of any
strides (results differ only by summation order), and may return a non-contiguous [B, out].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

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
    """F.linear / addmm: GPUs, half precision, and CPUs without oneDNN."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def add(self, res: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """res + x W^T."""
        return torch.addmm(res, x, w.t())


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


def products_for(batch: int, device: torch.device, dtype: torch.dtype) -> TorchProducts:
    """The product form for a decode step of `batch` rows whose activations and weights have `dtype`."""
    if device.type != "cpu" or dtype != torch.float32 or not onednn_ok():
        return TorchProducts()
    return OneDNNRows() if batch == 1 else OneDNNCols()


def weights_prefer_transposed() -> bool:
    """Whether a CPU decode step streams the FFN key faster stored as [C, 4C] (MKL gemv, no oneDNN here);
    oneDNN wants the parameter's own [4C, C] layout (the column form needs it)."""
    return not onednn_ok()
