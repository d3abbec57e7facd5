"""Chunk-parallel WKV-7 in plain PyTorch: the CPU path and the GPU fallback.

    y, final_state = wkv_chunked(r, w, k, v, a, b, state=None, chunk_len=None)

Same conventions as ops/wkv.py and ops/wkv_reference.py:
  r, w, k, v, a, b: [B, T, H, N], any float dtype; `w` is the raw decay logit (log d = -e^-0.5 sigmoid(w)).
  state: [B, H, N, N], layout [batch, head, value i, key j].
  S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T ;  y_t = S_t r_t.
All arithmetic runs in float32 (float64 for float64 inputs); y comes back in r.dtype and the final state in
that accumulation dtype. Differentiable w.r.t. all six inputs and the initial state (a hand-written backward,
checked against autograd through the sequential reference in tests/test_wkv.py).

Derivation, per head, for one chunk of L tokens that starts from state S0. Let G_t be the cumulative
log-decay inside the chunk (G_t = sum_{s<=t} log d_s, a vector over keys), gamma_t = exp(G_t), gamma_0 = 1.
Unrolling the recurrence,
    S_t = S0 diag(gamma_t) + sum_{s<=t} (sa_s b_s^T + v_s k_s^T) diag(gamma_t / gamma_s).
Stacking rows (sa_t^T into SA [L, N], likewise V, K, ...):
    SA = A~ S0^T + M_ab SA + M_ak V,       a~_t = a_t * gamma_{t-1}
    Y  = R~ S0^T + M_rb SA + M_rk V,       r~_t = r_t * gamma_t
    S_L = S0 diag(gamma_L) + SA^T B_ + V^T K_,   b__s = b_s * gamma_L / gamma_s (k__s likewise)
with M_ab[t,s] = sum_j a_tj b_sj gamma_{t-1,j} / gamma_{s,j} for s < t (strictly lower triangular), M_ak the
same with k, and M_rb, M_rk built from r_t and gamma_t for s <= t (inclusive). With Tinv = (I - M_ab)^{-1}
(unit lower triangular) the first line gives SA = P S0^T + TM V, P = Tinv A~, TM = Tinv M_ak, so every
chunk is an affine map of its start state whose parts are all computed for every chunk at once:
    Y   = Yr S0^T + Y0,   Yr = R~ + M_rb P,   Y0 = (M_rb TM + M_rk) V
    S_L = S0 diag(gamma_L) + V^T Keff + X B_,   X = S0 P^T,   Keff = K_ + TM^T B_
Only the last line runs chunk after chunk (three small batched matmuls per chunk, on [B*H] matrices that
stay in cache); Y is one batched product after it. The backward runs the transposed recurrence in reverse
and does there every product that needs a chunk's start state or its end-state gradient (the grads of X,
P, Yr, Keff, B_, V and gamma_L), so no [chunks, N, N] gradient tensor is ever materialised; the rest of the
backward is batched over all chunks. On CPU the state products (~12 N^2 multiply-adds per token and head,
forward + backward) run near the BLAS rate; the intra-chunk part is mostly elementwise passes and
[L, L] x [L, N] products, whose cost is set by memory traffic and per-matrix overhead.

Exponent safety: log d >= -e^-0.5 = -0.6066 per token. gamma_t, gamma_L / gamma_s and gamma_{t-1} / gamma_s
(s < t) are all <= 1, but the pairwise matrices need gamma_{t-1} and 1 / gamma_s as separate factors of a
matmul. Both are taken relative to the chunk's midpoint m: exp(G_{t-1} - m) * exp(m - G_s), so no factor
exceeds exp(0.6066 * L / 2) (e^4.9 for L = 16), which bounds the usable chunk length (`max_chunk_len`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kaggletrain.ops.decay import DECAY_SCALE, decay_log

__all__ = ["wkv_chunked", "default_chunk_len", "max_chunk_len"]

# Chosen by measurement (float32, CPU time of one thread, as the 2 cores were shared). B=4, T=1024, H=4,
# N=64, forward+backward: 213 ms at L=16, 216 ms at L=32, 239 ms at L=24 (best of 8, interleaved); B=16,
# T=128, H=4, N=32: L=8 and L=16 tie, L=32 is ~25% slower. The state terms cost ~N^2 per token whatever L
# is, the intra-chunk matrices ~L*N per token, and per-chunk overhead (the sequential scan) grows as T/L.
_DEFAULT_CHUNK = {torch.float32: 16, torch.float64: 16}

# Largest exponent allowed for one factor exp(+-(G - m)). Products of two factors, including the discarded
# upper triangle of the pairwise matrices, must stay far from overflow: e^40 in float32.
_MAX_HALF_EXPONENT = {torch.float32: 20.0, torch.float64: 300.0}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_len(dtype: torch.dtype) -> int:
    """Default chunk length for inputs of `dtype`."""
    return _DEFAULT_CHUNK[_acc_dtype(dtype)]


def max_chunk_len(dtype: torch.dtype) -> int:
    """Largest chunk length whose intra-chunk exponents stay safe in the accumulation dtype of `dtype`."""
    return 2 * int(_MAX_HALF_EXPONENT[_acc_dtype(dtype)] / DECAY_SCALE)


# --------------------------------------------------------------------------------------------------------
# Layout


def _to_chunks(t: torch.Tensor, C: int, L: int) -> torch.Tensor:
    """[B, T, H, N] -> [C, B, H, L, N] view (zero-padding T up to C * L first: an identity step for every
    input, including log-decay 0)."""
    B, T, H, N = t.shape
    if C * L != T:
        t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, C * L - T))
    return t.reshape(B, C, L, H, N).permute(1, 0, 3, 2, 4)


_MASKS: dict = {}


def _mask(L: int, device: torch.device) -> torch.Tensor:
    """Boolean [2L, 2L] keep-mask of [[M_ab, M_ak], [M_rb, M_rk]]: strict lower on top, inclusive below."""
    key = (L, str(device))
    if key not in _MASKS:
        i = torch.arange(L, device=device)
        strict, incl = i[:, None] > i[None, :], i[:, None] >= i[None, :]
        _MASKS[key] = torch.cat([strict.repeat(1, 2), incl.repeat(1, 2)], dim=0)
    return _MASKS[key]


def _mt(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


# --------------------------------------------------------------------------------------------------------
# Forward pieces. Batch dims are [C, BH] (chunks, batch*heads); "[L, N]" etc. name the trailing dims.


def _intra_forward(x: torch.Tensor) -> dict:
    """Everything that does not depend on the chunk start states, for all chunks at once.

    x: [C, BH, 6, L, N] holding (a, r, b, k, v, log d). With E = exp(G_prev - m, G - m) [.., 2, L, N],
    ek = exp(m - G), left = (a, r) * E and right = (b, k) * ek ([.., 2L, N] each), M = left right^T masked,
    the chunk's maps (module docstring) come out as
      P' = Tinv A', TM = Tinv M_ak, Yr' = M_rb P' + R', Wy = M_rb TM + M_rk   (A', R' = the two halves of left)
      P = P' em, Yr = Yr' em (em = exp(m)); Y0 = Wy v
      Keff = (TM^T B' + K') e_end, Bb = B' e_end   (B', K' = the halves of right; e_end = exp(G_L - m))
    Returns a dict with those and the pieces the backward needs.
    """
    C, BH, _, L, N = x.shape
    xar, xbk, v, ld = x[:, :, 0:2], x[:, :, 2:4], x[:, :, 4], x[:, :, 5]
    G = torch.cumsum(ld, dim=-2)
    mid = (L - 1) // 2
    m = G[..., mid : mid + 1, :]  # reference point; it cancels in every product it enters
    GL = G[..., L - 1 :, :]

    E = torch.empty_like(xar)
    torch.sub(G, ld, out=E[:, :, 0])
    E[:, :, 0].sub_(m)
    torch.sub(G, m, out=E[:, :, 1])
    E.exp_()
    ek = torch.reciprocal(E[:, :, 1])  # exp(m - G)
    left = (xar * E).view(C, BH, 2 * L, N)
    right = (xbk * ek.unsqueeze(2)).view(C, BH, 2 * L, N)

    M = torch.matmul(left, _mt(right))
    M.masked_fill_(~_mask(L, x.device), 0.0)
    M_ab, M_ak, M_rb, M_rk = M[..., :L, :L], M[..., :L, L:], M[..., L:, :L], M[..., L:, L:]
    eye = torch.eye(L, dtype=x.dtype, device=x.device).expand(C, BH, L, L)
    # unitriangular=True never reads the diagonal, so -M_ab stands for I - M_ab.
    Tinv = torch.linalg.solve_triangular(-M_ab, eye, upper=False, unitriangular=True)

    Pp = torch.matmul(Tinv, left[..., :L, :])
    TM = torch.matmul(Tinv, M_ak)
    Yrp = torch.matmul(M_rb, Pp).add_(left[..., L:, :])
    Wy = torch.matmul(M_rb, TM).add_(M_rk)
    em = torch.exp(m)
    P = Pp * em
    Yr = Yrp.mul_(em)  # Yr' itself is not needed again
    Y0 = torch.matmul(Wy, v)

    e_end = torch.exp(GL - m)
    Bp, Kp = right[..., :L, :], right[..., L:, :]
    Keff = torch.matmul(_mt(TM), Bp).add_(Kp).mul_(e_end)
    Bb = Bp * e_end
    gL = torch.exp(GL)
    return dict(left=left, right=right, M=M, Tinv=Tinv, TM=TM, Wy=Wy, Pp=Pp, P=P, Yr=Yr, Y0=Y0,
                Keff=Keff, Bb=Bb, gL=gL, E=E, ek=ek, em=em, e_end=e_end)


def _scan_forward(S0: torch.Tensor, v, P, Keff, Bb, gL):
    """Chunk start states. S0 [BH, N, N]; v, P, Keff, Bb [C, BH, L, N]; gL [C, BH, 1, N].

    S_{c+1} = S_c * gL_c + v_c^T Keff_c + X_c Bb_c, X_c = S_c P_c^T (kept transposed: XT_c = P_c S_c^T).
    Returns (states [C+1, BH, N, N], XT [C, BH, L, N]). Everything per chunk stays in cache.
    """
    C = P.shape[0]
    states = S0.new_empty((C + 1,) + S0.shape)
    states[0] = S0
    XT = torch.empty_like(P)
    for c in range(C):
        S, Sn = states[c], states[c + 1]
        torch.bmm(P[c], _mt(S), out=XT[c])
        torch.mul(S, gL[c], out=Sn)
        Sn.baddbmm_(_mt(v[c]), Keff[c]).baddbmm_(_mt(XT[c]), Bb[c])
    return states, XT


# --------------------------------------------------------------------------------------------------------
# Backward pieces


def _scan_backward(dS_final, dY, states, v, f, XT):
    """Transposed recurrence, last chunk first, with every product that needs a chunk's state or its
    end-state gradient done while both are in cache. dS_final [BH, N, N]; dY [C, BH, L, N].
    Returns dS0 and, per chunk, the grads of P, Yr, Keff, Bb [C, BH, L, N], of v through U = v^T Keff
    [C, BH, L, N] and of gL [C, BH, 1, N].
    """
    P, Yr, Keff, Bb, gL = f["P"], f["Yr"], f["Keff"], f["Bb"], f["gL"]
    C = P.shape[0]
    dP, dYr, dKeff, dBb, dv = (torch.empty_like(P) for _ in range(5))
    dgL = torch.empty_like(gL)
    dXT = torch.empty_like(P)
    dS = dS_final
    for c in range(C - 1, -1, -1):
        S = states[c]
        torch.bmm(Bb[c], _mt(dS), out=dXT[c])
        torch.bmm(Keff[c], _mt(dS), out=dv[c])
        torch.bmm(v[c], dS, out=dKeff[c])
        torch.bmm(XT[c], dS, out=dBb[c])
        torch.sum(dS * S, dim=-2, keepdim=True, out=dgL[c])
        torch.bmm(dXT[c], S, out=dP[c])
        torch.bmm(dY[c], S, out=dYr[c])
        dS = (dS * gL[c]).baddbmm_(_mt(dXT[c]), P[c]).baddbmm_(_mt(dY[c]), Yr[c])
    return dS, dP, dYr, dKeff, dBb, dv, dgL


def _revcumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{s >= t} x_s along `dim`."""
    return x - torch.cumsum(x, dim=dim) + x.sum(dim=dim, keepdim=True)


