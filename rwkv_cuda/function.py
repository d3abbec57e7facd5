"""`wkv_cuda`: the compiled WKV-7 operator as a torch.autograd.Function (conventions of ops/wkv.py)."""

from __future__ import annotations

import torch

from rwkv_cuda.loader import BuildError, load_extension

_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ext():
    ext = load_extension()
    if ext is None:
        from rwkv_cuda.loader import build_info

        raise BuildError(f"the CUDA WKV-7 kernel is unavailable: {build_info()['error']}")
    return ext


def _ready(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels use vector loads)."""
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


class WKV7Function(torch.autograd.Function):
    """Inputs already prepared by `wkv_cuda`: same shape, contiguous, aligned, r's dtype (w may be float32)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        # Only called when a gradient is needed (wkv_cuda runs inference without autograd), so always save
        # the checkpoints and sa.
        y, sT, ckpt, sa = _ext().forward(r, w, k, v, a, b, s0, True)
        ctx.save_for_backward(r, w, k, v, a, b, ckpt, sa)
        ctx.has_s0 = s0 is not None
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, ckpt, sa = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else _ready(dy.to(r.dtype))
        dsT = None if dsT is None else _ready(dsT.float())
        need_ds0 = ctx.has_s0 and ctx.needs_input_grad[6]
        dr, dw, dk, dv, da, db, ds0 = _ext().backward(r, w, k, v, a, b, dy, dsT, ckpt, sa, need_ds0)
        return dr, dw, dk, dv, da, db, (ds0 if need_ds0 else None)


def wkv_cuda(r, w, k, v, a, b, state=None):
    """WKV-7 on the GPU. r, w, k, v, a, b: [B, T, H, N] (float32/float16/bfloat16; w may be float32 with
    half-precision rest); state: optional [B, H, N, N] float32 [value, key]. Returns (y in r's dtype,
    final state float32). Differentiable in all inputs and the initial state."""
    if r.dim() != 4:
        raise ValueError(f"wkv_cuda: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    for name, t in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if t.shape != r.shape:
            raise ValueError(f"wkv_cuda: {name} has shape {tuple(t.shape)}, expected {tuple(r.shape)}")
    if not r.is_cuda:
        raise ValueError("wkv_cuda needs CUDA tensors")
    if r.dtype not in _IO_DTYPES:
        raise ValueError(f"wkv_cuda supports float32/float16/bfloat16 inputs, got {r.dtype}")
    B, T, H, N = r.shape
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv_cuda: state must be [B, H, N, N] = {(B, H, N, N)}, got {tuple(state.shape)}")
    ext = _ext()
    out_dtype = r.dtype
    io = out_dtype
    if io == torch.bfloat16 and not ext.supported(N, "bfloat16"):
        io = torch.float32  # pre-sm_80 GPU: bf16 kernels are not compiled; run in float32
    if not ext.supported(N, str(io).replace("torch.", "")):
        raise ValueError(f"wkv_cuda: no kernel for head size {N} ({io})")
    if T == 0:
        s = state.float().clone() if state is not None else r.new_zeros(B, H, N, N, dtype=torch.float32)
        return r.new_empty(B, 0, H, N), s
    r_, k_, v_, a_, b_ = (_ready(t.to(io)) for t in (r, k, v, a, b))
    w_ = _ready(w if w.dtype in (io, torch.float32) else w.to(io))
    s_ = None if state is None else _ready(state.float())
    inputs = (r_, w_, k_, v_, a_, b_, s_)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, sT = WKV7Function.apply(*inputs)
    else:  # inference: skip the checkpoints the backward would need
        y, sT, _, _ = ext.forward(r_, w_, k_, v_, a_, b_, s_, False)
    return y.to(out_dtype), sT
