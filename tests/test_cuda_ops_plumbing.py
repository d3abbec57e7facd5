"""The torch.library plumbing around the CUDA WKV kernel (rwkv_cuda/function.py), on the CPU.

The two custom operators (kaggletrain::wkv7_forward / wkv7_backward), their fake (shape) functions and
their autograd registration are exercised with a stand-in for the compiled extension that computes the
same outputs with the float64 sequential reference. What this checks is the plumbing torch.compile and
autograd rely on -- schemas, output shapes, gradient routing, no graph break -- not the kernel (the GPU
tests in test_cuda_kernel.py check that against the same reference).
"""

from __future__ import annotations

import pytest
import torch

import rwkv_cuda.function as fn
from kaggletrain.ops.wkv_reference import wkv_sequential

N = 64


class ReferenceExtension:
    """The compiled extension's forward/backward contract, computed with the sequential reference.
    The initial state travels in checkpoint slot 0 (the real kernel's checkpoint 0 is the initial state too)."""

    @staticmethod
    def supported(n, dtype):
        return n == N and dtype in ("float32", "float16", "bfloat16")

    @staticmethod
    def forward(r, w, k, v, a, b, s0, save):
        B, T, H, _ = r.shape
        with torch.no_grad():
            y, sT = wkv_sequential(*(t.double() for t in (r, w, k, v, a, b)), None if s0 is None else s0.double())
        nck = (T + fn.CKPT_LEN - 1) // fn.CKPT_LEN + 1
        ckpt = torch.zeros(B, H, nck, N, N) if save else torch.empty(0)
        if save and s0 is not None:
            ckpt[:, :, 0] = s0
        sa = torch.zeros(B, T, H, N) if save else torch.empty(0)
        return [y.to(r.dtype), sT.float(), ckpt, sa]

    @staticmethod
    def backward(r, w, k, v, a, b, dy, dsT, ckpt, sa, need_ds0):
        # By hand (an operator's implementation runs below autograd): the recurrence walked backwards.
        # S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T, y_t = S_t r_t, d = exp(-e^-0.5 sigmoid(w)).
        R, W, K, V, A, Bb, DY = (t.double() for t in (r, w, k, v, a, b, dy))
        Bn, T, H, _ = r.shape
        sig = torch.sigmoid(W)
        d = torch.exp(-0.6065306597126334 * sig)
        states = [ckpt[:, :, 0].double()]  # [B, H, i, j]
        for t in range(T):
            S = states[-1]
            sa_t = (S * A[:, t, :, None, :]).sum(-1)
            states.append(S * d[:, t, :, None, :] + sa_t[..., None] * Bb[:, t, :, None, :]
                          + V[:, t, :, :, None] * K[:, t, :, None, :])
        dS = torch.zeros_like(states[0]) if dsT is None else dsT.double().clone()
        g = {n: torch.zeros(Bn, T, H, N, dtype=torch.float64) for n in "rwkvab"}
        for t in reversed(range(T)):
            S, Sp = states[t + 1], states[t]
            dS = dS + DY[:, t, :, :, None] * R[:, t, :, None, :]
            g["r"][:, t] = (S * DY[:, t, :, :, None]).sum(-2)
            g["v"][:, t] = (dS * K[:, t, :, None, :]).sum(-1)
            g["k"][:, t] = (dS * V[:, t, :, :, None]).sum(-2)
            sa_t = (Sp * A[:, t, :, None, :]).sum(-1)
            g["b"][:, t] = (dS * sa_t[..., None]).sum(-2)
            dsa = (dS * Bb[:, t, :, None, :]).sum(-1)
            g["a"][:, t] = (Sp * dsa[..., None]).sum(-2)
            dd = (dS * Sp).sum(-2)
            g["w"][:, t] = dd * (-0.6065306597126334) * sig[:, t] * (1 - sig[:, t]) * d[:, t]
            dS = dS * d[:, t, :, None, :] + dsa[..., None] * A[:, t, :, None, :]
        out = [g[n].to(t.dtype) for n, t in zip("rwkvab", (r, w, k, v, a, b))]
        return out + [dS.float() if need_ds0 else torch.empty(0)]


@pytest.fixture
def ref_ext(monkeypatch):
    monkeypatch.setattr(fn, "_ext", lambda: ReferenceExtension)
    return ReferenceExtension


def _inputs(B=2, T=37, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = torch.rand(B, T, H, N, generator=g) * 12 - 8
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g) * 0.5
    return [r, w, k, v, -kk, kk * gate], s0


