"""torch.compile through the CUDA WKV kernel (GPU only; skipped without CUDA).

The kernel is a pair of torch custom operators, so a compiled block is one graph with the kernel inside
(no graph break), and its gradients must match eager mode's.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

N = 64


@pytest.fixture(scope="module", autouse=True)
def kernel_builds():
    from rwkv_cuda import build_info, kernel_available

    if not kernel_available(N):
        pytest.fail(f"the CUDA kernel did not build on this GPU machine: {build_info()}")


def test_wkv_dispatch_compiles_as_one_graph_with_eager_gradients():
    from kaggletrain.ops.wkv import wkv

    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(7)
    B, T, H = 2, 45, 3
    r, k, v = (torch.randn(B, T, H, N, device="cuda", generator=g) for _ in range(3))
    w = torch.rand(B, T, H, N, device="cuda", generator=g) * 12 - 8
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, device="cuda", generator=g), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, device="cuda", generator=g)
    s0 = torch.randn(B, H, N, N, device="cuda", generator=g) * 0.5

    def f(r, w, k, v, a, b, s0):
        y, sT = wkv(torch.tanh(r).bfloat16(), w, k.bfloat16(), v.bfloat16(), a.bfloat16(), b.bfloat16(), s0)
        return y.float().square().mean() + sT.square().mean()

    eager = [t.clone().requires_grad_() for t in (r, w, k, v, a, b, s0)]
    comp = [t.clone().requires_grad_() for t in (r, w, k, v, a, b, s0)]
    f(*eager).backward()
    torch.compile(f, backend="aot_eager", fullgraph=True)(*comp).backward()  # fullgraph: a break fails
    for name, e, c in zip(["r", "w", "k", "v", "a", "b", "s0"], eager, comp):
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_blocks_train_like_eager():
    """train.compile's path (Module.compile per block, inductor) on a small model under bf16 autocast:
    same loss and parameter gradients as eager, to bf16 rounding."""
    from kaggletrain import RWKVModel
    from tiny_models import make_model  # tests/tiny_models.py

    torch._dynamo.reset()
    # make_model: the official init plus noise everywhere, so every parameter gets a gradient.
    eager = make_model(hidden_size=128, num_layers=2, vocab_size=97, head_size=N).train().cuda()
    comp = RWKVModel(eager.config).cuda()
    comp.load_state_dict(eager.state_dict())
    for m in (eager, comp):
        m.enable_mixed_precision(torch.bfloat16)
    for blk in comp.blocks:
        blk.compile()
    x = torch.randint(0, 97, (2, 77), device="cuda")
    losses = []
    for m in (eager, comp):
        loss = m(x[:, :-1], labels=x[:, 1:], shift_labels=False, return_logits=False).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-2 * abs(losses[0])
    worst = {}
    for (name, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        if pe.grad is None:
            assert pc.grad is None, name
            continue
        assert pc.grad is not None and pc.grad.shape == pe.grad.shape, name
        worst[name] = ((pc.grad - pe.grad).norm() / pe.grad.norm().clamp_min(1e-12)).item()
    bad = {k: f"{v:.1e}" for k, v in worst.items() if not v < 5e-2}
    assert not bad, f"compiled gradients differ from eager (relative L2): {bad}"
