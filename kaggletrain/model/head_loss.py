"""The language-model head, cross-entropy and L2Wrap in one pass that never keeps the logits.

The logits of a training step are its largest tensors: at 32k tokens x a 50k vocabulary, 3.3 GB in bf16,
plus 6.6 GB of float32 log-probabilities kept for the backward. Here the tokens go through in slices.
Each slice's logits give its loss and, right away, its gradients for the hidden states and the head weight
(the loss is a scalar, so the backward only has to scale them). The peak holds one slice's logits.

Same arithmetic as head -> float32 log-softmax -> mean NLL over the targets, plus the official L2Wrap's
extra gradient (factor x the largest logit, at that logit, for every token).
"""

from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100
SLICE_BYTES = 1 << 28  # float32 log-probabilities per slice (256 MiB)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dimension, float32 from fp16/bf16 logits (on CUDA, fp16 logits go to float32 in
    one kernel; ATen converts bf16 logits to float32 first); float32/float64 logits keep their dtype. Call it
    outside autocast."""
    half = logits.dtype in (torch.float16, torch.bfloat16)
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32 if half else None)


def slice_grad(logits: torch.Tensor, tt: torch.Tensor, okf: torch.Tensor):
    """One slice's summed NLL over the kept rows (`okf` 1/0, float32 or float64), the gradient of that sum
    (p - onehot on kept rows, p on ignored ones; in the logits' dtype) and each row's largest logit and its
    column (L2Wrap). The same arithmetic as the eager path in HeadLoss, written for torch.compile, which fuses
    it into a reduction pass (max, argmax, sum of exp) and one pointwise pass that writes the gradient:
    half-precision logits are read three times and the gradient written once, where the eager path makes
    float32 log-probabilities and several passes over them."""
    x = logits.to(okf.dtype)
    top, where = x.max(dim=-1, keepdim=True)
    e = torch.exp(x - top)
    s = e.sum(dim=-1, keepdim=True)
    nll = ((top + torch.log(s) - x.gather(1, tt)).squeeze(1) * okf).sum()
    onehot = torch.arange(x.shape[1], device=x.device)[None] == tt
    g = e / s - onehot.to(x.dtype) * okf[:, None]  # the target column's p - 1 formed in float32, rounded once
    return nll, g.to(logits.dtype), top.squeeze(1), where.squeeze(1)


_COMPILED: dict = {}  # backend -> slice_grad compiled with it


def _compiled_slice(backend: str):
    fn = _COMPILED.get(backend)
    if fn is None:  # on first use: importing the module must not start inductor
        fn = _COMPILED[backend] = torch.compile(slice_grad, fullgraph=True, backend=backend)
    return fn


class HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype, l2_factor, count, backend, grad_mode):
        N, V = h.shape[0], weight.shape[0]
        # (needs_input_grad says True under torch.no_grad too: the caller's grad mode decides, e.g. evaluation)
        need_grad = grad_mode and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        with torch.autocast(device_type=h.device.type, enabled=False):
            hb, wb = h.to(dtype), weight.to(dtype)
            valid = targets != IGNORE_INDEX
            scale = 1.0 / max(count, 1)
            acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
            loss = torch.zeros((), dtype=acc, device=h.device)
            dh = torch.empty_like(h) if need_grad else None
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
            dw_l2 = torch.zeros_like(dw) if need_grad and l2_factor is not None else None
            step = max(1, SLICE_BYTES // (V * 4))
            for i in range(0, N, step):
                hs, t, ok = hb[i:i + step], targets[i:i + step], valid[i:i + step]
                logits = hs @ wb.t()
                tt = t.clamp_min(0)[:, None]
                if backend is not None and need_grad:
                    okf = ok.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
                    nll, gb, top, where = _compiled_slice(backend)(logits, tt, okf)
                    loss += nll.to(acc)
                else:
                    logp = log_probs(logits)
                    okf = ok.to(logp.dtype)
                    logp_t = logp.gather(1, tt).squeeze(1)
                    loss -= (logp_t * okf).sum().to(acc)
                    if not need_grad:
                        continue
                    # d(mean NLL)/d(logits) = (softmax - onehot) / count on target rows, 0 on ignored ones. The
                    # 1/count and the 0/1 row mask go on the [n, C] sides of the two products (dh rows, the rows
                    # of h that dw sums over) and on the summed dw at the end -- never a pass over [n, V], no
                    # sync. Half-precision logits: softmax straight to their dtype (computed in float32 inside,
                    # one read and one write of [n, V]) instead of exp, subtract and cast passes over float32
                    # log-probabilities; the target column, p - 1, is formed in float32 and rounded once.
                    if logits.dtype != logp.dtype:
                        del logp  # freed before the softmax is allocated
                        gb = torch.softmax(logits, dim=-1)
                    else:
                        gb = logp.exp_()
                    gb.scatter_(1, tt, (logp_t.exp() - okf)[:, None].to(gb.dtype))
                    top, where = logits.max(dim=-1) if l2_factor is not None else (None, None)
                gb = gb.to(dtype)
                mask = okf.to(acc)[:, None]
                dhs = (gb @ wb).to(acc) * (mask * scale)
                dw += (gb.t() @ (hs * mask.to(dtype))).to(acc)
                if l2_factor is not None:  # L2Wrap: + factor * max logit at the argmax, every token
                    l2 = (top.to(acc) * l2_factor)[:, None]
                    dhs += l2 * wb[where].to(acc)
                    dw_l2.index_add_(0, where, l2 * hs.to(acc))
                dh[i:i + step] = dhs.to(dh.dtype)
        if need_grad:
            dw.mul_(scale)
            if dw_l2 is not None:
                dw += dw_l2
            ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return (loss * scale).to(torch.float32 if acc == torch.float32 else acc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad.to(dh.dtype), (dw * grad.to(dw.dtype)).to(ctx.weight_dtype), None, None, None, None, None, None


def head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
              l2_factor: Optional[float] = None, compile_backend: Optional[str] = None) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of `h @ weight.T` ([N, C] x [V, C]) against `targets` ([N], IGNORE_INDEX skipped),
    the product in `dtype`; L2Wrap's gradient when `l2_factor` is given. `compile_backend` (e.g. "inductor",
    under `train.compile`): each slice's softmax, loss and gradient go through torch.compile (`slice_grad`).
    Under torch.no_grad (evaluation) only the loss is formed, slice by slice: no [N, V] logits either.
    Returns (loss, number of targets)."""
    count = int((targets != IGNORE_INDEX).sum())
    grad_mode = torch.is_grad_enabled()
    return HeadLoss.apply(h, weight, targets, dtype, l2_factor if grad_mode else None, count, compile_backend,
                          grad_mode), count
