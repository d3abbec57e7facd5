"""The compiled WKV-7 kernel (rwkv_cuda) on a real GPU, against the float64 sequential reference.

Skipped without CUDA. On a GPU machine the kernel MUST build: a build failure fails the tests (with the
build log's path) rather than skipping them. Fresh random inputs per case with realistic ranges: decay
logits over the whole range, L2-normalised kk, a = -kk, b = kk * gate, random initial state, random upstream
gradients on y AND the final state. Tolerance on the relative L2 error of y, the final state and every
gradient: 1e-5 for float32 inputs, 3e-3 for float16/bfloat16 (the reference sees the same rounded inputs).

The forward has two: the sequential one (default) and KAGGLETRAIN_WKV_FWD=chunk, chunks of 16 tokens as
tensor-core products (sm_80+), checked against the reference with three backwards.
The backward has five implementations, selected per call by KAGGLETRAIN_WKV_BWD=old|new|chunk|fused|scan (default:
new, the two-kernel one, since an H200 run verified and timed it; chunk: the same row kernel, then chunk-parallel
dense products for the column sums; fused: chunk's two kernels as one launch; scan: chunk with the row recursion
in chunks on tensor cores too): the reference comparisons run with all five; the other tests with the default. The forward and the new backward's
row kernel split each head's rows over KAGGLETRAIN_WKV_SPLIT=1|2|4|auto blocks (default 1): a few reference
cases run with each split, and one test checks that all splits give bitwise the same outputs and gradients.

Set KAGGLETRAIN_TEST_REPORT=path to append one JSON line of errors per case (scripts/gpu_check.sh does).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kaggletrain.ops.wkv_reference import wkv_sequential

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

N = 64


def _bf16_native() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch
        return torch.cuda.get_device_capability()[0] >= 8


DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or not _bf16_native(), reason="needs a GPU with native bf16")),
]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-3}

SHAPES = [  # B, T, H: T=1; T not a multiple of 16 (nor 4); an exact multiple; long T; B*H small and large
    (1, 1, 1),
    (2, 37, 3),
    (1, 64, 2),
    (2, 300, 4),
    (8, 45, 32),
    (1, 257, 1),
]


@pytest.fixture(scope="module")
def wkv_cuda():
    from rwkv_cuda import build_info, kernel_available
    from rwkv_cuda import wkv_cuda as fn

    if not kernel_available(N):
        pytest.fail(f"the CUDA kernel did not build on this GPU machine: {build_info()}")
    return fn


def _inputs(B, T, H, dtype, seed, w_f32=False, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, device=device)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = torch.rand(B, T, H, N, generator=g, device=device) * 22 - 12  # sigmoid(w) from 6e-6 to 1 - 5e-5
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g, device=device)
    ins = [t.to(dtype) for t in (r, w, k, v, -kk, kk * gate)]
    if w_f32:
        ins[1] = w
    return ins, g


def _rel(have, want):
    have = have.double()
    assert torch.isfinite(have).all(), "non-finite values"
    if want is None:  # the reference output does not depend on this input: the gradient must be zero
        return have.abs().max().item()
    return ((have - want).norm() / want.norm().clamp_min(1e-300)).item()


def _report(case: str, errors: dict) -> None:
    path = os.environ.get("KAGGLETRAIN_TEST_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"case": case, **errors}) + "\n")


@pytest.fixture(params=["new", "old", "chunk", "fused", "scan"])
def bwd(request, monkeypatch):
    """The backward implementation under test (read by the extension at each backward call)."""
    monkeypatch.setenv("KAGGLETRAIN_WKV_BWD", request.param)
    return request.param


def _check(fn, B, T, H, dtype, seed, with_state, w_f32=False, bwd=None):
    ins, g = _inputs(B, T, H, dtype, seed, w_f32)
    s0 = torch.randn(B, H, N, N, generator=g, device="cuda") * 0.5 if with_state else None
    dy = torch.randn(B, T, H, N, generator=g, device="cuda").to(dtype)
    dsT = torch.randn(B, H, N, N, generator=g, device="cuda")

    X = [t.detach().clone().requires_grad_() for t in ins]
    S0 = s0.detach().clone().requires_grad_() if with_state else None
    y, sT = fn(*X, S0)
    assert y.dtype == dtype and y.shape == (B, T, H, N)
    assert sT.dtype == torch.float32 and sT.shape == (B, H, N, N)
    ((y.float() * dy.float()).sum() + (sT * dsT).sum()).backward()

    R = [t.detach().double().requires_grad_() for t in ins]
    RS0 = s0.detach().double().requires_grad_() if with_state else None
    y_ref, sT_ref = wkv_sequential(*R, RS0)
    ((y_ref * dy.double()).sum() + (sT_ref * dsT.double()).sum()).backward()

    errors = {"y": _rel(y, y_ref), "state": _rel(sT, sT_ref)}
    for name, x, xr in zip("rwkvab", X, R):
        assert x.grad is not None and x.grad.dtype == x.dtype, name
        errors[f"d{name}"] = _rel(x.grad, xr.grad)
    if with_state:
        errors["ds0"] = _rel(S0.grad, RS0.grad)
    case = f"{str(dtype).replace('torch.', '')} B={B} T={T} H={H} state={with_state} w_f32={w_f32}"
    if bwd:
        case += f" bwd={bwd}"
    _report(case, errors)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"{case}: relative L2 error above {TOL[dtype]:.0e}: {bad}"
    return errors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
@pytest.mark.parametrize("B,T,H", SHAPES)
def test_matches_float64_reference(wkv_cuda, bwd, B, T, H, with_state, dtype):
    _check(wkv_cuda, B, T, H, dtype, seed=7919 * T + 31 * B + H + int(with_state), with_state=with_state, bwd=bwd)


@pytest.mark.parametrize("bwd_after", ["new", "chunk", "scan"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H", SHAPES)
def test_chunk_forward_matches_float64_reference(wkv_cuda, monkeypatch, B, T, H, dtype, bwd_after):
    """KAGGLETRAIN_WKV_FWD=chunk (tensor cores, sm_80+; elsewhere it runs the sequential forward), with the
    backwards that read its checkpoints: the same tolerances."""
    monkeypatch.setenv("KAGGLETRAIN_WKV_FWD", "chunk")
    monkeypatch.setenv("KAGGLETRAIN_WKV_BWD", bwd_after)
    _check(wkv_cuda, B, T, H, dtype, seed=B * 7919 + T * 31 + H, with_state=True, bwd=f"{bwd_after} fwd=chunk")


def test_chunk_forward_runs_where_built(wkv_cuda, monkeypatch):
    """On sm_80+ the chunk forward is a different kernel (y differs from the sequential one's in the last bits,
    and the extension reports it); on the T4 (sm_75) it resolves to the sequential forward, bitwise."""
    from rwkv_cuda import load_extension

    ins, _ = _inputs(2, 100, 3, torch.float32, seed=5)
    outs = {}
    for fwd in ("seq", "chunk"):
        monkeypatch.setenv("KAGGLETRAIN_WKV_FWD", fwd)
        with torch.no_grad():
            outs[fwd] = wkv_cuda(*ins)[0]
    tensor_cores = torch.cuda.get_device_capability()[0] >= 8
    assert load_extension().fwd_variant() == ("chunk" if tensor_cores else "seq")
    assert torch.equal(outs["seq"], outs["chunk"]) is not tensor_cores


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), DTYPES[2]])
def test_float32_decay_logit_with_half_inputs(wkv_cuda, bwd, dtype):
    """w may stay float32 (the decay is sensitive) while the rest is half precision; dw comes back float32."""
    errors = _check(wkv_cuda, 2, 130, 2, dtype, seed=5, with_state=True, w_f32=True, bwd=bwd)
    assert errors["dw"] < 1e-5  # dw is computed and returned in float32


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize("split", ["1", "2", "4"])
def test_split_matches_float64_reference(wkv_cuda, bwd, split, dtype, monkeypatch):
    """Each row split (blocks per head of the forward and the backward's row kernel) against the reference."""
    monkeypatch.setenv("KAGGLETRAIN_WKV_SPLIT", split)
    _check(wkv_cuda, 2, 300, 4, dtype, seed=101 + int(split), with_state=True, bwd=f"{bwd} split={split}")


def test_splits_bitwise_equal(wkv_cuda, monkeypatch):
    """Every row split runs the same per-row arithmetic: y, the final state and all gradients (both backward
    implementations) are bitwise the same for 1, 2, 4 blocks per head and auto."""
    from rwkv_cuda.loader import load_extension

    ext = load_extension()
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    def auto(bh):  # the smallest split with B*H*split >= 2 * SMs, at most 4
        return next((s for s in (1, 2, 4) if bh * s >= 2 * sms), 4)

    monkeypatch.delenv("KAGGLETRAIN_WKV_SPLIT", raising=False)
    assert ext.split(96) == 1  # the default: the first H200 run measured every split slower
    monkeypatch.setenv("KAGGLETRAIN_WKV_SPLIT", "auto")
    for bh in (1, 96, 256, 4096):
        assert ext.split(bh) == auto(bh), bh
    dtype = torch.bfloat16 if _bf16_native() else torch.float16
    ins, g = _inputs(1, 83, 3, dtype, seed=29)
    s0 = torch.randn(1, 3, N, N, generator=g, device="cuda")
    dy = torch.randn(1, 83, 3, N, generator=g, device="cuda").to(dtype)
    dsT = torch.randn(1, 3, N, N, generator=g, device="cuda")
    outs = {}
    for variant in ("new", "old"):  # chunk's row kernel has no split
        monkeypatch.setenv("KAGGLETRAIN_WKV_BWD", variant)
        for split in ("1", "2", "4", "auto"):
            monkeypatch.setenv("KAGGLETRAIN_WKV_SPLIT", split)
            assert ext.split(3) == (auto(3) if split == "auto" else int(split))
            X = [t.clone().requires_grad_() for t in ins + [s0]]
            y, sT = wkv_cuda(*X)
            ((y.float() * dy.float()).sum() + (sT * dsT).sum()).backward()
            outs[variant, split] = [y.detach(), sT.detach()] + [x.grad for x in X]
    for (variant, split), got in outs.items():
        want = outs[variant, "1"]
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"bwd={variant} split={split}: output {i} differs from split 1"
        # the forward does not depend on the backward: y and the state agree across the variants too
        assert torch.equal(got[0], outs["new", "1"][0]) and torch.equal(got[1], outs["new", "1"][1])


def test_state_carry_equals_one_call(wkv_cuda):
    """Two calls carrying the state give the same outputs and gradients as one call over the whole sequence."""
    ins, g = _inputs(2, 53, 3, torch.float32, seed=11)
    s0 = torch.randn(2, 3, N, N, generator=g, device="cuda") * 0.5
    dy = torch.randn(2, 53, 3, N, generator=g, device="cuda")

    A = [t.clone().requires_grad_() for t in ins]
    SA = s0.clone().requires_grad_()
    y1, s1 = wkv_cuda(*A, SA)
    (y1 * dy).sum().add((s1 ** 2).sum()).backward()

    Bx = [t.clone().requires_grad_() for t in ins]
    SB = s0.clone().requires_grad_()
    ya, sa = wkv_cuda(*[t[:, :20] for t in Bx], SB)
    yb, sb = wkv_cuda(*[t[:, 20:] for t in Bx], sa)
    y2 = torch.cat([ya, yb], dim=1)
    (y2 * dy).sum().add((sb ** 2).sum()).backward()

    assert _rel(y2, y1.double()) < 1e-6 and _rel(sb, s1.double()) < 1e-6
    for x1, x2 in zip(A + [SA], Bx + [SB]):
        assert _rel(x2.grad, x1.grad.double()) < 1e-5


def test_inference_matches_training_and_is_deterministic(wkv_cuda):
    ins, g = _inputs(3, 70, 4, torch.bfloat16 if _bf16_native() else torch.float16, seed=3)
    s0 = torch.randn(3, 4, N, N, generator=g, device="cuda")
    with torch.no_grad():
        y0, s_0 = wkv_cuda(*ins, s0)
    X = [t.clone().requires_grad_() for t in ins]
    y1, s_1 = wkv_cuda(*X, s0)
    assert torch.equal(y0, y1.detach()) and torch.equal(s_0, s_1.detach())
    y1.float().sum().backward()
    g1 = [x.grad.clone() for x in X]
    for x in X:
        x.grad = None
    y2, _ = wkv_cuda(*X, s0)
    y2.float().sum().backward()
    for a, b in zip(g1, (x.grad for x in X)):
        assert torch.equal(a, b)  # no atomics: bitwise reproducible


def test_only_state_or_only_y_used(wkv_cuda):
    """Backward works when autograd passes no gradient for y, or none for the final state."""
    ins, g = _inputs(1, 40, 2, torch.float32, seed=21)
    X = [t.clone().requires_grad_() for t in ins]
    _, sT = wkv_cuda(*X)
    sT.sum().backward()
    R = [t.double().requires_grad_() for t in ins]
    wkv_sequential(*R)[1].sum().backward()
    for x, xr in zip(X, R):
        assert _rel(x.grad, xr.grad) < 1e-5
    X = [t.clone().requires_grad_() for t in ins]
    y, _ = wkv_cuda(*X)
    y.sum().backward()
    R = [t.double().requires_grad_() for t in ins]
    wkv_sequential(*R)[0].sum().backward()
    for x, xr in zip(X, R):
        assert _rel(x.grad, xr.grad) < 1e-5


def test_dispatch_uses_cuda_kernel(wkv_cuda):
    from kaggletrain.ops.wkv import resolve_impl, wkv

    ins, _ = _inputs(1, 33, 2, torch.float32, seed=4)
    assert resolve_impl("auto", ins[0]) == "cuda"
    y, s = wkv(*ins, impl="cuda")
    y_ref, s_ref = wkv_sequential(*[t.double() for t in ins])
    assert _rel(y, y_ref) < 1e-5 and _rel(s, s_ref) < 1e-5


def test_bwd_variant_selection(wkv_cuda, monkeypatch):
    """KAGGLETRAIN_WKV_BWD picks the backward per call; all five agree closely (old and new: the same math
    with different sub-chunk lengths for the recomputed states; chunk: the chunked algebra; fused: chunk's
    arithmetic in one launch; scan: the dS recursion in chunks too, sm_80+, else it runs chunk)."""
    from rwkv_cuda.loader import load_extension

    ext = load_extension()
    tensor_cores = torch.cuda.get_device_capability()[0] >= 8
    grads = {}
    for variant in ("old", "new", "chunk", "fused", "scan"):
        monkeypatch.setenv("KAGGLETRAIN_WKV_BWD", variant)
        assert ext.bwd_variant() == (variant if variant != "scan" or tensor_cores else "chunk")
        ins, g = _inputs(2, 200, 3, torch.float32, seed=17)
        s0 = torch.randn(2, 3, N, N, generator=g, device="cuda") * 0.5
        X = [t.clone().requires_grad_() for t in ins + [s0]]
        y, sT = wkv_cuda(*X)
        (y.sum() + (sT ** 2).sum()).backward()
        grads[variant] = [x.grad for x in X]
    monkeypatch.delenv("KAGGLETRAIN_WKV_BWD")
    assert ext.bwd_variant() == "new"  # the default since the H200 run of 2026-11-28
    for a, b, c, f, s in zip(grads["old"], grads["new"], grads["chunk"], grads["fused"], grads["scan"]):
        assert _rel(b, a.double()) < 1e-5 and _rel(c, a.double()) < 1e-5 and _rel(s, a.double()) < 1e-5
        # The same source arithmetic in one launch (bitwise equal in the emulator); nvcc compiles the two kernels
        # separately, so allow its FMA-contraction choices to differ.
        assert _rel(f, c.double()) < 1e-6


def test_rejects_bad_shapes(wkv_cuda):
    ins, _ = _inputs(1, 8, 1, torch.float32, seed=1)
    with pytest.raises(ValueError):
        wkv_cuda(ins[0], ins[1][:, :4], *ins[2:])
    with pytest.raises(ValueError):
        wkv_cuda(*ins, torch.zeros(1, 1, N, N + 1, device="cuda"))


def test_doctor_names_the_backward_and_self_checks_it(wkv_cuda):
    """`kaggletrain doctor --json` in a subprocess with KAGGLETRAIN_WKV_BWD=chunk: it reports that backward and
    its self-check (every supported dtype against float64) passes."""
    import subprocess
    import sys

    env = {**os.environ, "KAGGLETRAIN_WKV_BWD": "chunk"}
    res = subprocess.run([sys.executable, "-m", "kaggletrain", "doctor", "--json"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    kernel = json.loads(res.stdout)["wkv_kernel"]
    assert kernel["backward"] == "chunk" and kernel["status"] == "ok", kernel
    assert kernel["self_check"] and all(c["passed"] for c in kernel["self_check"].values()), kernel