def _intra_backward(x, f, dY0, dP, dYr, dKeff, dBb, dv, dgL):
    """Gradient w.r.t. x [C, BH, 6, L, N] from the gradients of the per-chunk maps. The reference point m
    is held constant: every quantity is independent of it, so its total derivative is zero."""
    C, BH, _, L, N = x.shape
    v = x[:, :, 4]
    M, Tinv, TM, Wy, Pp = f["M"], f["Tinv"], f["TM"], f["Wy"], f["Pp"]
    left, right, em, e_end = f["left"], f["right"], f["em"], f["e_end"]
    M_rb = M[..., L:, :L]
    Bp = right[..., :L, :]

    # Keff = (TM^T B' + K') e_end, Bb = B' e_end, gL = exp(G_L)
    dGL = (dKeff * f["Keff"]).add_(dBb * f["Bb"]).sum(dim=-2, keepdim=True).addcmul_(dgL, f["gL"])
    dKe = dKeff.mul_(e_end)  # grad of TM^T B' + K'
    dright = torch.empty_like(right)
    dright[..., L:, :] = dKe
    dright[..., :L, :] = torch.matmul(TM, dKe).addcmul_(dBb, e_end)
    dTM = torch.matmul(Bp, _mt(dKe))

    # Y0 = Wy v; P = P' em; Yr = Yr' em with Yr' = M_rb P' + R', Wy = M_rb TM + M_rk
    dWy = torch.matmul(dY0, _mt(v))
    dv.add_(torch.matmul(_mt(Wy), dY0))
    dPp = dP.mul_(em)
    dYrp = dYr.mul_(em)
    dM = torch.empty_like(M)
    dM[..., L:, L:] = dWy
    dM[..., L:, :L] = torch.matmul(dYrp, _mt(Pp)).add_(torch.matmul(dWy, _mt(TM)))
    dPp.add_(torch.matmul(_mt(M_rb), dYrp))
    dTM.add_(torch.matmul(_mt(M_rb), dWy))
    # P' = Tinv A', TM = Tinv M_ak, Tinv = (I - M_ab)^-1
    dA = torch.matmul(_mt(Tinv), dPp)
    dMak = torch.matmul(_mt(Tinv), dTM)
    dM[..., :L, L:] = dMak
    dM[..., :L, :L] = torch.matmul(dA, _mt(Pp)).add_(torch.matmul(dMak, _mt(TM)))
    dM.masked_fill_(~_mask(L, x.device), 0.0)

    dleft = torch.matmul(dM, right)
    dleft[..., :L, :].add_(dA)
    dleft[..., L:, :].add_(dYrp)
    dright.add_(torch.matmul(_mt(dM), left))
    dleft2, dright2 = dleft.view(C, BH, 2, L, N), dright.view(C, BH, 2, L, N)

    # Exponential factors -> log-decay. left = (a, r) * exp(G_prev - m, G - m), right = (b, k) * exp(m - G),
    # e_end = exp(G_L - m), gL = exp(G_L); then G = cumsum(ld), G_prev = G - ld.
    dx = torch.empty_like(x)
    torch.mul(dleft2, f["E"], out=dx[:, :, 0:2])
    torch.mul(dright2, f["ek"].unsqueeze(2), out=dx[:, :, 2:4])
    dx[:, :, 4] = dv
    dGs = dleft2.mul_(left.view(C, BH, 2, L, N))  # (dG_prev, dG) through `left`
    dG_prev = dGs[:, :, 0]
    dG = dGs[:, :, 1].add_(dG_prev).sub_(dright2.mul_(right.view(C, BH, 2, L, N)).sum(2))
    dG[..., L - 1 :, :] += dGL
    torch.sub(_revcumsum(dG, dim=-2), dG_prev, out=dx[:, :, 5])
    return dx


