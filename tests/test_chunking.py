"""Chunked processing (`forward(use_chunking=True)`): exactness, overlap semantics, BPTT, memory.

Pure RWKV: chunked and unchunked forward agree (float32, 1e-5) for logits, loss, target count and state,
for many chunk sizes and overlaps, sequences that are not a multiple of the chunk, masks and incoming
states; `bptt="full"` gradients equal the unchunked gradients for every parameter.
Hybrid: an attention block at a position of the chunk that starts at s sees exactly the tokens
[s - overlap, t] (checked against a reference built from the blocks, and by perturbation), and every
token's loss is counted once.
`bptt="truncated"`: equals feeding the chunks one by one with a detached state, and no gradient crosses a
chunk boundary.

Models are randomised around the official init (which zeroes every output projection, so an unperturbed
model would not exercise most paths).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kaggletrain import RWKVModel
from kaggletrain.model.state import ModelState
from tiny_models import make_chunked_model  # tests/tiny_models.py

V = 61


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_model(seed: int = 0, **kw) -> RWKVModel:
    return make_chunked_model(seed, **{"vocab_size": V, **kw})


def set_chunking(model: RWKVModel, cs: int, ov: int) -> RWKVModel:
    model.config.rwkv_chunk_size, model.config.rwkv_chunk_overlap = cs, ov
    return model


def rand_batch(seed: int, B: int, T: int, ignore_frac: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return ids, labels


def chunk_windows(T: int, cs: int, ov: int):
    """(lo, s, hi) per chunk: tokens [lo, hi) are processed, outputs kept for [s, hi)."""
    return [(max(0, s - ov) if s else 0, s, min(T, s + cs)) for s in range(0, T, cs)]


def assert_states_close(a: ModelState, b: ModelState, atol=1e-5):
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        for name in ("att_shift", "wkv", "ffn_shift"):
            ta, tb = getattr(la, name), getattr(lb, name)
            torch.testing.assert_close(ta, tb, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(a.position, b.position)


def grads_of(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, out


def assert_grads_close(g, g_ref, rel_each=2e-5, rel_all=1e-5):
    """Every parameter's gradient within `rel_each` (relative L2), all of them together within `rel_all`.

    float32 note: the unchunked float32 gradient itself is up to ~8e-6 (relative, per tensor) away from the
    float64 gradient of the same model, so per-tensor agreement between two float32 computations cannot be
    asked much tighter than 1e-5; the float64 test below shows the agreement is exact up to rounding."""
    assert set(g) == set(g_ref), set(g) ^ set(g_ref)
    err_all = ref_all = 0.0
    for n in g_ref:
        scale = g_ref[n].norm().item()
        err = (g[n] - g_ref[n]).norm().item()
        assert err <= rel_each * max(scale, 1e-6), f"{n}: |dg| = {err:.3g}, |g| = {scale:.3g}"
        err_all, ref_all = err_all + err**2, ref_all + scale**2
    assert err_all**0.5 <= rel_all * ref_all**0.5, f"all parameters: {err_all**0.5:.3g} vs {ref_all**0.5:.3g}"


# ---------------------------------------------------------------------------------------------
# Pure RWKV: chunked == unchunked
# ---------------------------------------------------------------------------------------------

CASES = [  # (T, chunk, overlap)
    (37, 8, 0), (37, 8, 3), (37, 8, 7), (37, 5, 4), (40, 8, 2), (37, 36, 1), (37, 1, 0), (37, 2, 1),
    (9, 8, 5), (64, 16, 15),
]


@pytest.mark.parametrize("T,cs,ov", CASES)
def test_chunked_equals_unchunked_pure_rwkv(T, cs, ov):
    model = make_model(seed=T + cs + ov)
    ids, labels = rand_batch(seed=cs * 100 + ov, B=2, T=T)
    with torch.no_grad():
        ref = model(ids, labels=labels)
        set_chunking(model, cs, ov)
        out = model(ids, labels=labels, use_chunking=True)
        out_nl = model(ids, labels=labels, use_chunking=True, return_logits=False)
    assert out.logits.shape == ref.logits.shape == (2, T, V)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_nl.loss, ref.loss, atol=1e-5, rtol=0)
    assert out.num_targets == out_nl.num_targets == ref.num_targets == int((labels[:, 1:] != -100).sum())
    assert_states_close(out.state, ref.state)
    assert out_nl.logits is None


def test_chunked_equals_unchunked_with_padding_and_incoming_state():
    model = set_chunking(make_model(seed=3), 7, 3)
    B, T = 3, 41
    ids, labels = rand_batch(seed=5, B=B, T=T)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :5] = 0        # left padding
    mask[1, -6:] = 0       # right padding
    mask[2, 10:13] = 0     # a hole
    prefix, _ = rand_batch(seed=6, B=B, T=11)
    with torch.no_grad():
        state = model(prefix).state
        ref = model(ids, attention_mask=mask, labels=labels, state=state)
        out = model(ids, attention_mask=mask, labels=labels, state=state, use_chunking=True)
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], ref.logits[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert out.num_targets == ref.num_targets
    assert_states_close(out.state, ref.state)
    assert out.state.position.tolist() == [11 + int(m.sum()) for m in mask]


def test_chunking_only_applies_above_chunk_size():
    model = set_chunking(make_model(seed=4), 16, 4)
    ids, labels = rand_batch(seed=1, B=1, T=16)
    with torch.no_grad():
        a = model(ids, labels=labels, use_chunking=True)
        b = model(ids, labels=labels)
    assert torch.equal(a.logits, b.logits)


def test_returned_state_does_not_pin_chunk_activations():
    """The token-shift state is the last LayerNorm output, a view of a [B, T, C] tensor: carried or
    returned as it is, it would keep that whole tensor alive (per chunk: memory growing with T)."""
    model = set_chunking(make_model(seed=8), 8, 2)
    ids, labels = rand_batch(seed=2, B=2, T=40)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    # Tensors saved for backward *outside* the per-chunk checkpoints (what survives between chunks).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=labels, use_chunking=True, return_logits=False)
    floats = [t for t in packed if t.is_floating_point()]
    assert floats, "expected the carried states to be saved for the recomputation"
    for t in floats:
        assert t.untyped_storage().nbytes() <= t.numel() * t.element_size(), tuple(t.shape)
    for ls in out.state.layers:
        for t in (ls.att_shift, ls.ffn_shift, ls.wkv):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# Hybrid models: attention context across chunk boundaries, each token counted once
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cs,ov", [(8, 3), (8, 0), (6, 5), (10, 1)])
def test_hybrid_attention_sees_exactly_the_overlap_window(cs, ov):
    """RWKV blocks followed by an attention block: the RWKV part is exact, so the chunked logits at a
    position t of the chunk starting at s must equal the attention block run on the window [s - ov, t]
    of the exact RWKV output."""
    model = set_chunking(make_model(seed=11, num_layers=3, layer_pattern="RRA"), cs, ov)
    T = 35
    ids, labels = rand_batch(seed=12, B=2, T=T)
    with torch.no_grad():
        out = model(ids, labels=labels, use_chunking=True)
        x = model._embed(ids, None)
        v_first = None
        for blk in model.blocks[:2]:
            x, v_first, _, _ = blk(x, v_first, None)
        parts = []
        for lo, s, hi in chunk_windows(T, cs, ov):
            xa, _ = model.blocks[2](x[:, lo:hi], None, None)
            parts.append(model.head(model.ln_out(xa))[:, s - lo:])
        ref = torch.cat(parts, dim=1)
        full = model(ids, labels=labels)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    # Counted once: the target count is the unchunked one and the loss is the mean CE of these logits.
    assert out.num_targets == full.num_targets
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    ce = F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce, atol=1e-5, rtol=0)
    # Teeth: attention with the full left context is different.
    assert (full.logits - out.logits).abs().max() > 1e-3


@pytest.mark.parametrize("cs,ov", [(8, 3), (9, 8), (5, 1)])
def test_attention_context_by_perturbation(cs, ov):
    """Attention-only model (so no state carries anything): at every position t, the token `ov` steps
    back still changes the output; the token just before the chunk's window never does."""
    model = set_chunking(make_model(seed=21, num_layers=2, layer_pattern="A"), cs, ov)
    T = 30
    ids, _ = rand_batch(seed=22, B=1, T=T)

    def logits(x, chunked=True):
        with torch.no_grad():
            return model(x, use_chunking=chunked).logits[0]

    base, base_full = logits(ids), logits(ids, chunked=False)
    for t in range(ov, T):
        bumped = ids.clone()
        bumped[0, t - ov] = (bumped[0, t - ov] + 1) % V
        assert (logits(bumped)[t] - base[t]).abs().max() > 1e-6, f"position {t} does not see t-{ov}"
    for lo, s, hi in chunk_windows(T, cs, ov)[1:]:
        bumped = ids.clone()
        bumped[0, lo - 1] = (bumped[0, lo - 1] + 1) % V
        assert torch.equal(logits(bumped)[s:hi], base[s:hi]), f"chunk at {s} sees token {lo - 1}"
        # Teeth: unchunked, the same perturbation does reach these positions.
        assert (logits(bumped, chunked=False)[s:hi] - base_full[s:hi]).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------
