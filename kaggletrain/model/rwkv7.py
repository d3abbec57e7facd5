"""RWKV-7 "x070" time-mix, channel-mix and block, with the official parameter names and init.

Shapes: x [B, T, C]; C = hidden_size, N = head_size, H = C // N. See ../spec (rwkv7.md) section 1.
Dtype rules (spec, pitfalls): the decay logit `w`, the key normalisation kk, ln_x and the WKV state are
computed in float32 whatever the autocast dtype; only the matrix products run in fp16/bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kaggletrain.model.config import ModelConfig
from kaggletrain.ops.wkv import wkv

# A padded position runs an exact identity WKV step: r=k=v=a=b=0 and a decay of exactly 1
# (sigmoid(-1e4) == 0 in float32), so it never changes the state (spec, pitfalls: padding).
PAD_DECAY_LOGIT = -1e4


def up(t: torch.Tensor) -> torch.Tensor:
    """Half precision to float32; float32/float64 unchanged (so a float64 model stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def amp_input(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, a LayerNorm output cast once to the autocast dtype (fp16/bf16), so the token shift,
    the lerps and the projections' inputs run in half precision, as in the official trainer, instead of
    float32 copies that autocast casts again at every matmul. Unchanged without autocast."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(dev))
    return x


def mix(x: torch.Tensor, xx: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x + xx * p (a token-shift lerp) in x's dtype (float32 results are unchanged to the bit)."""
    return x + xx * p.to(x.dtype)


def token_shift(x: torch.Tensor, prev: torch.Tensor | None, valid: torch.Tensor | None):
    """The previous token's x for each position, and the new carried shift state.

    x: [B, T, C]; prev: [B, C] or None (zeros, as in training); valid: [B, T] bool or None.
    With a mask, padded positions are skipped: each position sees the last *real* token before it
    (or `prev`), and the carried state is the last real token's x.
    """
    B, T, C = x.shape
    if prev is None and valid is None and torch.compiler.is_compiling():
        # Under torch.compile a zero pad, not a concatenation with zeros (same values): inductor reads a pad
        # as a masked load inside the lerps' kernel, where a concatenation is a separate copy of x (eager
        # mode copies either way and its pad backward costs a little more, so it keeps the concatenation).
        return F.pad(x[:, :-1], (0, 0, 1, 0)), x[:, -1]
    if prev is None:
        prev = x.new_zeros(B, C)
    prev = prev.to(x.dtype)
    if valid is None:
        shifted = torch.cat([prev[:, None], x[:, :-1]], dim=1)
        return shifted, x[:, -1]
    idx = torch.arange(T, device=x.device).expand(B, T)
    last_valid = torch.where(valid, idx, torch.full_like(idx, -1)).cummax(dim=1).values  # [B, T]
    src = torch.cat([prev[:, None], x], dim=1)  # index 0 = prev, t+1 = x_t
    before = torch.cat([idx.new_full((B, 1), -1), last_valid[:, :-1]], dim=1) + 1
    shifted = torch.gather(src, 1, before[..., None].expand(B, T, C))
    new_prev = torch.gather(src, 1, (last_valid[:, -1:] + 1)[..., None].expand(B, 1, C))[:, 0]
    return shifted, new_prev


def _ortho_(t: torch.Tensor, scale: float) -> torch.Tensor:
    """Official `ortho_init`: orthogonal with gain sqrt(rows/cols) when rows > cols, times `scale`."""
    rows, cols = t.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    with torch.no_grad():
        nn.init.orthogonal_(t, gain=gain * scale)
    return t


class RWKV7TimeMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, first_rwkv: bool):
        super().__init__()
        C, N = cfg.hidden_size, cfg.head_size
        H = C // N
        self.cfg, self.layer_id, self.first_rwkv = cfg, layer_id, first_rwkv
        self.n_head, self.head_size = H, N
        d = cfg.lora_dims
        p = lambda *shape: nn.Parameter(torch.empty(*shape))  # noqa: E731
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (p(1, 1, C) for _ in range(6))
        self.w0, self.w1, self.w2 = p(1, 1, C), p(C, d["w"]), p(d["w"], C)
        self.a0, self.a1, self.a2 = p(1, 1, C), p(C, d["a"]), p(d["a"], C)
        self.v0, self.v1, self.v2 = p(1, 1, C), p(C, d["v"]), p(d["v"], C)
        self.g1, self.g2 = p(C, d["g"]), p(d["g"], C)
        self.k_k, self.k_a, self.r_k = p(1, 1, C), p(1, 1, C), p(H, N)
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        # eps = 1e-5 * N: 64e-5 at the official N = 64 (head_size_divisor 8, RWKV-LM #282).
        self.ln_x = nn.GroupNorm(H, C, eps=1e-5 * N)
        if cfg.rwkv_use_learnable_states:
            self.time_state = nn.Parameter(torch.zeros(H, N, N))  # [head, value, key]
            self.shift_state = nn.Parameter(torch.zeros(C))
        if first_rwkv:  # the value residual of the first RWKV layer is unused (kept for checkpoint parity)
            for t in (self.v0, self.v1, self.v2):
                t.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        C, L, l = self.cfg.hidden_size, self.cfg.num_layers, self.layer_id
        N = self.head_size
        r01 = l / (L - 1) if L > 1 else 0.0
        r10 = 1.0 - l / L
        dev = self.x_r.device
        ddd = (torch.arange(C, device=dev, dtype=torch.float64) / C).view(1, 1, C)
        n = torch.arange(C, device=dev, dtype=torch.float64)
        lin = n / (C - 1) - 0.5
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zig = z * z.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
        set_ = lambda prm, val: prm.copy_(val.reshape(prm.shape).to(prm.dtype))  # noqa: E731
        set_(self.x_r, 1 - ddd ** (0.2 * r10))
        set_(self.x_g, 1 - ddd ** (0.2 * r10))
        set_(self.x_w, 1 - ddd ** (0.9 * r10))
        set_(self.x_a, 1 - ddd ** (0.9 * r10))
        set_(self.x_k, 1 - ddd ** (0.7 * r10))
        set_(self.x_v, 1 - ddd ** (0.7 * r10))
        set_(self.w0, www + 0.5 + 2.5 * zig)
        set_(self.a0, -0.19 + 0.3 * zig + 0.4 * lin)
        set_(self.v0, 0.73 - 0.4 * lin)
        set_(self.k_k, 0.71 - 0.1 * lin)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        for lora in (self.w1, self.a1, self.v1, self.g1):
            lora.zero_()
        for lora in (self.w2, self.a2, self.v2, self.g2):
            _ortho_(lora, 0.1)
        _ortho_(self.receptance.weight, 1.0)
        _ortho_(self.value.weight, 1.0)
        _ortho_(self.key.weight, 0.1)
        self.output.weight.zero_()
        self.ln_x.weight.copy_(torch.full((C,), ((l + 1) / L) ** 0.7))
        self.ln_x.bias.zero_()
        if hasattr(self, "time_state"):
            self.time_state.zero_()
            self.shift_state.zero_()

    def forward(self, x, v_first, shift, wkv_state, valid=None, split=None):
        """x: [B, T, C] ln1 output. Returns (out, v_first, new_shift, new_wkv_state, mid) where `mid` is
        (shift, wkv_state) after the first `split` tokens (for chunk overlap), or None."""
        rh, wh, kh, vh, ah, bh, r, k, v, g, v_first, new_shift, shift_mid = self.pre(x, v_first, shift, valid, split)
        y, s_end, s_mid = self.run_wkv(rh, wh, kh, vh, ah, bh, wkv_state, split)
        mid = None if s_mid is None else (new_shift if split == x.shape[1] else shift_mid, s_mid)
        return self.post(y, r, k, v, g), v_first, new_shift, s_end, mid

    def pre(self, x, v_first, shift, valid=None, split=None):
        """Everything before the WKV: token shift, lerps, projections and LoRAs.

        Returns the WKV inputs (rh, wh, kh, vh, ah, bh) [B, T, H, N], what `post` needs (r, the modified
        k, the mixed v, g) [B, T, C], v_first, the new shift state and the shift state after `split`
        tokens (None unless 0 < split < T)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        x = amp_input(x)
        prev, new_shift = token_shift(x, shift, valid)
        xx = prev - x
        xr, xw, xk = mix(x, xx, self.x_r), mix(x, xx, self.x_w), mix(x, xx, self.x_k)
        xv, xa, xg = mix(x, xx, self.x_v), mix(x, xx, self.x_a), mix(x, xx, self.x_g)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        # Decay logit in float32 (never let the decay itself round to 1 in half precision).
        w = up(self.w0) + up(torch.tanh(xw @ self.w1) @ self.w2)
        # The value residual, a and the key modification run in the activations' dtype (bf16/fp16 under
        # autocast, as in the official bf16 trainer; float32 otherwise): their parameters are cast to it, so a
        # float32 parameter does not promote a [B, T, C] activation to float32.
        if v_first is None:
            v_first = v
        else:
            gate = (xv @ self.v1) @ self.v2
            v = v + (v_first - v) * torch.sigmoid(self.v0.to(gate.dtype) + gate)
        lora_a = (xa @ self.a1) @ self.a2
        a = torch.sigmoid(self.a0.to(lora_a.dtype) + lora_a)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        # kk from the unmodified k, normalised in float32 (fp16 under/overflows here: spec pitfalls).
        kk = F.normalize(up(k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a.to(a.dtype))

        dt = r.dtype
        rh, kh, vh = r.view(B, T, H, N), k.view(B, T, H, N).to(dt), v.view(B, T, H, N).to(dt)
        # Rounded once to dt, as (-kk).to(dt) and (kk * float(a)).to(dt) would be, without float32 copies of -kk
        # and a (negation commutes with rounding; the product promotes a inside the kernel).
        ah = kk.to(dt).neg()
        bh = (kk * a.view(B, T, H, N)).to(dt)
        wh = w.view(B, T, H, N)
        if valid is not None:
            m = valid[:, :, None, None]
            rh, kh, vh, ah, bh = (t * m.to(t.dtype) for t in (rh, kh, vh, ah, bh))
            wh = torch.where(m, wh, torch.full_like(wh, PAD_DECAY_LOGIT))
        shift_mid = None
        if split is not None and 0 < split < T:
            _, shift_mid = token_shift(x[:, :split], shift, None if valid is None else valid[:, :split])
        return rh, wh, kh, vh, ah, bh, r, k, v, g, v_first, new_shift, shift_mid

    def run_wkv(self, rh, wh, kh, vh, ah, bh, wkv_state, split=None):
        """The WKV recurrence. Returns (y, final state, state after `split` tokens or None)."""
        T, impl = rh.shape[1], self.cfg.wkv_impl
        if split is not None and 0 < split < T:
            y1, s_mid = wkv(rh[:, :split], wh[:, :split], kh[:, :split], vh[:, :split], ah[:, :split],
                            bh[:, :split], wkv_state, impl=impl)
            y2, s_end = wkv(rh[:, split:], wh[:, split:], kh[:, split:], vh[:, split:], ah[:, split:],
                            bh[:, split:], s_mid, impl=impl)
            return torch.cat([y1, y2], dim=1), s_end, s_mid
        y, s_end = wkv(rh, wh, kh, vh, ah, bh, wkv_state, impl=impl)
        return y, s_end, (s_end if split == T else None)

    def post(self, y, r, k, v, g):
        """ln_x, the bonus term, the gate and the output projection."""
        B, T, C = r.shape
        H, N = self.n_head, self.head_size
        # ln_x in float32 with float32 affine parameters, also when the weights are half precision
        # (optimize_for_inference(dtype)): CPU group_norm refuses mixed dtypes.
        lnx = self.ln_x
        if torch.compiler.is_compiling():
            # The same normalisation per head, written out: inductor's group_norm lowering materialises the
            # per-token scale and shift as two float32 [B, T, C] tensors (16 bytes x C written and read again);
            # this form stays in one fused kernel. Eager mode keeps ATen's single-pass group_norm.
            yh = up(y).view(B, T, H, N)
            var, mean = torch.var_mean(yh, dim=-1, keepdim=True, correction=0)
            y = ((yh - mean) * torch.rsqrt(var + lnx.eps)).view(B, T, C) * up(lnx.weight) + up(lnx.bias)
        else:
            y = F.group_norm(up(y).reshape(B * T, C), lnx.num_groups, up(lnx.weight), up(lnx.bias),
                             lnx.eps).view(B, T, C)
        # Under autocast the normalised y is rounded once to the autocast dtype, as the LayerNorm outputs are
        # (amp_input), and the bonus term and the gate run in it, as in the official bf16 trainer: the output
        # projection takes its input in that dtype anyway. Without autocast: float32, unchanged.
        y = amp_input(y)
        # Bonus term uses the modified k and the mixed v.
        # dtype=y.dtype: without it CUDA autocast sums half inputs into float32 (its fp32_set_opt_dtype
        # policy), which would turn bonus * v, y and the gate into float32 [B, T, C] tensors.
        bonus = (r.view(B, T, H, N) * (k.view(B, T, H, N) * self.r_k.to(y.dtype))).sum(-1, keepdim=True,
                                                                                      dtype=y.dtype)
        y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
        y = y * g
        # Half-precision weights without autocast (optimize_for_inference): the projection's dtype.
        return self.output(y if torch.is_autocast_enabled(y.device.type) else y.to(self.output.weight.dtype))


class RWKV7ChannelMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.hidden_size
        self.cfg, self.layer_id = cfg, layer_id
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, cfg.ffn_size, bias=False)
        self.value = nn.Linear(cfg.ffn_size, C, bias=False)
        if cfg.rwkv_use_learnable_states:
            self.shift_state = nn.Parameter(torch.zeros(C))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        C, L = self.cfg.hidden_size, self.cfg.num_layers
        r10 = 1.0 - self.layer_id / L
        ddd = torch.arange(C, dtype=torch.float64) / C
        self.x_k.copy_((1 - ddd ** (r10**4)).view(1, 1, C).to(self.x_k.dtype))
        with torch.no_grad():
            nn.init.orthogonal_(self.key.weight, gain=1.0)
        self.value.weight.zero_()
        if hasattr(self, "shift_state"):
            self.shift_state.zero_()

    def forward(self, x, shift, valid=None, split=None):
        x = amp_input(x)
        prev, new_shift = token_shift(x, shift, valid)
        k = mix(x, prev - x, self.x_k)
        # h * h, not h ** 2: CUDA autocast runs pow in float32, a float32 [B, T, 4C] copy per layer that the
        # value projection then casts back. The product is the same (pow(x, 2) is x * x in ATen).
        kpre = self.key(k)
        if kpre.requires_grad and type(self.value) is nn.Linear and not torch.compiler.is_compiling():
            out = ReluSquareProject.apply(kpre, self.value.weight)  # keeps relu(kpre) alone for backward
        else:  # (inference; under torch.compile, whose partitioner decides what to keep)
            h = torch.relu(kpre)
            out = self.value(h * h)
        mid = None
        if split is not None:
            _, mid = token_shift(x[:, :split], shift, None if valid is None else valid[:, :split])
        return out, new_shift, mid


class ReluSquareProject(torch.autograd.Function):
    """value(relu(kpre) ** 2) for training, keeping only h = relu(kpre) for the backward pass and recomputing
    h * h there. Autograd would keep both h and h * h, each [B, T, 4C]: the largest activations of a block, so
    this saves 8C bytes per token and layer in half precision (16C in float32). Values and gradients are the
    ones autograd computes for relu -> h * h -> linear, to the bit: the same products in the same order (the
    mul's gradient g*h + g*h is (g*h) doubled, exactly), with the projection in the autocast dtype when on."""

    @staticmethod
    def forward(ctx, kpre, weight):
        h = torch.relu(kpre)
        dev = kpre.device.type
        w = weight
        if torch.is_autocast_enabled(dev):  # as autocast's linear: both operands in the autocast dtype
            dt = torch.get_autocast_dtype(dev)
            h, w = h.to(dt), weight.to(dt)
        with torch.autocast(dev, enabled=False):
            out = F.linear(h * h, w)
        ctx.save_for_backward(h, weight)
        ctx.w_dtype = w.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight = ctx.saved_tensors
        w = weight.to(ctx.w_dtype)
        dk = dw = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            hh = h * h
            dw = g2.t().mm(hh.reshape(-1, hh.shape[-1])).to(weight.dtype)
            del hh
        if ctx.needs_input_grad[0]:
            gh = g2.mm(w).view(h.shape) * h
            dk = torch.ops.aten.threshold_backward(gh + gh, h, 0)
        return dk, dw


class RWKV7Block(nn.Module):
    """ln1 → time-mix → residual; ln2 → channel-mix → residual. Block 0 also owns ln0."""

    is_rwkv_block = True

    def __init__(self, cfg: ModelConfig, layer_id: int, first_rwkv: bool):
        super().__init__()
        C = cfg.hidden_size
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = RWKV7TimeMix(cfg, layer_id, first_rwkv)
        self.ffn = RWKV7ChannelMix(cfg, layer_id)

    def reset_parameters(self) -> None:
        for ln in (getattr(self, "ln0", None), self.ln1, self.ln2):
            if ln is not None:
                nn.init.ones_(ln.weight)
                nn.init.zeros_(ln.bias)
        self.att.reset_parameters()
        self.ffn.reset_parameters()

    def initial_state(self, batch: int, device, dtype):
        """Zeros, or the learnable states broadcast over the batch."""
        att, C, H, N = self.att, self.att.cfg.hidden_size, self.att.n_head, self.att.head_size
        if hasattr(att, "time_state"):
            return (att.shift_state.to(dtype).expand(batch, C), up(att.time_state).expand(batch, H, N, N),
                    self.ffn.shift_state.to(dtype).expand(batch, C))
        return None, None, None

    def forward(self, x, v_first, state, valid=None, split=None, checkpoint=None):
        """state: RWKVLayerState-like tuple (att_shift, wkv, ffn_shift) or None.
        Returns x, v_first, new_state tuple, mid_state tuple (or None).

        checkpoint: None, or a function `checkpoint(fn, *args, release=bool)` (non-reentrant activation
        checkpointing, as RWKVModel's selective gradient checkpointing passes in; `release`: hand the CPU
        heap's free pages back first, once per block; it returns the carried [B, C] shift states, views of
        [B, T, C] activations, as compact copies, so that they keep no recomputable activation alive): then the block runs as two checkpointed regions
        around the WKV -- (1) ln1 + token shift + lerps + projections/LoRAs, (2) ln_x + bonus + gate +
        output projection + residual + ln2 + channel-mix + residual -- while the WKV itself runs outside
        them, keeps what it saved and is never recomputed. Same results, to the bit."""
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        att_shift, wkv_state, ffn_shift = state
        if checkpoint is not None:
            return self._forward_selective(checkpoint, x, v_first, att_shift, wkv_state, ffn_shift, valid, split)
        h = self.ln1(x)
        dx, v_first, att_shift_new, wkv_new, att_mid = self.att(h, v_first, att_shift, wkv_state, valid, split)
        x = x + dx
        h = self.ln2(x)
        dx, ffn_shift_new, ffn_mid = self.ffn(h, ffn_shift, valid, split)
        x = x + dx
        mid = None
        if att_mid is not None:
            mid = (att_mid[0], att_mid[1], ffn_mid)
        return x, v_first, (att_shift_new, wkv_new, ffn_shift_new), mid

    def _region_pre(self, x, v_first, shift, valid, split):
        return self.att.pre(self.ln1(x), v_first, shift, valid, split)

    def _region_post(self, x, y, r, k, v, g, shift, valid, split):
        x = x + self.att.post(y, r, k, v, g)
        h = self.ln2(x)
        dx, new_shift, mid = self.ffn(h, shift, valid, split)
        return x + dx, new_shift, mid

    def _forward_selective(self, checkpoint, x, v_first, att_shift, wkv_state, ffn_shift, valid, split):
        T = x.shape[1]
        rh, wh, kh, vh, ah, bh, r, k, v, g, v_first, att_shift_new, shift_mid = checkpoint(
            self._region_pre, x, v_first, att_shift, valid, split, release=True)
        y, wkv_new, wkv_mid = self.att.run_wkv(rh, wh, kh, vh, ah, bh, wkv_state, split)
        x, ffn_shift_new, ffn_mid = checkpoint(self._region_post, x, y, r, k, v, g, ffn_shift, valid, split,
                                                   release=False)
        mid = None
        if wkv_mid is not None:
            mid = (att_shift_new if split == T else shift_mid, wkv_mid, ffn_mid)
        return x, v_first, (att_shift_new, wkv_new, ffn_shift_new), mid
