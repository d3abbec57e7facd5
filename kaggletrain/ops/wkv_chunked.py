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
stay in cache); Y_c = Yr_c S_c^T + Y0_c is done in the same loop while S_c is hot. The backward runs the
transposed recurrence in reverse and does there every product that needs a chunk's start state or its
end-state gradient (the grads of X, P, Yr, Keff, B_, V and gamma_L), so no [chunks, N, N] gradient tensor
is ever materialised; the rest of the backward is batched over all chunks. Layout changes to and from
[chunks, B*H, L, N] and the decay's own derivative happen inside the one autograd node. On CPU the state
products (~12 N^2 multiply-adds per token and head, forward + backward) run near the BLAS rate; the
intra-chunk part is mostly elementwise passes and [L, L] x [L, N] products, whose cost is set by memory
traffic and per-matrix overhead.

Exponent safety: log d >= -e^-0.5 = -0.6066 per token. gamma_t, gamma_L / gamma_s and gamma_{t-1} / gamma_s
(s < t) are all <= 1, but the pairwise matrices need gamma_{t-1} and 1 / gamma_s as separate factors of a
matmul. Both are taken relative to the chunk's midpoint m: exp(G_{t-1} - m) * exp(m - G_s), so no factor
exceeds exp(0.6066 * L / 2) (e^4.9 for L = 16), which bounds the usable chunk length (`max_chunk_len`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kaggletrain.ops.decay import DECAY_SCALE

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
# Layout. Inside the op every per-token tensor lives as [C, BH, slot, L, N] (chunks, batch*heads, slot,
# tokens of the chunk, channels), so one chunk of one head is a contiguous [L, N] block and neighbouring
# slots form contiguous [2L, N] blocks that one matmul can use at once.

# Slots of the input buffer x.
_A, _R, _B, _K, _V, _LD = range(6)


def _fill_chunks(dst: torch.Tensor, t: torch.Tensor) -> None:
    """Copy t [B, T, H, N] (any float dtype) into dst [C, B, H, L, N], zero-padding T up to C * L: a zero
    token is an identity step for every input, including log-decay 0."""
    C, B, H, L, N = dst.shape
    T = t.shape[1]
    if C * L != T:
        t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, C * L - T))
    dst.copy_(t.view(B, C, L, H, N).permute(1, 0, 3, 2, 4))