# BPTT
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,cs,ov,return_logits,grad_ckpt", [
    (37, 8, 3, False, False), (37, 8, 3, True, False), (37, 5, 0, False, False),
    (29, 4, 3, False, True), (40, 8, 7, True, True),
])
def test_full_bptt_gradients_equal_unchunked(T, cs, ov, return_logits, grad_ckpt):
    model = make_model(seed=31 + T)
    model.enable_gradient_checkpointing(grad_ckpt)
    ids, labels = rand_batch(seed=32, B=2, T=T)
    g_ref, ref = grads_of(model, input_ids=ids, labels=labels)
    set_chunking(model, cs, ov)
    g, out = grads_of(model, input_ids=ids, labels=labels, use_chunking=True, bptt="full",
                      return_logits=return_logits)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert_grads_close(g, g_ref)


@pytest.mark.parametrize("T,cs,ov", [(37, 8, 3), (23, 4, 0)])
def test_full_bptt_gradients_equal_unchunked_float64(T, cs, ov):
    model = make_model(seed=35 + T).double()
    ids, labels = rand_batch(seed=36, B=2, T=T)
    g_ref, ref = grads_of(model, input_ids=ids, labels=labels)
    set_chunking(model, cs, ov)
    g, out = grads_of(model, input_ids=ids, labels=labels, use_chunking=True, return_logits=False)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-12, rtol=0)
    assert_grads_close(g, g_ref, rel_each=1e-10, rel_all=1e-10)


