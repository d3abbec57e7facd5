"""Gradient checkpointing (`RWKVModel.enable_gradient_checkpointing`, modes "full" and "selective").

Checkpointing must not change any result: the loss, the returned state and every parameter's gradient
(and the incoming state's gradient) with checkpointing on are bit-identical to those without, in both modes,
for masks, learnable states, incoming states, chunking (with overlap, recomputed chunks, whose `split`
mid-states pass through the checkpointed regions), hybrid RWKV/attention models; under autocast (bf16)
too. Selective mode must never recompute the WKV, and must keep less memory than no checkpointing.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from kaggletrain.model import cpu_memory
from kaggletrain.model.state import ModelState
from tiny_models import make_chunked_model  # tests/tiny_models.py

V = 37

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def astuple(ls):
    return tuple(getattr(ls, f.name) for f in fields(ls))


def make_model(seed=0, dtype=torch.float64, **kw):
    return make_chunked_model(seed, **{"vocab_size": V, "num_layers": 3, **kw}).to(dtype)


def run(model, ids, state=None, **kw):
    model.zero_grad(set_to_none=True)
    if state is not None:
        state = ModelState([None if ls is None else type(ls)(*(t.detach().clone().requires_grad_()
                                                              if t is not None and t.is_floating_point() else t
                                                              for t in astuple(ls))) for ls in state.layers],
                           state.position)
    out = model(ids, labels=ids, state=state, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if state is not None:
        for i, ls in enumerate(state.layers):
            for j, t in enumerate(astuple(ls) if ls is not None else ()):
                if isinstance(t, torch.Tensor) and t.grad is not None:
                    grads[f"state.{i}.{j}"] = t.grad.clone()
    return out, grads


def check_equal(model, ids, modes=("full", "selective"), tol=0.0, **kw):
    model.enable_gradient_checkpointing(False)
    ref, g_ref = run(model, ids, **kw)
    for mode in modes:
        model.enable_gradient_checkpointing(True, mode=mode)
        out, g = run(model, ids, **kw)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=tol)
        assert g.keys() == g_ref.keys(), mode
        for n in g_ref:
            torch.testing.assert_close(g[n], g_ref[n], rtol=0, atol=tol, msg=f"{mode}: {n}")
        for a, b in zip(out.state.layers, ref.state.layers):
            for x, y in zip(astuple(a), astuple(b)):
                if isinstance(x, torch.Tensor):
                    torch.testing.assert_close(x, y, rtol=0, atol=tol)
    model.enable_gradient_checkpointing(False)


def ids_batch(B=2, T=29, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_mode_validation_and_default():
    model = make_model(dtype=torch.float32, num_layers=1)
    assert model._grad_ckpt_mode == "full"
    with pytest.raises(ValueError):
        model.enable_gradient_checkpointing(True, mode="partial")
    model.enable_gradient_checkpointing(True, mode="selective")
    model.enable_gradient_checkpointing(False)
    model.enable_gradient_checkpointing()              # keeps the mode chosen last
    assert model._grad_ckpt and model._grad_ckpt_mode == "selective"


@pytest.mark.parametrize("learnable", [False, True])
def test_gradients_equal_plain(learnable):
    check_equal(make_model(seed=2, rwkv_use_learnable_states=learnable), ids_batch(), tol=0.0)


def test_gradients_equal_with_mask_and_incoming_state():
    model = make_model(seed=3)
    ids = ids_batch(seed=4)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, -4:] = 0
    with torch.no_grad():
        state = model(ids_batch(seed=5, T=11)).state
    check_equal(model, ids, attention_mask=mask, state=state, tol=0.0)


@pytest.mark.parametrize("ov,return_logits", [(0, False), (3, False), (3, True)])
def test_gradients_equal_chunked(ov, return_logits):
    """Chunked training with overlap: the `split` mid-states come out of the checkpointed regions."""
    model = make_model(seed=6, rwkv_chunk_overlap=ov, rwkv_use_learnable_states=True)
    check_equal(model, ids_batch(T=37, seed=7), use_chunking=True, return_logits=return_logits, tol=0.0)


def test_gradients_equal_hybrid_chunked():
    model = make_model(seed=8, num_layers=4, layer_pattern="RARA", rwkv_chunk_overlap=3)
    check_equal(model, ids_batch(T=30, seed=9), use_chunking=True, return_logits=False, tol=0.0)
    check_equal(model, ids_batch(T=30, seed=9), tol=0.0)


def test_under_autocast_bitwise():
    """bf16 autocast: checkpointed regions are recomputed under the forward's autocast settings, so the
    gradients are bit-identical to no checkpointing."""
    model = make_model(seed=10, dtype=torch.float32).enable_mixed_precision(torch.bfloat16)
    check_equal(model, ids_batch(seed=11), tol=0.0)
    check_equal(model, ids_batch(T=37, seed=11), use_chunking=True, return_logits=False, tol=0.0)


def count_wkv_calls(model, ids, mode):
    import kaggletrain.model.rwkv7 as rw

    calls = []
    orig = rw.wkv

    def counting(*a, **k):
        calls.append(torch.is_grad_enabled())
        return orig(*a, **k)

    rw.wkv = counting
    try:
        model.enable_gradient_checkpointing(True, mode=mode)
        run(model, ids)
    finally:
        rw.wkv = orig
        model.enable_gradient_checkpointing(False)
    return len(calls)


def test_selective_never_recomputes_the_wkv():
    model = make_model(seed=12, dtype=torch.float32, num_layers=3)
    ids = ids_batch(seed=13)
    assert count_wkv_calls(model, ids, "selective") == 3
    assert count_wkv_calls(model, ids, "full") == 6


def saved_bytes(model, ids):
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    out.loss.backward()
    return sum(seen.values())


def test_checkpointing_keeps_less():
    model = make_model(seed=14, dtype=torch.float32, num_layers=4, hidden_size=64, head_size=32)
    ids = ids_batch(B=1, T=256, seed=15)
    plain = saved_bytes(model, ids)
    model.enable_gradient_checkpointing(True, mode="selective")
    selective = saved_bytes(model, ids)
    model.enable_gradient_checkpointing(True, mode="full")
    full = saved_bytes(model, ids)
    assert full < selective < plain / 1.5, (plain, selective, full)


@pytest.mark.skipif(not cpu_memory.available(), reason="needs glibc")
def test_trims_once_per_block_in_the_forward_pass():
    model = make_model(seed=16, dtype=torch.float32).enable_gradient_checkpointing(True, mode="selective")
    cpu_memory.set_enabled(True)
    old = cpu_memory.MIN_FREE
    cpu_memory.MIN_FREE = 0
    try:
        before = cpu_memory.calls
        run(model, ids_batch(seed=17))
        assert cpu_memory.calls - before == 3              # once per block, in the forward pass only
    finally:
        cpu_memory.MIN_FREE = old
        cpu_memory.set_enabled(None)
