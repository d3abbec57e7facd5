"""`wkv_cuda`: the compiled WKV-7 kernel with autograd (conventions of ops/wkv.py): a torch.autograd.Function
in eager mode, a pair of torch custom operators while torch.compile traces. CPU tensors run the same kernels
through the emulator when KAGGLETRAIN_WKV_EMULATE=1 (emulated.py: tests of this path without a GPU)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rwkv_cuda import emulated
from rwkv_cuda.loader import BuildError, load_extension

_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ext():
    ext = load_extension()
    if ext is None:
        from rwkv_cuda.loader import build_info

        raise BuildError(f"the CUDA WKV-7 kernel is unavailable: {build_info()['error']}")
    return ext


def _ext_on(device_type: str):
    """The module that runs the kernels on this device type: the CUDA build, or the emulated one for "cpu"."""
    return emulated.load_emulated() if device_type == "cpu" else _ext()


def _ready(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels use vector loads)."""
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _ext_forward(r, w, k, v, a, b, s0, save):
    """The extension's forward on ready inputs: [y, final state, checkpoints, sa] (the last two empty unless
    `save`)."""
    return _ext_on(r.device.type).forward(*(_ready(t) for t in (r, w, k, v, a, b)), None if s0 is None else _ready(s0), save)


def _ext_backward(r, w, k, v, a, b, dy, dsT, ckpt, sa, need_ds0):
    """The extension's backward on ready inputs: [dr, dw, dk, dv, da, db, ds0] (ds0 empty unless `need_ds0`)."""
    return _ext_on(r.device.type).backward(*(_ready(t) for t in (r, w, k, v, a, b, dy)), None if dsT is None else _ready(dsT),
                           ckpt, sa, need_ds0)


def _input_grads(ctx, dy, dsT, backward):
    """Both routes' backward (saved: r, w, k, v, a, b, ckpt, sa): `backward` is the extension call or the
    backward operator. Returns the gradients of r, w, k, v, a, b and the initial state."""
    r, w, k, v, a, b, ckpt, sa = ctx.saved_tensors
    dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype)
    dsT = None if dsT is None else dsT.float()
    need_ds0 = ctx.has_s0 and ctx.needs_input_grad[6]
    dr, dw, dk, dv, da, db, ds0 = backward(r, w, k, v, a, b, dy, dsT, ckpt, sa, need_ds0)
    return dr, dw, dk, dv, da, db, (ds0 if need_ds0 else None)


# The kernel as two torch custom operators (torch.library): torch.compile traces a block straight through
# them (their fake functions give the output shapes) instead of breaking the graph at an opaque pybind call,
# and autograd reaches the backward operator through register_autograd.
CKPT_LEN = 16  # == wkv7::kCkptLen: the forward saves the state every CKPT_LEN tokens (and the final one)


@torch.library.custom_op("kaggletrain::wkv7_forward", mutates_args=())
def wkv7_forward(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Optional[Tensor],
                 save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, final state, state checkpoints, sa); the last two are empty unless `save` (training)."""
    return tuple(_ext_forward(r, w, k, v, a, b, s0, save))


@wkv7_forward.register_fake
def _(r, w, k, v, a, b, s0, save):
    B, T, H, N = r.shape
    nck = (T + CKPT_LEN - 1) // CKPT_LEN + 1
    f32 = torch.float32
    return (torch.empty_like(r, memory_format=torch.contiguous_format), r.new_empty((B, H, N, N), dtype=f32),
            r.new_empty((B, H, nck, N, N) if save else (0,), dtype=f32),
            r.new_empty((B, T, H, N) if save else (0,), dtype=f32))


@torch.library.custom_op("kaggletrain::wkv7_backward", mutates_args=())
def wkv7_backward(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, dy: Tensor,
                  dsT: Optional[Tensor], ckpt: Tensor, sa: Tensor, need_ds0: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dr, dw, dk, dv, da, db, ds0); ds0 is empty unless `need_ds0`."""
    return tuple(_ext_backward(r, w, k, v, a, b, dy, dsT, ckpt, sa, need_ds0))


@wkv7_backward.register_fake
def _(r, w, k, v, a, b, dy, dsT, ckpt, sa, need_ds0):
    B, T, H, N = r.shape
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (r, w, k, v, a, b))
    return grads + (r.new_empty((B, H, N, N) if need_ds0 else (0,), dtype=torch.float32),)


