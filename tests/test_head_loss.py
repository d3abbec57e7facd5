"""The fused head + cross-entropy + L2Wrap (kaggletrain/model/head_loss.py) against the plain path:
head -> cross-entropy -> L2Wrap with autograd, which keeps the logits."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import kaggletrain.model.head_loss as hl
from kaggletrain import RWKVModel
from kaggletrain.model.model import L2Wrap
from tiny_models import make_model  # tests/tiny_models.py


def _plain(h, w, t, l2):
    logits = (h @ w.t())[None]  # [1, N, V]: L2Wrap's factor is 1e-4 / (B*T)
    loss = F.cross_entropy(logits[0], t, ignore_index=hl.IGNORE_INDEX)
    return L2Wrap.apply(loss, logits) if l2 else loss


@pytest.mark.parametrize("l2", [False, True], ids=["ce", "ce+l2wrap"])
@pytest.mark.parametrize("slice_bytes", [1 << 28, 7 * 4 * 50], ids=["one_slice", "slices_of_7"])
def test_fused_matches_plain_float64(l2, slice_bytes, monkeypatch):
    monkeypatch.setattr(hl, "SLICE_BYTES", slice_bytes)
    g = torch.Generator().manual_seed(3)
    N, C, V = 45, 16, 50
    h = torch.randn(N, C, generator=g, dtype=torch.float64)
    w = torch.randn(V, C, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = hl.IGNORE_INDEX
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    up = 3.7  # a loss scale upstream (GradScaler, accumulation)
    (_plain(h1, w1, t, l2) * up).backward()
    loss, count = hl.head_loss(h2, w2, t, torch.float64, 1e-4 / N if l2 else None)
    (loss * up).backward()
    assert count == int((t != hl.IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, _plain(h, w, t, False), rtol=1e-12, atol=0)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-10, atol=1e-14)


def _model_grads(cfg, state, x, amp, return_logits):
    m = RWKVModel(cfg)
    m.load_state_dict(state)
    if amp:
        m.enable_mixed_precision(torch.bfloat16)
    out = m(x[:, :-1], labels=x[:, 1:], shift_labels=False, return_logits=return_logits, l2wrap=True)
    assert (out.logits is None) == (not return_logits)
    out.loss.backward()
    return out.loss.item(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])


def test_model_fused_head_is_exact_in_float32_and_as_accurate_as_the_plain_head_in_bf16():
    """return_logits=False (training) takes the fused path, return_logits=True the plain one, L2Wrap on.
    float32: the same loss and gradients. bf16 autocast: no further from the float32 gradients than the
    plain bf16 path is."""
    m = make_model(hidden_size=64, num_layers=2, vocab_size=211, head_size=32)  # every parameter matters
    cfg, state, x = m.config, m.state_dict(), torch.randint(0, 211, (3, 30))
    ref_loss, ref = _model_grads(cfg, state, x, amp=False, return_logits=True)
    loss, fused32 = _model_grads(cfg, state, x, amp=False, return_logits=False)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert ((fused32 - ref).norm() / ref.norm()).item() < 1e-5  # summation order only
    _, plain16 = _model_grads(cfg, state, x, amp=True, return_logits=True)
    _, fused16 = _model_grads(cfg, state, x, amp=True, return_logits=False)
    err_plain = ((plain16 - ref).norm() / ref.norm()).item()
    err_fused = ((fused16 - ref).norm() / ref.norm()).item()
    assert 0 < err_plain < 5e-2 and err_fused < 1.5 * err_plain, (err_fused, err_plain)


def test_no_gradient_needed_computes_the_loss_only():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    t = torch.randint(0, 30, (10,), generator=g)
    loss, _ = hl.head_loss(h, w, t, torch.float32)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), t), rtol=1e-6, atol=1e-6)


def test_evaluation_forms_no_gradients_and_no_logits(monkeypatch):
    """Under torch.no_grad (evaluation) with parameters that require gradients: only the loss, slice by slice.
    The model's evaluation call (labels, no logits) gives the plain head's loss in float32 and under bf16
    autocast, and no [tokens, vocab] tensor is ever made (slices of 7 rows here)."""
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g).requires_grad_()
    t = torch.randint(0, 30, (40,), generator=g)
    monkeypatch.setattr(hl, "SLICE_BYTES", 7 * 4 * 30)
    shapes = []
    real_log_probs = hl.log_probs
    monkeypatch.setattr(hl, "log_probs", lambda logits: shapes.append(tuple(logits.shape)) or real_log_probs(logits))
    with torch.no_grad():
        loss, _ = hl.head_loss(h, w, t, torch.float32, 1e-4 / 40)
    assert not loss.requires_grad and max(n for n, _ in shapes) == 7
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.detach().t(), t), rtol=1e-6, atol=1e-6)

    m = make_model(hidden_size=64, num_layers=2, vocab_size=211, head_size=32).eval()
    x = torch.randint(0, 211, (3, 30), generator=g)
    for amp in (None, torch.bfloat16):
        if amp is not None:
            m.enable_mixed_precision(amp)
        shapes.clear()
        with torch.no_grad():
            fused = m(x, labels=x, return_logits=False)
            plain = m(x, labels=x, return_logits=True)
        assert plain.logits is not None and fused.logits is None and shapes[0][0] <= 7
        assert fused.num_targets == plain.num_targets
        torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-5)


def _sliced_case(seed, monkeypatch):
    """70 tokens, vocabulary 3000, in slices of 16 rows (the last one shorter); every sixth target ignored."""
    monkeypatch.setattr(hl, "SLICE_BYTES", 16 * 4 * 3000)
    g = torch.Generator().manual_seed(seed)
    N, C, V = 70, 32, 3000
    h = torch.randn(N, C, generator=g) * 2
    w = torch.randn(V, C, generator=g) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    t[::6] = hl.IGNORE_INDEX
    return h, w, t


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_head_is_as_accurate_as_the_plain_head_in_that_precision(dtype, monkeypatch):
    """fp16/bf16 products: the fused head (softmax straight to the half-precision gradient, the target column
    formed in float32) and the plain one (head in `dtype` -> float32 cross-entropy -> L2Wrap, autograd), both
    against the float64 head. Same loss; gradients no further from float64 than the plain head's. Several
    slices, ignored targets."""
    h, w, t = _sliced_case(11, monkeypatch)
    N = h.shape[0]

    def plain(dt):
        acc = torch.float64 if dt == torch.float64 else torch.float32
        h1, w1 = h.to(acc, copy=True).requires_grad_(), w.to(acc, copy=True).requires_grad_()
        logits = (h1.to(dt) @ w1.to(dt).t()).to(h1.dtype)[None]
        loss = F.cross_entropy(logits[0], t, ignore_index=hl.IGNORE_INDEX)
        L2Wrap.apply(loss, logits).backward()
        return loss.detach(), h1.grad, w1.grad

    exact_loss, *exact = plain(torch.float64)
    plain_loss, *plain_grads = plain(dtype)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = hl.head_loss(h2, w2, t, dtype, 1e-4 / N)
    loss.backward()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    for got, ref, want in zip((h2.grad, w2.grad), plain_grads, exact):
        assert rel(got, want) <= 1.2 * rel(ref, want) + 1e-6, (rel(got, want), rel(ref, want))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_compiled_slices_match_the_eager_head(dtype, monkeypatch):
    """`compile_backend="inductor"` (train.compile) runs each slice's softmax, loss and gradient through torch.compile
    (inductor, here its CPU backend). Same loss and gradients as the eager slices: the same arithmetic, fused.
    Several slices and a shorter last one (a second compiled shape), ignored targets, L2Wrap on."""
    monkeypatch.setattr(hl, "_COMPILED", {})
    torch._dynamo.reset()
    h, w, t = _sliced_case(5, monkeypatch)
    N = h.shape[0]
    got = []
    for compiled in (False, True):
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = hl.head_loss(h2, w2, t, dtype, 1e-4 / N, compile_backend="inductor" if compiled else None)
        (loss * 2.5).backward()
        got.append((loss.detach(), h2.grad, w2.grad))
    (l0, dh0, dw0), (l1, dh1, dw1) = got
    assert "inductor" in hl._COMPILED
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    # float32: summation order; half precision: the gradient is rounded once from float32 either way
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for a, b in ((dh1, dh0), (dw1, dw0)):
        assert ((a - b).norm() / b.norm()).item() < tol
