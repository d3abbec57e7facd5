"""CPU heap trimming around recomputations (kaggletrain/model/cpu_memory.py).

Chunked training calls `cpu_memory.release()` before each chunk (and its recomputation), selective
gradient checkpointing before each block's forward (not before its recomputation; "full" checkpointing
keeps no per-block graph and needs no trim); it trims glibc's heap unless switched off by
KAGGLETRAIN_CPU_MALLOC_TRIM=0 or `set_enabled(False)`. Trimming must not change any result: checkpointed
and chunked gradients equal the plain ones.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kaggletrain import ModelConfig, RWKVModel
from kaggletrain.model import cpu_memory

needs_glibc = pytest.mark.skipif(not cpu_memory.available(), reason="glibc malloc_trim not available")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv(cpu_memory.ENV, raising=False)
    cpu_memory.set_enabled(None)
    monkeypatch.setattr(cpu_memory, "MIN_FREE", 0)   # trim on every call, whatever the heap holds
    yield
    cpu_memory.set_enabled(None)
    torch.set_num_threads(n)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=53, hidden_size=32, num_layers=3, head_size=16, rwkv_chunk_size=8, wkv_impl="chunked")
    cfg.update(kw)
    model = RWKVModel(ModelConfig(**cfg))
    with torch.no_grad():   # move off the official init, which zeroes the output projections
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, return_logits=False, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_glibc
def test_release_trims_and_can_be_switched_off(monkeypatch):
    before = cpu_memory.calls
    assert cpu_memory.enabled()
    assert cpu_memory.release("cpu") is True
    assert cpu_memory.calls == before + 1
    assert cpu_memory.release("cuda") is False              # CPU heap only
    assert cpu_memory.release("cpu", min_free=1 << 60) is False
    cpu_memory.set_enabled(False)
    assert cpu_memory.release("cpu") is False
    cpu_memory.set_enabled(None)
    monkeypatch.setenv(cpu_memory.ENV, "0")
    assert not cpu_memory.enabled()
    assert cpu_memory.release("cpu") is False
    assert cpu_memory.calls == before + 1
    assert cpu_memory.heap_free_bytes() is None or cpu_memory.heap_free_bytes() >= 0


def test_env_var_switches_it_off_in_a_fresh_process():
    code = ("from kaggletrain.model import cpu_memory as m; import sys; "
            "sys.exit(0 if (not m.enabled() and not m.release('cpu', 0) and m.calls == 0) else 1)")
    env = dict(os.environ, **{cpu_memory.ENV: "off"})
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


@needs_glibc
@pytest.mark.parametrize("chunking", [False, True])
def test_training_step_trims_and_gradients_are_unchanged(chunking):
    model = make_model()
    ids = torch.randint(0, 53, (2, 37), generator=torch.Generator().manual_seed(1))
    kw = dict(use_chunking=chunking, bptt="full")
    cpu_memory.set_enabled(False)
    loss_ref, g_ref = grads(model, ids, **kw)
    model.enable_gradient_checkpointing()
    loss_ck_off, g_ck_off = grads(model, ids, **kw)
    cpu_memory.set_enabled(True)
    before = cpu_memory.calls
    loss_ck, g_ck = grads(model, ids, **kw)
    trims = cpu_memory.calls - before
    # "full" checkpointing recomputes graph-free blocks (no graph nodes fragment the heap, nothing to
    # trim): the trims come from the chunks' recomputations only.
    assert (trims > 0) == chunking
    model.enable_gradient_checkpointing(False)
    before = cpu_memory.calls
    loss_plain, g_plain = grads(model, ids, **kw)
    assert (cpu_memory.calls - before > 0) == chunking     # chunk recomputations only when chunked
    for loss in (loss_ck_off, loss_ck, loss_plain):
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
    assert g_ref.keys() == g_ck.keys() == g_plain.keys() == g_ck_off.keys()
    for n in g_ref:
        torch.testing.assert_close(g_ck_off[n], g_ref[n], rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(g_ck[n], g_ck_off[n], rtol=0, atol=0, msg=n)      # trimming changes nothing
        torch.testing.assert_close(g_plain[n], g_ref[n], rtol=0, atol=0, msg=n)


def test_no_trim_when_disabled_during_training():
    model = make_model().enable_gradient_checkpointing()
    ids = torch.randint(0, 53, (1, 20))
    cpu_memory.set_enabled(False)
    before = cpu_memory.calls
    grads(model, ids, use_chunking=True)
    assert cpu_memory.calls == before
