"""WKV-7 operator: chunk-parallel form vs the sequential reference, gradients, dtypes, dispatch.

Inputs are realistic and random (never zeros): decay logits over a wide range, kk L2-normalised per head,
a_in = -kk, b_in = kk * a with a in (0, 1), as the RWKV-7 time-mix produces them (spec section 1, step 8).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kaggletrain.ops import wkv
from kaggletrain.ops.wkv import resolve_impl
from kaggletrain.ops.wkv_chunked import default_chunk_len, max_chunk_len, wkv_chunked
from kaggletrain.ops.wkv_reference import wkv_sequential

# The package re-exports the function `wkv`, which shadows the submodule of the same name as an attribute.
wkv_mod = importlib.import_module("kaggletrain.ops.wkv")


def make_inputs(B, T, H, N, dtype=torch.float64, seed=0, w_range=(-8.0, 4.0), scale=0.5):
    """Random (r, w, k, v, a, b) [B, T, H, N] in `dtype`, shaped like the RWKV-7 time-mix's WKV call."""
    g = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(B, T, H, N, generator=g, dtype=torch.float64)

    lo, hi = w_range
    w = lo + (hi - lo) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    kk = torch.nn.functional.normalize(randn(), dim=-1)
    lr = torch.rand(B, T, H, N, generator=g, dtype=torch.float64).clamp(0.02, 0.98)
    r, k, v = scale * randn(), scale * randn(), randn()
    return tuple(t.to(dtype) for t in (r, w, k, v, -kk, kk * lr))


def make_state(B, H, N, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(B, H, N, N, generator=g, dtype=torch.float64)).to(dtype)


def run_with_grads(fn, inputs, state, gy, gs):
    """Forward `fn`, backprop random upstream grads on y and the final state; returns (y, sT, grads)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    s0 = None if state is None else state.detach().clone().requires_grad_()
    y, sT = fn(*leaves, s0)
    loss = (y.to(gy.dtype) * gy).sum() + (sT.to(gs.dtype) * gs).sum()
    wrt = leaves + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    return y.detach(), sT.detach(), grads


def rel_err(x, ref):
    """Relative L2 error ||x - ref|| / ||ref||, computed in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


GRAD_NAMES = ("r", "w", "k", "v", "a", "b", "state")