@pytest.mark.parametrize("T,cs,ov,bptt", [(37, 8, 3, "full"), (23, 4, 0, "full"), (37, 8, 3, "truncated")])
def test_l2wrap_applies_in_chunked_training(T, cs, ov, bptt):
    """L2Wrap's extra gradient reaches the chunked training path (return_logits=False keeps no logits):
    full BPTT gives exactly the unchunked gradients with L2Wrap; and L2Wrap does change them."""
    model = make_model(seed=41 + T).double()
    with torch.no_grad():
        model.head.weight.mul_(30)  # large logits, so L2Wrap's push is well above float64 rounding
    ids, labels = rand_batch(seed=42, B=2, T=T)
    g_ref, _ = grads_of(model, input_ids=ids, labels=labels, l2wrap=True)
    set_chunking(model, cs, ov)
    kw = dict(input_ids=ids, labels=labels, use_chunking=True, return_logits=False, bptt=bptt)
    g, _ = grads_of(model, l2wrap=True, **kw)
    g_plain, _ = grads_of(model, l2wrap=False, **kw)
    assert (g["head.weight"] - g_plain["head.weight"]).abs().max() > 1e-9  # L2Wrap was applied
    if bptt == "full":
        assert_grads_close(g, g_ref, rel_each=1e-10, rel_all=1e-10)
    else:  # the head's gradient has no path through the carried state: still exact
        torch.testing.assert_close(g["head.weight"], g_ref["head.weight"], rtol=1e-10, atol=0)


def test_hybrid_recomputed_chunks_give_exact_gradients():
    """return_logits=False recomputes each chunk in the backward pass; it must match keeping the graph."""
    model = set_chunking(make_model(seed=41, num_layers=3, layer_pattern="RAR"), 7, 3)
    ids, labels = rand_batch(seed=42, B=2, T=33)
    g_keep, a = grads_of(model, input_ids=ids, labels=labels, use_chunking=True, return_logits=True)
    g_recompute, b = grads_of(model, input_ids=ids, labels=labels, use_chunking=True, return_logits=False)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
    assert_grads_close(g_recompute, g_keep)