def _setup_context(ctx, inputs, output):
    r, w, k, v, a, b, s0, save = inputs
    _, _, ckpt, sa = output
    ctx.save_for_backward(r, w, k, v, a, b, ckpt, sa)
    ctx.has_s0 = s0 is not None


def _backward(ctx, dy, dsT, _dckpt, _dsa):
    return (*_input_grads(ctx, dy, dsT, torch.ops.kaggletrain.wkv7_backward), None)


wkv7_forward.register_autograd(_backward, setup_context=_setup_context)


class WKV7Function(torch.autograd.Function):
    """Eager mode's route to the kernel (torch.compile's is the custom operators above): the same extension
    calls with about half the per-call CPU cost of an operator call (283 vs 546 us per forward + backward on
    a 2-core VM), which a kernel benchmark timed with CUDA events would otherwise count. Inputs already
    prepared by `wkv_cuda`."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        y, sT, ckpt, sa = _ext_forward(r, w, k, v, a, b, s0, True)
        ctx.save_for_backward(r, w, k, v, a, b, ckpt, sa)
        ctx.has_s0 = s0 is not None
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dsT):
        return _input_grads(ctx, dy, dsT, _ext_backward)


@torch.compiler.assume_constant_result
def _io_dtype_name(N: int, dtype_name: str, device_type: str) -> str:
    """The dtype the kernel runs for r's dtype ("" when none): a constant while torch.compile traces."""
    ext = _ext_on(device_type)
    if dtype_name == "bfloat16" and not ext.supported(N, "bfloat16"):
        dtype_name = "float32"  # pre-sm_80 GPU: bf16 kernels are not compiled; run in float32
    return dtype_name if ext.supported(N, dtype_name) else ""


def wkv_cuda(r, w, k, v, a, b, state=None, rehearsal=False):
    """WKV-7 on the GPU. r, w, k, v, a, b: [B, T, H, N] (float32/float16/bfloat16; w may be float32 with
    half-precision rest); state: optional [B, H, N, N] float32 [value, key]. Returns (y in r's dtype,
    final state float32). Differentiable in all inputs and the initial state. `rehearsal`: fake tensors
    (kaggletrain/train/memory_rehearsal.py) go through the custom operators, whose fake functions need
    neither the extension nor a GPU."""
    if r.dim() != 4:
        raise ValueError(f"wkv_cuda: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    for name, t in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if t.shape != r.shape:
            raise ValueError(f"wkv_cuda: {name} has shape {tuple(t.shape)}, expected {tuple(r.shape)}")
    if not (rehearsal or r.is_cuda or (r.device.type == "cpu" and emulated.enabled())):
        raise ValueError(f"wkv_cuda needs CUDA tensors (or CPU tensors with {emulated.ENV}=1), got {r.device}")
    if r.dtype not in _IO_DTYPES:
        raise ValueError(f"wkv_cuda supports float32/float16/bfloat16 inputs, got {r.dtype}")
    B, T, H, N = r.shape
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv_cuda: state must be [B, H, N, N] = {(B, H, N, N)}, got {tuple(state.shape)}")
    out_dtype = r.dtype
    io_name = str(out_dtype).replace("torch.", "") if rehearsal else \
        _io_dtype_name(N, str(out_dtype).replace("torch.", ""), r.device.type)
    if not io_name:
        raise ValueError(f"wkv_cuda: no kernel for head size {N} ({out_dtype})")
    io = getattr(torch, io_name)
    if T == 0:
        s = state.float().clone() if state is not None else r.new_zeros(B, H, N, N, dtype=torch.float32)
        return r.new_empty(B, 0, H, N), s
    r_, k_, v_, a_, b_ = (t.to(io) for t in (r, k, v, a, b))
    w_ = w if w.dtype in (io, torch.float32) else w.to(io)
    s_ = None if state is None else state.float()
    # Inference (no gradient needed) skips the checkpoints the backward would need.
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (r_, w_, k_, v_, a_, b_, s_))
    if torch.compiler.is_compiling() or rehearsal:
        y, sT, _, _ = torch.ops.kaggletrain.wkv7_forward(r_, w_, k_, v_, a_, b_, s_, save)
    elif save:
        y, sT = WKV7Function.apply(r_, w_, k_, v_, a_, b_, s_)
    else:
        y, sT, _, _ = _ext_forward(r_, w_, k_, v_, a_, b_, s_, False)
    return y.to(out_dtype), sT
