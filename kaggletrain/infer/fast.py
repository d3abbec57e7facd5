"""A lean one-token decode step for RWKV-7 blocks (generation's hot loop).

`RWKVModel.forward` on one token runs the general code (masks, chunk splits, dtype routing, the WKV
dispatch), about 200 tensor operations per layer. At batch 1 on a CPU the weights are read from memory
once per token anyway, so those small operations are a large share of the step time. `DecodeStep` runs
the same equations (spec section 1, RNN form) with about 45 operations per layer, reading the model's own
parameters (copies: the six [C] token-shift mixes stacked into one [6, 1, C] tensor, and at batch 1 on a
CPU a [C, V] transpose of the head, see `DecodeStep._logits`):

  - the six token-shift mixes in one addcmul; LoRA biases folded into addmm; the value residual as lerp;
  - the WKV step in three passes over the state (see `_Layer.step`) instead of several full-size
    temporaries;
  - residual adds folded into the output projections (addmm);
  - at batch > 1 on a CPU, the FFN key and the head through oneDNN instead of MKL (`DecodeStep.__call__`).

Attention blocks (hybrids) use the model's own block code. Rows whose `attention_mask` is 0 keep their
previous state exactly (torch.where), as in the model. Results equal the model's to float rounding
(tests/test_generate.py checks this against `RWKVModel.forward`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kaggletrain.infer.runner import head_logits
from kaggletrain.model.state import ModelState
from kaggletrain.ops.decay import DECAY_SCALE


def _flat(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(-1)


_ONEDNN: Optional[bool] = None


def _onednn_ok() -> bool:
    """Whether oneDNN's fused linear (`torch.ops.mkldnn._linear_pointwise`, the op TorchInductor's CPU
    backend emits) exists and gives x W^T + b here, for both weight layouts; probed once."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            lp = torch.ops.mkldnn._linear_pointwise
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(s, generator=g) for s in ((3, 8), (5, 8), (5,)))
            ref = torch.addmm(b, x, w.t())
            _ONEDNN = bool(torch.backends.mkldnn.is_available()
                           and torch.allclose(lp(x, w, b, "none", [], ""), ref, atol=1e-5)
                           and torch.allclose(lp(x, w.t().contiguous().t(), b, "none", [], ""), ref, atol=1e-5))
        except Exception:  # an op missing from this torch build, or a build without oneDNN
            _ONEDNN = False
    return _ONEDNN