def test_recomputed_chunks_under_mixed_precision():
    """The backward pass recomputes each chunk under the forward's autocast settings: the gradients match
    keeping the graph up to bf16 rounding (keeping the graph accumulates each weight's gradient across
    chunks in bf16, so the two differ by ~0.3%; bf16 against float32 differs by ~2%)."""
    model = set_chunking(make_model(seed=45), 8, 3).enable_mixed_precision(torch.bfloat16)
    ids, labels = rand_batch(seed=46, B=2, T=30)
    g_keep, a = grads_of(model, input_ids=ids, labels=labels, use_chunking=True, return_logits=True)
    g_recompute, b = grads_of(model, input_ids=ids, labels=labels, use_chunking=True, return_logits=False)
    assert a.loss.item() == b.loss.item()
    assert_grads_close(g_recompute, g_keep, rel_each=1e-2, rel_all=1e-2)


def test_chunked_training_under_fsdp_gets_every_gradient(tmp_path):
    """FSDP2 (one process, gloo): parameters are sharded DTensors with unsharded copies swapped in per
    block, so chunks must be recomputed through the ordinary graph; every parameter still gets its exact
    gradient (handing gradients to the sharded parameters directly would silently lose all but the last
    chunk's, or all of them)."""
    import torch.distributed as dist

    fsdp = pytest.importorskip("kaggletrain.train.fsdp")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        pytest.skip("torch without DTensor")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ref = set_chunking(make_model(seed=71, rwkv_use_learnable_states=True), 8, 2)
        sharded = fsdp.apply_fsdp(set_chunking(make_model(seed=71, rwkv_use_learnable_states=True), 8, 2),
                                  torch.device("cpu"))
        ids, labels = rand_batch(seed=72, B=2, T=30)
        g_ref, a = grads_of(ref, input_ids=ids, labels=labels, use_chunking=True, return_logits=False)
        g, b = grads_of(sharded, input_ids=ids, labels=labels, use_chunking=True, return_logits=False)
        g = {n: (t.full_tensor() if isinstance(t, DTensor) else t) for n, t in g.items()}
        torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=0)
        assert_grads_close(g, g_ref)
    finally:
        dist.destroy_process_group()


def test_truncated_bptt_equals_detached_chunk_by_chunk():
    model = set_chunking(make_model(seed=51), 8, 0)
    T = 30
    ids, labels = rand_batch(seed=52, B=2, T=T)
    g_full, _ = grads_of(model, input_ids=ids, labels=labels, use_chunking=True, bptt="full")
    g_trunc, out = grads_of(model, input_ids=ids, labels=labels, use_chunking=True, bptt="truncated")

    # Reference: each chunk separately, the state handed on detached; loss = total CE / total count.
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    model.zero_grad(set_to_none=True)
    state, total, count = None, 0.0, 0
    for s in range(0, T, 8):
        o = model(ids[:, s:s + 8], labels=targets[:, s:s + 8], shift_labels=False, state=state)
        total = total + o.loss * o.num_targets
        count += o.num_targets
        state = o.state.detach()
    ref_loss = total / count
    ref_loss.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=0)
    assert_grads_close(g_trunc, g_ref)
    # ... and it is not the exact gradient.
    worst = max((g_trunc[n] - g_full[n]).norm() / g_full[n].norm().clamp_min(1e-12) for n in g_full)
    assert worst > 1e-2


@pytest.mark.parametrize("ov", [0, 3])
def test_truncated_bptt_stops_gradients_at_chunk_boundaries(ov):
    """Tokens of the first chunk use vocabulary rows nobody else uses; the loss covers later chunks only.
    Truncated: those embedding rows get exactly zero gradient. Full: they get a gradient."""
    cs, T = 8, 26
    model = set_chunking(make_model(seed=61), cs, ov)
    g = torch.Generator().manual_seed(62)
    ids = torch.randint(10, V, (2, T), generator=g)
    ids[:, :cs - ov] = torch.randint(0, 10, (2, cs - ov), generator=g)   # seen by chunk 0 only
    labels = torch.randint(0, V, (2, T), generator=g)
    labels[:, :cs + 1] = -100                                           # targets from position cs on
    grads = {}
    for mode in ("full", "truncated"):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, use_chunking=True, return_logits=False, bptt=mode)
        out.loss.backward()
        grads[mode] = model.emb.weight.grad[:10].clone()
    assert grads["full"].abs().max() > 1e-6
    assert torch.count_nonzero(grads["truncated"]) == 0


def test_bptt_value_is_checked():
    model = make_model()
    with pytest.raises(ValueError, match="bptt"):
        model(torch.zeros(1, 4, dtype=torch.long), use_chunking=True, bptt="sometimes")