def _from_chunks(src: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """src [C, B, H, L, N] -> new contiguous [B, T, H, N] tensor of `dtype`."""
    C, B, H, L, N = src.shape
    out = torch.empty(B, C * L, H, N, dtype=dtype, device=src.device)
    out.view(B, C, L, H, N).copy_(src.permute(1, 0, 3, 2, 4))
    return out if C * L == T else out[:, :T].contiguous()


_MASKS: dict = {}


def _mask(L: int, device: torch.device) -> torch.Tensor:
    """Boolean [2L, 2L] drop-mask of [[M_ab, M_ak], [M_rb, M_rk]] (True where the entry is zeroed): the top
    row of blocks keeps the strict lower triangle, the bottom row the inclusive one."""
    key = (L, str(device))
    if key not in _MASKS:
        i = torch.arange(L, device=device)
        strict, incl = i[:, None] > i[None, :], i[:, None] >= i[None, :]
        _MASKS[key] = ~torch.cat([strict.repeat(1, 2), incl.repeat(1, 2)], dim=0)
    return _MASKS[key]


def _mt(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


# --------------------------------------------------------------------------------------------------------
# Forward pieces. Batch dims are [C, BH] (chunks, batch*heads); "[L, N]" etc. name the trailing dims.


def _intra_forward(x: torch.Tensor) -> dict:
    """Everything that does not depend on the chunk start states, for all chunks at once.

    x: [C, BH, 6, L, N] (slots _A.._LD). With E = exp(G_prev - m, G - m) [.., 2, L, N], ek = exp(m - G),
    left = (a, r) * E and right = (b, k) * ek ([.., 2L, N] each), M = left right^T masked, the chunk's maps
    (module docstring) come out as
      P' = Tinv A', TM = Tinv M_ak, Yr' = M_rb P' + R', Wy = M_rb TM + M_rk  (A', R' = the halves of left)
      P = P' em, Yr = Yr' em (em = exp(m)); Y0 = Wy v
      Keff = (TM^T B' + K') e_end, Bb = B' e_end   (B', K' = the halves of right; e_end = exp(G_L - m))
    Returns a dict with those and the pieces the backward needs.
    """
    C, BH, _, L, N = x.shape
    xar, xbk, v, ld = x[:, :, _A : _R + 1], x[:, :, _B : _K + 1], x[:, :, _V], x[:, :, _LD]
    G = _cumsum_tokens(ld.clone())
    mid = (L - 1) // 2
    m = G[..., mid : mid + 1, :].clone()  # reference point; it cancels in every product it enters
    GL = G[..., L - 1 :, :]
    e_end = torch.exp(GL - m)
    gL = torch.exp(GL)
    em = torch.exp(m)

    # E0 = exp(G - ld - m), E1 = exp(G - m), ek = exp(m - G) = 1 / E1
    E = torch.empty_like(xar)
    G.sub_(m)
    torch.sub(G, ld, out=E[:, :, 0])
    E[:, :, 0].exp_()
    torch.exp(G, out=E[:, :, 1])
    ek = G.neg_().exp_()
    left = (xar * E).view(C, BH, 2 * L, N)
    right = (xbk * ek.unsqueeze(2)).view(C, BH, 2 * L, N)

    M = torch.matmul(left, _mt(right))
    M.masked_fill_(_mask(L, x.device), 0.0)
    M_ab, M_ak, M_rb, M_rk = M[..., :L, :L], M[..., :L, L:], M[..., L:, :L], M[..., L:, L:]
    eye = torch.eye(L, dtype=x.dtype, device=x.device).expand(C, BH, L, L)
    # unitriangular=True never reads the diagonal, so -M_ab stands for I - M_ab.
    Tinv = torch.linalg.solve_triangular(-M_ab, eye, upper=False, unitriangular=True)

    Pp = torch.matmul(Tinv, left[..., :L, :])
    TM = torch.matmul(Tinv, M_ak)
    Wy = torch.matmul(M_rb, TM).add_(M_rk)
    Yr = torch.matmul(M_rb, Pp).add_(left[..., L:, :]).mul_(em)
    P = Pp * em
    Y0 = torch.matmul(Wy, v)

    Bp, Kp = right[..., :L, :], right[..., L:, :]
    Keff = torch.matmul(_mt(TM), Bp).add_(Kp).mul_(e_end)
    Bb = Bp * e_end
    return dict(left=left, right=right, M=M, Tinv=Tinv, TM=TM, Wy=Wy, Pp=Pp, P=P, Yr=Yr, Y0=Y0,
                Keff=Keff, Bb=Bb, gL=gL, E=E, ek=ek, em=em, e_end=e_end)


def _scan_forward(S0: torch.Tensor, v, P, Keff, Bb, gL, Yr, Y0):
    """Chunk start states and the output. S0 [BH, N, N]; v, P, Keff, Bb, Yr, Y0 [C, BH, L, N];
    gL [C, BH, 1, N].

    S_{c+1} = S_c * gL_c + v_c^T Keff_c + X_c Bb_c, X_c = S_c P_c^T (kept transposed: XT_c = P_c S_c^T);
    Y_c = Yr_c S_c^T + Y0_c, computed in place in Y0 while S_c is in cache.
    Returns (states [C+1, BH, N, N], XT [C, BH, L, N], Y [C, BH, L, N] (= Y0)).
    """
    C = P.shape[0]
    states = S0.new_empty((C + 1,) + S0.shape)
    states[0] = S0
    XT = torch.empty_like(P)
    for c in range(C):
        S, Sn = states[c], states[c + 1]
        torch.bmm(P[c], _mt(S), out=XT[c])
        Y0[c].baddbmm_(Yr[c], _mt(S))
        torch.mul(S, gL[c], out=Sn)
        Sn.baddbmm_(_mt(v[c]), Keff[c]).baddbmm_(_mt(XT[c]), Bb[c])
    return states, XT, Y0


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


def _cumsum_tokens(x: torch.Tensor) -> torch.Tensor:
    """In-place cumulative sum over the token dim (-2) of x [..., L, N]: L - 1 adds of [..., N] slices,
    cheaper on CPU than torch.cumsum over a short strided dim. Returns x."""
    for t in range(1, x.shape[-2]):
        x[..., t, :] += x[..., t - 1, :]
    return x


def _revcumsum_tokens(x: torch.Tensor) -> torch.Tensor:
    """In-place sum_{s >= t} x_s over the token dim (-2) of x [..., L, N]. Returns x."""
    for t in range(x.shape[-2] - 2, -1, -1):
        x[..., t, :] += x[..., t + 1, :]
    return x


def _intra_backward(x, f, dY0, dP, dYr, dKeff, dBb, dv, dgL):
    """Gradient w.r.t. x [C, BH, 6, L, N] from the gradients of the per-chunk maps: returns the grads of
    (a, r) and of (b, k) [C, BH, 2, L, N] and of the log-decay [C, BH, L, N]; v's grad is dv, completed in
    place. The reference point m is held constant: every quantity is independent of it, so its total
    derivative is zero."""
    C, BH, _, L, N = x.shape
    v = x[:, :, _V]
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
    dM.masked_fill_(_mask(L, x.device), 0.0)

    dleft = torch.matmul(dM, right)
    dleft[..., :L, :].add_(dA)
    dleft[..., L:, :].add_(dYrp)
    dright.add_(torch.matmul(_mt(dM), left))
    dleft2, dright2 = dleft.view(C, BH, 2, L, N), dright.view(C, BH, 2, L, N)

    # Exponential factors -> log-decay. left = (a, r) * exp(G_prev - m, G - m), right = (b, k) * exp(m - G),
    # e_end = exp(G_L - m), gL = exp(G_L); then G = cumsum(ld), G_prev = G - ld. The grads of (a, r) and
    # (b, k) are made in place in dleft and dright; as dleft * left = d(a, r) * (a, r) (likewise for right),
    # the log-decay terms come from those and x.
    dar = dleft2.mul_(f["E"])
    dbk = dright2.mul_(f["ek"].unsqueeze(2))
    dG_prev = dar[:, :, 0] * x[:, :, _A]  # through `left`: (dG_prev, dG) = d(a, r) * (a, r)
    dG = torch.addcmul(dG_prev, dar[:, :, 1], x[:, :, _R])
    dG.addcmul_(dbk[:, :, 0], x[:, :, _B], value=-1.0).addcmul_(dbk[:, :, 1], x[:, :, _K], value=-1.0)
    dG[..., L - 1 :, :] += dGL
    dld = _revcumsum_tokens(dG).sub_(dG_prev)
    return dar, dbk, dld


# --------------------------------------------------------------------------------------------------------
# autograd.Function and public entry point


class _ChunkedWKV(torch.autograd.Function):
    """(a, r, b, k, v, w) [B, T, H, N], S0 [B, H, N, N] in the accumulation dtype, chunk length L
    -> (y [B, T, H, N] in r.dtype, S_final [B, H, N, N]). Layout changes happen inside, so the autograd
    graph holds one node."""

    @staticmethod
    def forward(ctx, a, r, b, k, v, w, S0, L):
        B, T, H, N = r.shape
        acc = S0.dtype
        C = -(-T // L)
        x6 = torch.empty(C, B, H, 6, L, N, dtype=acc, device=r.device)
        for slot, t in ((_A, a), (_R, r), (_B, b), (_K, k), (_V, v), (_LD, w)):
            _fill_chunks(x6[:, :, :, slot], t)
        ld = x6[:, :, :, _LD]
        ld.sigmoid_().mul_(-DECAY_SCALE)  # decay_log, in the accumulation dtype
        if C * L != T:
            ld[-1, :, :, T - (C - 1) * L :] = 0.0  # padded tokens: identity steps
        x = x6.view(C, B * H, 6, L, N)
        f = _intra_forward(x)
        states, XT, Y = _scan_forward(S0.reshape(B * H, N, N), x[:, :, _V], f["P"], f["Keff"], f["Bb"],
                                      f["gL"], f["Yr"], f.pop("Y0"))
        ctx.save_for_backward(x, states, XT, *f.values())
        ctx.keys = tuple(f.keys())
        ctx.shape = (B, T, H, N, C, L)
        ctx.dtypes = tuple(t.dtype for t in (a, r, b, k, v, w))
        y = _from_chunks(Y.view(C, B, H, L, N), T, r.dtype)
        return y, states[C].view(B, H, N, N).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dS_final):
        x, states, XT, *fv = ctx.saved_tensors
        f = dict(zip(ctx.keys, fv))
        B, T, H, N, C, L = ctx.shape
        BH = B * H
        dY = torch.empty(C, B, H, L, N, dtype=x.dtype, device=x.device)
        if dy is None:
            dY.zero_()
        else:
            _fill_chunks(dY, dy)
        dY = dY.view(C, BH, L, N)
        if dS_final is None:
            dS_final = torch.zeros_like(states[-1])
        else:  # may be expanded (stride 0); batched matmuls on such operands are slow
            dS_final = dS_final.reshape(BH, N, N).to(x.dtype).contiguous()
        dS0, dP, dYr, dKeff, dBb, dv, dgL = _scan_backward(dS_final, dY, states, x[:, :, _V], f, XT)
        dar, dbk, dld = _intra_backward(x, f, dY, dP, dYr, dKeff, dBb, dv, dgL)
        # w: ld = -s sigmoid(w), so dld/dw = ld (1 - sigmoid(w)) = ld (1 + ld / s)
        ld = x[:, :, _LD]
        dld.mul_(torch.addcmul(ld, ld, ld, value=1.0 / DECAY_SCALE))
        parts = (dar[:, :, 0], dar[:, :, 1], dbk[:, :, 0], dbk[:, :, 1], dv, dld)  # order of _A.._LD
        grads = [_from_chunks(g.view(C, B, H, L, N), T, dt) if need else None
                 for g, dt, need in zip(parts, ctx.dtypes, ctx.needs_input_grad)]
        return (*grads, dS0.view(B, H, N, N), None)


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
    return _ChunkedWKV.apply(a, r, b, k, v, w, S0, L)
