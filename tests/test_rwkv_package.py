"""kaggletrain's RWKV-7 against the official `rwkv` pip package (0.8.32), a real, independent implementation.

The package needs RWKV_V7_ON=1 before it is imported and keeps its dtype/device and TorchScript functions in
module globals, so it runs in a subprocess: none of that leaks into the test process. The model's state
dict is saved as a float32 `.pth` exactly as `state_dict()` gives it (official key names, including
`blocks.0.att.v0/v1/v2`, which the package ignores).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kaggletrain import ModelConfig, RWKVModel

pytestmark = pytest.mark.skipif(importlib.util.find_spec("rwkv") is None, reason="rwkv package not installed")

LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
TOL = 1e-5

RUNNER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from rwkv.model import RWKV   # RWKV_V7_ON=1 is set in the environment: this is RWKV_x070

    job = json.load(open(sys.argv[1]))
    model = RWKV(model=job["model"], strategy="cpu fp32")
    assert type(model).__name__ == "RWKV_x070", type(model).__name__
    res = {}
    logits, state = model.forward(job["tokens"], None, full_output=True)
    res["logits"] = logits.clone()
    res["state"] = [s.clone() for s in state]
    one, state = model.forward([job["next_token"]], state)       # one token, RNN mode
    res["one"] = one.clone()
    more, state = model.forward(job["more_tokens"], state, full_output=True)
    res["more"] = more.clone()
    res["state_end"] = [s.clone() for s in state]
    torch.save(res, job["out"])
""")


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random, non-zero weights everywhere (the official init zeros several matrices)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.split(".")[-1]
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if name == "emb.weight":
            scale = 1.0
        elif p.dim() == 2 and leaf in LORA:
            scale = 0.6 / math.sqrt(p.shape[0])
        elif p.dim() == 2 and leaf == "r_k":
            scale = 0.3
        elif p.dim() == 2:
            scale = 0.6 / math.sqrt(p.shape[1])
        else:
            scale = 0.3
        p.add_((noise * scale).to(p.dtype))
    return model


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Run one random-weight model through both implementations (one subprocess for the package)."""
    tmp = tmp_path_factory.mktemp("rwkv_pip")
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=128, num_layers=3, vocab_size=256, head_size=64)
    model = perturb(RWKVModel(cfg), 1234).float().eval()
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 256, (37,), generator=gen)
    next_token = int(torch.randint(0, 256, (1,), generator=gen))
    more = torch.randint(0, 256, (6,), generator=gen)

    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    assert {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} <= set(sd)
    torch.save(sd, tmp / "model.pth")
    job = {"model": str(tmp / "model"), "tokens": tokens.tolist(), "next_token": next_token,
           "more_tokens": more.tolist(), "out": str(tmp / "out.pt")}
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "runner.py").write_text(RUNNER)
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(tmp / "runner.py"), str(tmp / "job.json")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=str(tmp))
    assert proc.returncode == 0, f"rwkv package run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    pkg = torch.load(tmp / "out.pt")

    with torch.no_grad():
        ours = model(tokens[None])
        ours_one = model(torch.tensor([[next_token]]), state=ours.state)
        ours_more = model(more[None], state=ours_one.state)
    return {"model": model, "pkg": pkg, "ours": ours, "ours_one": ours_one, "ours_more": ours_more}


def _close(a, b, tol=TOL, what=""):
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=0, msg=lambda m: f"{what}\n{m}")


def test_logits_match_rwkv_package(compared):
    pkg, ours = compared["pkg"], compared["ours"]
    assert pkg["logits"].shape == ours.logits[0].shape
    assert ours.logits.abs().max() > 0.5  # logits of order 1: the tolerance is meaningful
    _close(ours.logits[0], pkg["logits"], what="sequence logits")


def test_state_matches_rwkv_package(compared):
    """Per layer: att x_prev [C] (ln1 output), S [H, N, N] in [head, value, key] layout, ffn x_prev [C]."""
    pkg, ours, L = compared["pkg"], compared["ours"], compared["model"].config.num_layers
    assert len(pkg["state"]) == 3 * L
    for i in range(L):
        ls = ours.state.layers[i]
        _close(ls.att_shift[0], pkg["state"][3 * i], what=f"layer {i} att x_prev")
        assert pkg["state"][3 * i + 1].dtype == torch.float32 and ls.wkv.dtype == torch.float32
        _close(ls.wkv[0], pkg["state"][3 * i + 1], what=f"layer {i} wkv state")
        _close(ls.ffn_shift[0], pkg["state"][3 * i + 2], what=f"layer {i} ffn x_prev")
        # the comparison is layout-sensitive: a transposed state would fail it
        assert (ls.wkv[0] - pkg["state"][3 * i + 1].transpose(-1, -2)).abs().max() > 1e-3


def test_continuation_matches_rwkv_package(compared):
    """Continuing from the returned state: one token (the package's RNN path), then a sequence."""
    pkg = compared["pkg"]
    _close(compared["ours_one"].logits[0, 0], pkg["one"], what="one-token continuation")
    _close(compared["ours_more"].logits[0], pkg["more"], what="sequence continuation")
    L = compared["model"].config.num_layers
    for i in range(L):
        _close(compared["ours_more"].state.layers[i].wkv[0], pkg["state_end"][3 * i + 1], what=f"end state {i}")
