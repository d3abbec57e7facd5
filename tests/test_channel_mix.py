"""The channel-mix's value(relu(key(x)) ** 2) in training keeps relu(key(x)) alone for the backward pass
(model/rwkv7.py ReluSquareProject), with the values and gradients autograd gives the plain form, to the bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kaggletrain.model.config import ModelConfig
from kaggletrain.model.model import RWKVModel
from kaggletrain.model.rwkv7 import ReluSquareProject


def _plain(kpre, lin):
    h = torch.relu(kpre)
    return lin(h * h)


@pytest.mark.parametrize("dtype,amp", [(torch.float64, None), (torch.float32, None), (torch.float32, torch.bfloat16),
                                       (torch.float32, torch.float16)])
def test_same_values_and_gradients_as_the_plain_form_to_the_bit(dtype, amp):
    torch.manual_seed(1)
    lin = nn.Linear(192, 48, bias=False).to(dtype)
    kpre0 = torch.randn(3, 29, 192, dtype=dtype)  # about half negative: the relu's mask matters
    g = torch.randn(3, 29, 48, dtype=dtype)
    got = []
    for fused in (False, True):
        kpre = kpre0.clone().requires_grad_(True)
        lin.weight.grad = None
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            k = kpre.to(amp) if amp else kpre  # (under autocast the key projection hands it over in half)
            out = ReluSquareProject.apply(k, lin.weight) if fused else _plain(k, lin)
        out.backward(g.to(out.dtype))
        got.append((out.detach(), kpre.grad, lin.weight.grad))
    for a, b in zip(*got):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_gradcheck_float64():
    torch.manual_seed(2)
    kpre = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReluSquareProject.apply, (kpre, w))


def _saved_ffn_bytes(model, ids, ffn_width):
    """Bytes of the [B, T, 4C] activations that autograd keeps for backward over one forward (distinct
    storages; the weights it keeps are not counted)."""
    seen = {}

    def pack(t):
        if t.shape[-1] == ffn_width and t.numel() == ids.numel() * ffn_width:  # ([B, T, 4C] or [B * T, 4C])
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids, shift_labels=False, return_logits=False).loss
    loss.backward()
    return sum(seen.values())


def test_a_training_step_keeps_one_ffn_activation_per_layer_not_two():
    torch.manual_seed(3)
    model = RWKVModel(ModelConfig(hidden_size=64, num_layers=2, head_size=16, vocab_size=50))
    ids = torch.randint(0, 50, (2, 24))
    per_tensor = 2 * 24 * 4 * 64 * 4  # one [B, T, 4C] float32 activation
    assert _saved_ffn_bytes(model, ids, 4 * 64) == 2 * per_tensor  # h of each of the 2 layers
    # Without gradients (inference, evaluation) the plain form runs, and nothing is kept.
    with torch.no_grad():
        out = model(ids, labels=ids, shift_labels=False, return_logits=False)
    assert torch.isfinite(out.loss)