# --------------------------------------------------------------------------------------------------------
# Sequential vs chunk-parallel


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
@pytest.mark.parametrize("T", [1, 15, 37, 100])
def test_float64_matches_sequential(T, with_state):
    B, H, N = 2, 2, 16
    inputs = make_inputs(B, T, H, N, seed=T)
    state = make_state(B, H, N) if with_state else None
    g = torch.Generator().manual_seed(99)
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    gs = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)

    y_ref, s_ref, g_ref = run_with_grads(wkv_sequential, inputs, state, gy, gs)
    y, s, grads = run_with_grads(wkv_chunked, inputs, state, gy, gs)

    assert T % default_chunk_len(torch.float64) != 0 or T == 0
    assert y.dtype == torch.float64 and s.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-10)
    assert len(grads) == len(g_ref) == (7 if with_state else 6)
    for name, gc, gr in zip(GRAD_NAMES, grads, g_ref):
        # With S0 = 0 and one token, w, a and b cannot matter (S_1 = v k^T); otherwise no grad may vanish.
        if with_state or T > 1:
            assert gr.abs().max() > 0, f"reference grad of {name} is zero: the test would be vacuous"
        torch.testing.assert_close(gc, gr, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
@pytest.mark.parametrize("T", [1, 15, 37, 100])
def test_float32_matches_sequential(T, with_state):
    B, H, N = 1, 2, 64
    inputs = make_inputs(B, T, H, N, dtype=torch.float32, seed=100 + T)
    state = make_state(B, H, N, dtype=torch.float32) if with_state else None
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(B, T, H, N, generator=g)
    gs = torch.randn(B, H, N, N, generator=g)

    y_ref, s_ref, g_ref = run_with_grads(wkv_sequential, inputs, state, gy, gs)
    y, s, grads = run_with_grads(wkv_chunked, inputs, state, gy, gs)

    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(s, s_ref) < 1e-4
    for name, gc, gr in zip(GRAD_NAMES, grads, g_ref):
        assert gc.dtype == torch.float32
        if not with_state and T == 1 and name in ("w", "a", "b"):
            # Exactly zero in the reference (S_1 = v k^T); the chunked form leaves rounding residue.
            assert gr.abs().max() == 0 and gc.abs().max() < 1e-6, name
            continue
        assert rel_err(gc, gr) < 1e-4, name


@pytest.mark.parametrize("chunk_len", [1, 3, 8, 16, 33, 64, 200])
def test_chunk_len_does_not_change_the_result(chunk_len):
    B, T, H, N = 1, 70, 2, 8
    inputs = make_inputs(B, T, H, N, seed=5)
    state = make_state(B, H, N)
    y_ref, s_ref = wkv_sequential(*inputs, state)
    y, s = wkv_chunked(*inputs, state, chunk_len=chunk_len)
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(s, s_ref, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize(
    "w_range", [(4.0, 12.0), (-20.0, -12.0), (-12.0, 12.0)], ids=["strongest_decay", "no_decay", "mixed"]
)
@pytest.mark.parametrize("chunk_len", [None, 32, 64])
def test_float32_accuracy_at_extreme_decays(w_range, chunk_len):
    """The exponent-splitting must keep fp32 accurate with the strongest decay (log d ~ -0.6065 per token)
    and with no decay at all, including the longest allowed chunk."""
    B, T, H, N = 1, 150, 2, 64
    inputs64 = make_inputs(B, T, H, N, seed=11, w_range=w_range)
    state64 = make_state(B, H, N)
    y_true, s_true = wkv_sequential(*inputs64, state64)
    inputs32 = [t.float() for t in inputs64]
    y, s = wkv_chunked(*inputs32, state64.float(), chunk_len=chunk_len)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_err(y, y_true) < 1e-5
    assert rel_err(s, s_true) < 1e-5


def test_float32_grads_over_a_long_sequence_with_strong_decay():
    B, T, H, N = 1, 300, 1, 64
    inputs64 = make_inputs(B, T, H, N, seed=12, w_range=(-2.0, 12.0))
    state64 = make_state(B, H, N)
    g = torch.Generator().manual_seed(3)
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    gs = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    _, _, g_true = run_with_grads(wkv_sequential, inputs64, state64, gy, gs)
    _, _, grads = run_with_grads(wkv_chunked, [t.float() for t in inputs64], state64.float(), gy, gs)
    for name, gc, gr in zip(GRAD_NAMES, grads, g_true):
        assert rel_err(gc, gr) < 1e-4, name


# --------------------------------------------------------------------------------------------------------
# gradcheck


@pytest.mark.parametrize("T,chunk_len", [(5, None), (9, 4)])
def test_gradcheck_float64(T, chunk_len):
    B, H, N = 1, 1, 3
    inputs = [t.requires_grad_() for t in make_inputs(B, T, H, N, seed=21, w_range=(-4.0, 4.0))]
    state = make_state(B, H, N).requires_grad_()

    def fn(*args):
        return wkv_chunked(*args, chunk_len=chunk_len)

    assert torch.autograd.gradcheck(fn, (*inputs, state), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_grad_through_only_one_output():
    """Backward works when only y, or only the final state, feeds the loss."""
    B, T, H, N = 1, 21, 1, 8
    inputs = make_inputs(B, T, H, N, seed=31)
    state = make_state(B, H, N)
    for pick in (0, 1):
        grads = []
        for fn in (wkv_sequential, wkv_chunked):
            leaves = [t.clone().requires_grad_() for t in (*inputs, state)]
            out = fn(*leaves)[pick]
            g = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
            grads.append([torch.zeros_like(x) if gx is None else gx for x, gx in zip(leaves, g)])
        for name, gc, gr in zip(GRAD_NAMES, *grads):
            torch.testing.assert_close(gc, gr, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------------------------------------
# dtypes, edge cases, purity


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_inputs(dtype, tol):
    B, T, H, N = 1, 37, 2, 64
    inputs = [t.to(dtype) for t in make_inputs(B, T, H, N, dtype=torch.float32, seed=41)]
    state = make_state(B, H, N, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in inputs]
    y, s = wkv_chunked(*leaves, state)
    assert y.dtype == dtype and s.dtype == torch.float32
    (y.float().square().sum() + s.sum()).backward()
    for t in leaves:
        assert t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all()
    # Same rounded inputs through the fp32 math of the reference: only y's final rounding differs.
    y_ref, s_ref = wkv_sequential(*inputs, state)
    assert rel_err(y, y_ref) < tol
    assert rel_err(s, s_ref) < 1e-5


def test_empty_sequence():
    B, H, N = 2, 3, 8
    inputs = make_inputs(B, 0, H, N)
    y, s = wkv_chunked(*inputs)
    assert y.shape == (B, 0, H, N) and y.dtype == torch.float64
    assert s.shape == (B, H, N, N) and not s.any()
    state = make_state(B, H, N)
    y, s = wkv_chunked(*[t.float() for t in inputs], state.float())
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(s, state.float())


def test_padding_tail_is_an_identity():
    """Running T tokens, then continuing from the returned state, equals one run over both parts."""
    B, H, N = 2, 2, 8
    inputs = make_inputs(B, 45, H, N, seed=51)
    state = make_state(B, H, N)
    y_all, s_all = wkv_chunked(*inputs, state)
    y1, s1 = wkv_chunked(*(t[:, :19] for t in inputs), state)
    y2, s2 = wkv_chunked(*(t[:, 19:] for t in inputs), s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(s2, s_all, atol=1e-12, rtol=1e-12)


def test_inputs_are_not_modified():
    inputs = [t.float() for t in make_inputs(2, 37, 2, 16, seed=61)]
    state = make_state(2, 2, 16, dtype=torch.float32)
    before = [t.clone() for t in (*inputs, state)]
    leaves = [t.requires_grad_() for t in (*inputs, state)]
    y, s = wkv_chunked(*leaves)
    (y.sum() + s.sum()).backward()
    for t, t0 in zip(leaves, before):
        assert torch.equal(t.detach(), t0)


def test_chunk_len_validation():
    inputs = make_inputs(1, 4, 1, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_len"):
        wkv_chunked(*inputs, chunk_len=0)
    with pytest.raises(ValueError, match="chunk_len"):
        wkv_chunked(*inputs, chunk_len=max_chunk_len(torch.float32) + 1)
    assert max_chunk_len(torch.float64) > max_chunk_len(torch.float32) >= 64


# --------------------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_calls_the_named_implementation(monkeypatch):
    import kaggletrain.ops.wkv_chunked as chunked_mod

    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(chunked_mod, "wkv_chunked", spy("chunked", chunked_mod.wkv_chunked))
    monkeypatch.setattr(wkv_mod, "wkv_sequential", spy("sequential", wkv_sequential))

    inputs = make_inputs(1, 9, 2, 8, dtype=torch.float32, seed=71)
    state = make_state(1, 2, 8, dtype=torch.float32)
    y_c, s_c = wkv(*inputs, state, impl="chunked")
    assert calls == ["chunked"]
    y_s, s_s = wkv(*inputs, state, impl="sequential")
    assert calls == ["chunked", "sequential"]
    torch.testing.assert_close(y_c, y_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_c, s_s, atol=1e-5, rtol=1e-5)

    # On CPU, "auto" and "cuda" both end up on the chunked form (sequential for a single token).
    wkv(*inputs, state, impl="auto")
    wkv(*inputs, state, impl="cuda")
    wkv(*(t[:, :1] for t in inputs), state, impl="auto")
    assert calls[2:] == ["chunked", "chunked", "sequential"]


def test_resolve_impl_on_cpu():
    r = torch.zeros(1, 5, 1, 4)
    assert resolve_impl("chunked", r) == "chunked"
    assert resolve_impl("sequential", r) == "sequential"
    assert resolve_impl("auto", r) == "chunked"
    assert resolve_impl("auto", r[:, :1]) == "sequential"
    with pytest.raises(ValueError):
        resolve_impl("fast", r)