# --------------------------------------------------------------------------------------------------------
# autograd.Function and public entry point


class _ChunkedWKV(torch.autograd.Function):
    """x [C, BH, 6, L, N] (a, r, b, k, v, log d), S0 [BH, N, N] -> (Y [C, BH, L, N], S_final [BH, N, N])."""

    @staticmethod
    def forward(ctx, x, S0):
        C, BH, _, L, N = x.shape
        f = _intra_forward(x)
        v = x[:, :, 4]
        states, XT = _scan_forward(S0, v, f["P"], f["Keff"], f["Bb"], f["gL"])
        starts = states[:C]
        Y = torch.baddbmm(f["Y0"].flatten(0, 1), f["Yr"].flatten(0, 1), _mt(starts.flatten(0, 1)))
        del f["Y0"]  # not needed by the backward
        ctx.save_for_backward(x, states, XT, *f.values())
        ctx.keys = tuple(f.keys())
        return Y.view(C, BH, L, N), states[C].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, dS_final):
        x, states, XT, *fv = ctx.saved_tensors
        f = dict(zip(ctx.keys, fv))
        # Upstream grads may be expanded (stride 0, e.g. from .sum()); batched matmuls on such operands
        # fall back to a slow per-matrix loop, so materialise them once.
        dY = torch.zeros_like(f["Yr"]) if dY is None else dY.contiguous()
        dS_final = torch.zeros_like(states[-1]) if dS_final is None else dS_final.contiguous()
        dS0, dP, dYr, dKeff, dBb, dv, dgL = _scan_backward(dS_final, dY, states, x[:, :, 4], f, XT)
        dx = _intra_backward(x, f, dY, dP, dYr, dKeff, dBb, dv, dgL)
        return dx, dS0


