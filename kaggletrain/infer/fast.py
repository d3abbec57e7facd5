"""A lean one-token decode step for RWKV-7 blocks (generation's hot loop).

`RWKVModel.forward` on one token runs the general code (masks, chunk splits, dtype routing, the WKV
dispatch), about 200 tensor operations per layer. At batch 1 on a CPU the weights are read from memory
once per token anyway, so those small operations are a large share of the step time. `DecodeStep` runs
the same equations (spec section 1, RNN form) with about 45 operations per layer, reading the model's own
parameters (copies: the six [C] token-shift mixes stacked into one [6, 1, C] tensor, and at batch 1 on a
CPU a [C, V] transpose of the head, see `DecodeStep._logits`):

  - the six token-shift mixes in one addcmul; LoRA biases folded into addmm; the value residual as lerp;
  - the WKV step in one pass over the state on a CPU (a small compiled kernel,
    kaggletrain/infer/cpu_kernel.py), else in four passes of PyTorch ops (see `_Layer.step`);
  - residual adds folded into the output projections;
  - float32 weight products on a CPU through a compiled small-batch kernel, else oneDNN in the operand
    order that suits the batch size (kaggletrain/infer/cpu_linear.py).

Attention blocks (hybrids) use the model's own block code. Rows whose `attention_mask` is 0 keep their
previous state exactly (torch.where), as in the model. Results equal the model's to float rounding
(tests/test_generate.py checks this against `RWKVModel.forward`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kaggletrain.infer.cpu_kernel import step_kernel, supports, wkv7_step_unchecked
from kaggletrain.infer.cpu_linear import KernelProducts, OneDNNCols, OneDNNRows, TorchProducts, products_for
from kaggletrain.infer.runner import head_logits
from kaggletrain.model.state import ModelState
from kaggletrain.ops.decay import DECAY_SCALE


def _flat(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(-1)


class _Layer:
    """References to one RWKV-7 block's parameters in the shapes the step uses."""

    def __init__(self, blk, lora_copies: bool = False):
        att, ffn = blk.att, blk.ffn
        self.first = att.first_rwkv
        self.H, self.N = att.n_head, att.head_size
        self.ln1, self.ln2 = blk.ln1, blk.ln2
        # ln_x runs in float32 (as the model does); its affine parameters must match that dtype.
        self.lnx_w, self.lnx_b, self.lnx_eps = att.ln_x.weight.float(), att.ln_x.bias.float(), att.ln_x.eps
        self.half = att.w0.dtype in (torch.float16, torch.bfloat16)
        # Order r, k, w, a, v, g: mixes[2:6] are the LoRA inputs.
        self.mix = torch.cat([att.x_r, att.x_k, att.x_w, att.x_a, att.x_v, att.x_g], 0).detach()  # [6, 1, C]
        self.Wr, self.Wk, self.Wv, self.Wo = (att.receptance.weight, att.key.weight, att.value.weight,
                                              att.output.weight)
        # LoRA matrices as [out, in] (F.linear's layout): views, or contiguous copies for the compiled
        # product (lora_copies; 0.9 MB per layer at C=768).
        t = (lambda p: p.detach().t().contiguous()) if lora_copies else (lambda p: p.t())  # noqa: E731
        self.w0, self.w1, self.w2 = _flat(att.w0), t(att.w1), t(att.w2)
        self.a0, self.a1, self.a2 = _flat(att.a0), t(att.a1), t(att.a2)
        self.v0, self.v1, self.v2 = _flat(att.v0), t(att.v1), t(att.v2)
        self.g1, self.g2 = t(att.g1), t(att.g2)
        self.k_k, self.k_a, self.r_k = _flat(att.k_k), _flat(att.k_a), _flat(att.r_k)
        self.one_minus_k_a = (1 - self.k_a).detach()
        self.f_mix = _flat(ffn.x_k)
        self.Wfk, self.Wfv = ffn.key.weight, ffn.value.weight

    def step(self, x, v_first, att_shift, S, ffn_shift, mm: TorchProducts, kernel=None):
        """x [B, C] residual stream; S [B, H, N, N] float32. Returns x, v_first, (att_shift, S, ffn_shift).
        mm: the weight products' form (kaggletrain/infer/cpu_linear.py); kernel: the loaded CPU WKV
        step library (kaggletrain/infer/cpu_kernel.py) or None for PyTorch ops."""
        B, C = x.shape
        H, N = self.H, self.N
        h = self.ln1(x)
        m = torch.addcmul(h, att_shift.to(h.dtype) - h, self.mix)  # [6, B, C]: xr, xk, xw, xa, xv, xg
        xr, xk, xw, xa, xv, xg = m.unbind(0)
        r = mm(xr, self.Wr).contiguous()  # contiguous rows for the per-head views below
        k = mm(xk, self.Wk).contiguous()
        v = mm(xv, self.Wv).contiguous()
        lora = mm.small
        if self.half:  # the decay logit is summed in float32 (spec pitfalls: decay precision)
            w = self.w0.float() + lora(torch.tanh(lora(xw, self.w1)), self.w2).float()
        else:
            w = lora(torch.tanh(lora(xw, self.w1)), self.w2, self.w0)
        a = torch.sigmoid(lora(lora(xa, self.a1), self.a2, self.a0))
        g = lora(torch.sigmoid(lora(xg, self.g1)), self.g2)
        if self.first:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(lora(lora(xv, self.v1), self.v2, self.v0)))
        kk = F.normalize((k * self.k_k).float().view(B, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * torch.addcmul(self.one_minus_k_a, a, self.k_a)   # k * (1 + (a - 1) * k_a)

        # WKV, per head: S' = S diag(d) + (S a_in) b^T + v k^T and y = S' r, with a_in = -kk, b = kk a.
        BH = B * H
        Sf = S.reshape(BH, N, N)
        d = torch.exp(torch.sigmoid(w.float()).mul_(-DECAY_SCALE)).view(BH, N)
        rf, kf, vf = r.float().view(BH, N), k.float().view(BH, N), v.float().view(BH, N)
        kkf = kk.view(BH, N)
        bf = kkf * a.float().view(BH, N)
        if kernel is not None and supports(Sf):  # one pass over the state (kaggletrain/infer/decode_cpu.cpp)
            y, S_new = wkv7_step_unchecked(kernel, Sf.contiguous(), d, kkf, bf, kf, rf, vf)
        else:
            # y expands to S (d*r) + (S a_in)(b.r) + v (k.r), so two row-wise dot products with S give
            # both S-products and S' is one multiply plus one in-place batched matmul-add: four passes
            # over the state instead of five full-size temporaries (vecdot beats bmm with a [N, 2]
            # right-hand side 1.3-1.8x: MKL's batched gemm is slow for such thin products).
            sa = torch.linalg.vecdot(Sf, kkf[:, None, :]).neg_()                    # S a_in
            y = torch.linalg.vecdot(Sf, (d * rf)[:, None, :])
            y += sa * (bf * rf).sum(-1, keepdim=True) + vf * (kf * rf).sum(-1, keepdim=True)
            S_new = (Sf * d[:, None, :]).baddbmm_(torch.stack([sa, vf], dim=2), torch.stack([bf, kf], dim=1))
        y = y.view(B, C)

        y = F.group_norm(y, H, self.lnx_w, self.lnx_b, self.lnx_eps)
        bonus = (r.float() * k.float() * self.r_k.float()).view(B, H, N).sum(-1, keepdim=True)
        y = torch.addcmul(y.view(B, H, N), bonus, v.float().view(B, H, N)).view(B, C)
        x = mm.add(x, (y * g).to(x.dtype), self.Wo)

        h2 = self.ln2(x)
        kx = torch.addcmul(h2, ffn_shift.to(h2.dtype) - h2, self.f_mix)
        # contiguous: the column form is slow when its small operand (hid, next line) is a transposed view
        hid = torch.relu_(mm(kx, self.Wfk).contiguous()).square_()
        x = mm.add(x, hid, self.Wfv)
        return x, v_first, (h, S_new.view(B, H, N, N), h2)


class DecodeStep:
    """`step(tokens [B], state, mask=None) -> (logits [B, V] float32, state)` for `model`.

    Built once per generation (cheap: views of the parameters). Accepts and returns `ModelState`, so it
    interleaves freely with `run_last` (prefill) and with states saved to files. At batch > 1 on a CPU
    without the compiled kernels, the logits are a transposed view of oneDNN's [V, B] result (copying it
    back would cost ~2 ms per step at V = 65536); call .contiguous() where rows must be contiguous.
    """

    def __init__(self, model):
        self.model = model
        w = model.head.weight
        copies = w.device.type == "cpu" and w.dtype == torch.float32 and step_kernel() is not None
        self.layers = [_Layer(b, copies) if b.is_rwkv_block else None for b in model.blocks]

    def _logits(self, x: torch.Tensor, mm: TorchProducts) -> torch.Tensor:
        head = self.model.head
        if head.bias is not None or x.device.type != "cpu":
            return head_logits(self.model, x)
        if x.shape[0] > 1:
            if isinstance(mm, (KernelProducts, OneDNNCols)):  # OneDNNCols: a transposed view (cpu_linear.py)
                return mm(self.model.ln_out(x), head.weight).float()
            return head_logits(self.model, x)
        h = self.model.ln_out(x)
        # Batch 1 on CPU: the V x C head streams fastest from a [C, V] copy (long contiguous rows), in
        # oneDNN or in MKL's gemv (about 1.25x and 1.5x faster than from the [V, C] parameter). The copy
        # (200 MB for a 0.1B World model) is cached on the model across generate() calls, keyed by the
        # weight's storage and version counter so that training or loading new weights invalidates it.
        w = head.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = getattr(self.model, "_decode_head_t", None)
        if cached is None or cached[0] != key:
            cached = (key, w.detach().t().contiguous())
            self.model._decode_head_t = cached  # a plain attribute: not a parameter, buffer or state entry
        wt = cached[1]
        if isinstance(mm, KernelProducts):
            mm = mm.fallback
        return (mm(h, wt.t()) if isinstance(mm, OneDNNRows) else h @ wt).float()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, state: ModelState,
                 mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ModelState]:
        model = self.model
        cfg = model.config
        B = tokens.shape[0]
        state = state.expand()
        pos = state.position if state.position is not None else \
            torch.zeros(B, dtype=torch.long, device=tokens.device)
        x = model._embed(tokens[:, None], pos[:, None])[:, 0]
        layer_states = model._split_state(state, B)
        keep_old = None if mask is None else ~mask.bool()
        v_first = None
        new_states = []
        # float32 CPU products go through the compiled kernel or oneDNN (kaggletrain/infer/cpu_linear.py);
        # anything else through F.linear. The WKV kernel also serves half-precision weights (float32 state).
        dtype = x.dtype if model.head.weight.dtype == x.dtype else model.head.weight.dtype
        mm = products_for(B, x.device, dtype)
        kernel = step_kernel() if x.device.type == "cpu" else None
        for blk, lay, st in zip(model.blocks, self.layers, layer_states):
            if lay is None:  # attention block: the model's code, with its own masking
                valid = None if mask is None else mask.bool()[:, None]
                y, st_new = blk(x[:, None], st, valid)
                x = y[:, 0]
                new_states.append(st_new)
                continue
            if st is None:
                st = blk.initial_state(B, x.device, x.dtype)
                if st[0] is None:
                    C, H, N = cfg.hidden_size, lay.H, lay.N
                    st = (x.new_zeros(B, C), torch.zeros(B, H, N, N, device=x.device), x.new_zeros(B, C))
            x, v_first, st_new = lay.step(x, v_first, *st, mm=mm, kernel=kernel)
            if keep_old is not None:  # finished rows: state untouched, exactly
                st_new = tuple(torch.where(keep_old.view(-1, *([1] * (n.dim() - 1))), o.to(n.dtype), n)
                               for o, n in zip(st, st_new))
            new_states.append(st_new)
        logits = self._logits(x, mm)
        step = torch.ones_like(pos) if mask is None else mask.long().view(-1)
        out = model._join_state(new_states, pos + step)
        if cfg.rwkv_state_compression:
            out = out.compress(cfg.state_compression)
        return logits, out
