"""Plain sequential WKV-7 recurrence: the reference every faster form is checked against.

Conventions shared by every WKV implementation (see ops/wkv.py):
  r, w, k, v, a, b: [B, T, H, N]. `w` is the raw decay logit; the decay is
  d = exp(-exp(-0.5) * sigmoid(w)), computed in float32 (float64 when the inputs are float64).
  state: [B, H, N, N], layout [batch, head, value i, key j], float32 (or float64).
  S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T ;  y_t = S_t r_t.
"""

from __future__ import annotations

import torch

from kaggletrain.ops.decay import decay_log


def wkv_sequential(r, w, k, v, a, b, state=None):
    """Token-by-token recurrence with autograd. Returns (y [B,T,H,N] in r.dtype, final state)."""
    B, T, H, N = r.shape
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32
    if state is None:
        state = torch.zeros(B, H, N, N, dtype=acc, device=r.device)
    S = state.to(acc)
    d = torch.exp(decay_log(w.to(acc)))
    # unbind once: indexing [:, t] inside the loop would make the backward quadratic in T.
    steps = zip(*(t.to(acc).unbind(1) for t in (r, d, k, v, a, b)))
    ys = []
    for rt, dt, kt, vt, at, bt in steps:
        sa = torch.einsum("bhij,bhj->bhi", S, at)
        S = S * dt[:, :, None, :] + sa[..., :, None] * bt[:, :, None, :] + vt[..., :, None] * kt[:, :, None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", S, rt))
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N, dtype=acc)
    return y.to(r.dtype), S
