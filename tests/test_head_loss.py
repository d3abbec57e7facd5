"""The fused head + cross-entropy + L2Wrap (kaggletrain/model/head_loss.py) against the plain path:
head -> cross-entropy -> L2Wrap with autograd, which keeps the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kaggletrain.model.head_loss as hl
from kaggletrain import ModelConfig, RWKVModel
from kaggletrain.model.model import L2Wrap


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


def test_model_training_loss_and_gradients_match_the_plain_head_under_bf16_autocast():
    """return_logits=False (training) takes the fused path, return_logits=True the plain one: same loss, same
    gradients to bf16 rounding, with L2Wrap on."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, num_layers=2, vocab_size=211, head_size=32)
    a, b = RWKVModel(cfg), RWKVModel(cfg)
    with torch.no_grad():
        for p in a.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.enable_mixed_precision(torch.bfloat16)
    x = torch.randint(0, 211, (3, 30))
    la = a(x[:, :-1], labels=x[:, 1:], shift_labels=False, return_logits=False, l2wrap=True)
    lb = b(x[:, :-1], labels=x[:, 1:], shift_labels=False, return_logits=True, l2wrap=True)
    assert la.logits is None and lb.logits is not None and la.num_targets == lb.num_targets == 87
    torch.testing.assert_close(la.loss, lb.loss, rtol=1e-5, atol=0)
    la.loss.backward()
    lb.loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        rel = ((pa.grad - pb.grad).norm() / pb.grad.norm().clamp_min(1e-12)).item()
        assert rel < 2e-2, f"{name}: relative L2 difference {rel:.2e}"


def test_no_gradient_needed_computes_the_loss_only():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    t = torch.randint(0, 30, (10,), generator=g)
    loss, _ = hl.head_loss(h, w, t, torch.float32)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), t), rtol=1e-6, atol=1e-6)
