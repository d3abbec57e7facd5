"""Quick on-GPU self-check of the compiled kernel against the float64 sequential reference (a second or two).

Used by `kaggletrain doctor`. Checks y, the final state and all gradients (incl. the initial state's) on a
small random case per supported dtype, T not a multiple of the checkpoint length.
"""

from __future__ import annotations

import torch

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-3}


def _case(dtype: torch.dtype, B=2, T=45, H=2, N=64, seed=0) -> float:
    from kaggletrain.ops.wkv_reference import wkv_sequential
    from rwkv_cuda.function import wkv_cuda

    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g, device="cuda")
    w = torch.rand(B, T, H, N, generator=g, device="cuda") * 22 - 12
    ins = [t.to(dtype) for t in (rnd(B, T, H, N), w, rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * gate)]
    s0, dy, dsT = rnd(B, H, N, N) * 0.5, rnd(B, T, H, N).to(dtype), rnd(B, H, N, N)

    X = [t.clone().requires_grad_() for t in ins] + [s0.clone().requires_grad_()]
    y, sT = wkv_cuda(*X)
    ((y.float() * dy.float()).sum() + (sT * dsT).sum()).backward()
    R = [t.double().requires_grad_() for t in ins] + [s0.double().requires_grad_()]
    y_r, sT_r = wkv_sequential(*R)
    ((y_r * dy.double()).sum() + (sT_r * dsT.double()).sum()).backward()
    pairs = [(y, y_r), (sT, sT_r)] + [(x.grad, xr.grad) for x, xr in zip(X, R)]
    return max(((a.double() - b).norm() / b.norm()).item() for a, b in pairs)


def self_check() -> dict:
    """{dtype name: (max relative L2 error, passed)} for each dtype the build supports."""
    from rwkv_cuda.loader import load_extension

    ext = load_extension(warn=False)
    if ext is None:
        return {}
    out = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        if not ext.supported(64, name):
            continue
        err = _case(dtype)
        out[name] = (err, err <= TOL[dtype])
    return out