def _lin(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, in] @ w[out, in]^T (+ b) through oneDNN; w may have any strides (no copy)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _Layer:
    """References to one RWKV-7 block's parameters in the shapes the step uses."""

    def __init__(self, blk):
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
        self.w0, self.w1, self.w2 = _flat(att.w0), att.w1, att.w2
        self.a0, self.a1, self.a2 = _flat(att.a0), att.a1, att.a2
        self.v0, self.v1, self.v2 = _flat(att.v0), att.v1, att.v2
        self.g1, self.g2 = att.g1, att.g2
        self.k_k, self.k_a, self.r_k = _flat(att.k_k), _flat(att.k_a), _flat(att.r_k)
        self.one_minus_k_a = (1 - self.k_a).detach()
        self.f_mix = _flat(ffn.x_k)
        self.Wfk, self.Wfv = ffn.key.weight, ffn.value.weight

    def step(self, x, v_first, att_shift, S, ffn_shift, dnn=False):
        """x [B, C] residual stream; S [B, H, N, N] float32. Returns x, v_first, (att_shift, S, ffn_shift).
        dnn: the FFN key product through oneDNN (see `DecodeStep.__call__`)."""
        B, C = x.shape
        H, N = self.H, self.N
        h = self.ln1(x)
        m = torch.addcmul(h, att_shift.to(h.dtype) - h, self.mix)  # [6, B, C]: xr, xk, xw, xa, xv, xg
        xr, xk, xw, xa, xv, xg = m.unbind(0)
        r = F.linear(xr, self.Wr)
        k = F.linear(xk, self.Wk)
        v = F.linear(xv, self.Wv)
        if self.half:  # the decay logit is summed in float32 (spec pitfalls: decay precision)
            w = self.w0.float() + (torch.tanh(xw @ self.w1) @ self.w2).float()
        else:
            w = torch.addmm(self.w0, torch.tanh(xw @ self.w1), self.w2)
        a = torch.sigmoid(torch.addmm(self.a0, xa @ self.a1, self.a2))
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        if self.first:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(torch.addmm(self.v0, xv @ self.v1, self.v2)))
        kk = F.normalize((k * self.k_k).float().view(B, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * torch.addcmul(self.one_minus_k_a, a, self.k_a)   # k * (1 + (a - 1) * k_a)

        # WKV, per head: S' = S diag(d) + (S a_in) b^T + v k^T and y = S' r, with a_in = -kk, b = kk a.
        # y expands to S (d*r) + (S a_in)(b.r) + v (k.r), so one batched matmul S @ [kk | d*r] gives
        # both S-products, and S' is one multiply plus one in-place batched matmul-add: three passes
        # over the [B, H, N, N] state instead of five (at batch 8 the state is as large as the weights
        # a step reads from cache).
        BH = B * H
        Sf = S.reshape(BH, N, N)
        d = torch.exp(torch.sigmoid(w.float()).mul_(-DECAY_SCALE)).view(BH, N)
        rf, kf, vf = r.float().view(BH, N), k.float().view(BH, N), v.float().view(BH, N)
        kkf = kk.view(BH, N)
        bf = kkf * a.float().view(BH, N)
        q = torch.bmm(Sf, torch.stack([kkf, d * rf], dim=2))                       # [BH, N, 2]
        sa = q[:, :, 0].neg()                                                       # S a_in
        y = q[:, :, 1] + sa * (bf * rf).sum(-1, keepdim=True) + vf * (kf * rf).sum(-1, keepdim=True)
        S_new = (Sf * d[:, None, :]).baddbmm_(torch.stack([sa, vf], dim=2), torch.stack([bf, kf], dim=1))
        y = y.view(B, C)

        y = F.group_norm(y, H, self.lnx_w, self.lnx_b, self.lnx_eps)
        bonus = (r.float() * k.float() * self.r_k.float()).view(B, H, N).sum(-1, keepdim=True)
        y = torch.addcmul(y.view(B, H, N), bonus, v.float().view(B, H, N)).view(B, C)
        x = torch.addmm(x, (y * g).to(x.dtype), self.Wo.t())

        h2 = self.ln2(x)
        kx = torch.addcmul(h2, ffn_shift.to(h2.dtype) - h2, self.f_mix)
        hid = torch.relu(_lin(kx, self.Wfk) if dnn else F.linear(kx, self.Wfk)).square_()
        x = torch.addmm(x, hid, self.Wfv.t())
        return x, v_first, (h, S_new.view(B, H, N, N), h2)


class DecodeStep:
    """`step(tokens [B], state, mask=None) -> (logits [B, V] float32, state)` for `model`.

    Built once per generation (cheap: views of the parameters). Accepts and returns `ModelState`, so it
    interleaves freely with `run_last` (prefill) and with states saved to files.
    """

    def __init__(self, model):
        self.model = model
        self.layers = [_Layer(b) if b.is_rwkv_block else None for b in model.blocks]

    def _logits(self, x: torch.Tensor, dnn: bool = False) -> torch.Tensor:
        head = self.model.head
        if dnn:
            return _lin(self.model.ln_out(x), head.weight, head.bias).float()
        if x.shape[0] != 1 or x.device.type != "cpu" or head.bias is not None:
            return head_logits(self.model, x)
        # Batch 1 on CPU: x @ W^T streams the V x C head 1.5x faster from a [C, V] copy (gemv over long
        # contiguous rows) than from the [V, C] parameter. The copy (200 MB for a 0.1B World model) is
        # cached on the model across generate() calls, keyed by the weight's storage and version counter
        # so that training or loading new weights invalidates it.
        w = head.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = getattr(self.model, "_decode_head_t", None)
        if cached is None or cached[0] != key:
            cached = (key, w.detach().t().contiguous())
            self.model._decode_head_t = cached  # a plain attribute: not a parameter, buffer or state entry
        return (self.model.ln_out(x) @ cached[1]).float()

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
        # Batch > 1 on a CPU: the products are no longer matrix-vector, and MKL's small-M gemm (on AMD
        # CPUs it runs a generic, non-AVX2 code path) is slow for the FFN key in the [C, 4C] layout that
        # optimize_for_inference gives it and for the [V, C] head; oneDNN's AVX2 kernels take both
        # layouts as they are (no copies). See benchmarks/bench_infer_cpu.py.
        dnn = B > 1 and x.device.type == "cpu" and x.dtype == torch.float32 \
            and model.head.weight.dtype == torch.float32 and _onednn_ok()
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
            x, v_first, st_new = lay.step(x, v_first, *st, dnn=dnn)
            if keep_old is not None:  # finished rows: state untouched, exactly
                st_new = tuple(torch.where(keep_old.view(-1, *([1] * (n.dim() - 1))), o.to(n.dtype), n)
                               for o, n in zip(st, st_new))
            new_states.append(st_new)
        logits = self._logits(x, dnn)
        step = torch.ones_like(pos) if mask is None else mask.long().view(-1)
        out = model._join_state(new_states, pos + step)
        if cfg.rwkv_state_compression:
            out = out.compress(cfg.state_compression)
        return logits, out