def wkv_chunked(r, w, k, v, a, b, state=None, chunk_len=None):
    """Chunk-parallel WKV-7.

    r, w, k, v, a, b: [B, T, H, N] (float32/16, bfloat16 or float64); state: optional [B, H, N, N] initial
    state ([value, key] layout; zeros when None). chunk_len: tokens per chunk (default
    `default_chunk_len(r.dtype)`, at most `max_chunk_len(r.dtype)`); T need not be a multiple of it.
    Returns (y [B, T, H, N] in r.dtype, final state [B, H, N, N] in float32, float64 for float64 inputs).
    A pure function: the inputs are never modified.
    """
    B, T, H, N = r.shape
    acc = _acc_dtype(r.dtype)
    L = default_chunk_len(r.dtype) if chunk_len is None else int(chunk_len)
    if not 1 <= L <= max_chunk_len(r.dtype):
        raise ValueError(f"chunk_len must be in [1, {max_chunk_len(r.dtype)}] for {r.dtype}, got {chunk_len}")
    if state is None:
        S0 = torch.zeros(B, H, N, N, dtype=acc, device=r.device)
    else:
        S0 = state.to(acc)
    if T == 0:
        return r.new_zeros(B, 0, H, N), S0.clone()

    C = -(-T // L)
    logd = decay_log(w.to(acc))
    parts = [_to_chunks(t.to(acc), C, L) for t in (a, r, b, k, v, logd)]
    x = torch.stack(parts, dim=3).view(C, B * H, 6, L, N)
    Y, S_final = _ChunkedWKV.apply(x, S0.reshape(B * H, N, N))
    y = Y.view(C, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, C * L, H, N)[:, :T].contiguous()
    return y.to(r.dtype), S_final.view(B, H, N, N)