def test_custom_ops_pass_torch_library_opcheck(ref_ext):
    ins, s0 = _inputs(T=21)
    args = tuple(t.requires_grad_() for t in ins) + (s0.requires_grad_(), True)
    torch.library.opcheck(torch.ops.kaggletrain.wkv7_forward.default, args)
    torch.library.opcheck(torch.ops.kaggletrain.wkv7_forward.default, tuple(t.detach() for t in ins) + (None, False))


def _block(r, w, k, v, a, b, s0):
    """A little compute around the operator, as in a time-mix block: a projection in, the WKV, a norm out."""
    y, sT = torch.ops.kaggletrain.wkv7_forward(torch.tanh(r), w, k * 0.5, v, a, b, s0, True)[:2]
    return torch.nn.functional.layer_norm(y, (N,)).square().mean() + sT.square().mean()


def test_compiled_graph_has_no_break_and_matches_eager_gradients(ref_ext):
    torch._dynamo.reset()
    ins, s0 = _inputs()
    eager = [t.clone().requires_grad_() for t in ins + [s0]]
    comp = [t.clone().requires_grad_() for t in ins + [s0]]
    _block(*eager).backward()
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    compiled(*comp).backward()
    for name, e, c in zip(["r", "w", "k", "v", "a", "b", "s0"], eager, comp):
        assert c.grad is not None, name
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_of_initial_state_only_when_it_requires_grad(ref_ext):
    ins, s0 = _inputs(T=17)
    X = [t.clone().requires_grad_() for t in ins]
    y, sT, ckpt, sa = torch.ops.kaggletrain.wkv7_forward(*X, s0, True)  # s0 is a constant here
    assert ckpt.shape == (2, 2, 3, N, N) and sa.shape == X[0].shape
    (y.sum() + sT.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in X)
    y, sT, ckpt, sa = torch.ops.kaggletrain.wkv7_forward(*(t.detach() for t in X), None, False)
    assert ckpt.numel() == 0 and sa.numel() == 0 and y.dtype == X[0].dtype and sT.dtype == torch.float32


def test_reference_extension_gradients_match_autograd(ref_ext):
    """The stand-in's hand-written backward agrees with autograd through the sequential reference."""
    ins, s0 = _inputs(T=19)
    X = [t.double().requires_grad_() for t in ins]
    S0 = s0.double().requires_grad_()
    y, sT = torch.ops.kaggletrain.wkv7_forward(*X, S0, True)[:2]
    g = torch.Generator().manual_seed(5)
    dy, dsT = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(sT.shape, generator=g)
    ((y * dy).sum() + (sT * dsT).sum()).backward()
    R = [t.detach().clone().requires_grad_() for t in X]
    RS0 = S0.detach().clone().requires_grad_()
    y_ref, sT_ref = wkv_sequential(*R, RS0)
    ((y_ref * dy).sum() + (sT_ref * dsT.double()).sum()).backward()
    for name, x, xr in zip(["r", "w", "k", "v", "a", "b", "s0"], X + [S0], R + [RS0]):
        torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_rwkv_blocks_compile_as_one_graph_around_the_operator(ref_ext, monkeypatch):
    """The model's own block code traces in full (fullgraph) under bf16 autocast when the WKV is the operator
    pair, as on a GPU, and the compiled blocks give eager mode's loss and gradients."""
    import sys

    from kaggletrain import RWKVModel
    from tiny_models import make_model  # tests/tiny_models.py

    wkv_module = sys.modules["kaggletrain.ops.wkv"]

    def through_operator(r, w, k, v, a, b, state, impl):
        save = torch.is_grad_enabled()
        return torch.ops.kaggletrain.wkv7_forward(r, w, k, v, a, b, state, save)[:2]

    monkeypatch.setattr(wkv_module, "_dispatch", through_operator)
    torch._dynamo.reset()
    eager = make_model(hidden_size=128, num_layers=2, vocab_size=97, head_size=N).train()  # every parameter matters
    comp = RWKVModel(eager.config)
    comp.load_state_dict(eager.state_dict())
    for m in (eager, comp):
        m.enable_mixed_precision(torch.bfloat16)
    for blk in comp.blocks:
        blk.compile(backend="aot_eager", fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randint(0, 97, (2, 21))
    losses = []
    for m in (eager, comp):
        loss = m(x[:, :-1], labels=x[:, 1:], shift_labels=False, return_logits=False).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    for (name, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        assert (pe.grad is None) == (pc.grad is None), name
        if pe.grad is not None:
            torch.testing.assert_close(pc.grad, pe.grad, rtol=2e-2, atol=1e-4, msg=name)
