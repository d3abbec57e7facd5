"""RWKV states as first-class objects: learnable initial states, state tuning, state files, compression.

Learnable states (`rwkv_use_learnable_states`): per RWKV layer `blocks.N.att.time_state` [H, N, N]
([head, value, key], the rwkv package's state[3N+1]), `blocks.N.att.shift_state` and
`blocks.N.ffn.shift_state` [C]. They are the state every sequence starts from, they are trainable (also
through chunking and gradient checkpointing), state tuning trains them alone, and they can be written to
a file of their own and loaded into a fresh model.

Compression (`enable_state_compression(scheme)`): carried and returned states are stored as bf16, fp16 or
int8 with one float32 scale per row, expanded to float32 for use. Measured on these tiny random models
(T=64, chunk 8, overlap 2, states carried across 8 chunks): max |logit error| about 1e-3 (bf16),
3e-4 (fp16), 4e-3 (int8); loss error about 2e-5. The bounds below leave a few times that. The real-text
numbers are in docs/long_context.md (benchmarks/bench_state_compression.py).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from kaggletrain import ModelConfig, RWKVModel
from kaggletrain.model.state import CompressedTensor, ModelState, RWKVLayerState, roundtrip

V = 53
STATE_SUFFIXES = ("att.time_state", "att.shift_state", "ffn.shift_state")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_model(seed=0, learnable=True, perturb_states=True, **kw) -> RWKVModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, hidden_size=32, num_layers=2, head_size=16, rwkv_chunk_size=8,
               rwkv_chunk_overlap=2, rwkv_use_learnable_states=learnable, wkv_impl="chunked")
    cfg.update(kw)
    model = RWKVModel(ModelConfig(**cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if perturb_states or not n.endswith(STATE_SUFFIXES):
                p.add_(torch.randn_like(p) * (0.3 if n.endswith(STATE_SUFFIXES) else 0.1))
    return model


def plain_copy(model: RWKVModel) -> RWKVModel:
    """The same weights in a model without learnable states."""
    cfg = ModelConfig(**{**model.config.to_dict(), "rwkv_use_learnable_states": False})
    other = RWKVModel(cfg)
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.endswith(STATE_SUFFIXES) for k in unexpected)
    return other


def learned_state(model: RWKVModel, batch: int) -> ModelState:
    """The learnable states as an explicit ModelState (what the model starts every sequence from)."""
    layers = []
    for blk in model.blocks:
        if not blk.is_rwkv_block:
            layers.append(None)
            continue
        C = model.config.hidden_size
        layers.append(RWKVLayerState(blk.att.shift_state.detach().expand(batch, C).clone(),
                                     blk.att.time_state.detach().float().expand(batch, *blk.att.time_state.shape).clone(),
                                     blk.ffn.shift_state.detach().expand(batch, C).clone()))
    return ModelState(layers, torch.zeros(batch, dtype=torch.long))


def rand_ids(seed, B, T):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def state_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(STATE_SUFFIXES)}


# ---------------------------------------------------------------------------------------------
# Learnable initial states
# ---------------------------------------------------------------------------------------------

def test_learnable_state_names_and_shapes():
    model = make_model(num_layers=3, layer_pattern="RAR")
    names = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith(STATE_SUFFIXES)}
    H, N, C = 2, 16, 32
    assert names == {f"blocks.{i}.{s}": ((H, N, N) if s == "att.time_state" else (C,))
                     for i in (0, 2) for s in STATE_SUFFIXES}
    assert {id(p) for p in model.learnable_state_parameters()} == \
        {id(p) for n, p in model.named_parameters() if n in names}


def test_zero_learnable_states_are_the_plain_model():
    model = make_model(seed=1, perturb_states=False)
    ids = rand_ids(1, 2, 20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain_copy(model)(ids).logits)


@pytest.mark.parametrize("chunked", [False, True])
def test_learnable_states_start_every_sequence(chunked):
    model = make_model(seed=2, num_layers=3, layer_pattern="RRA")
    plain = plain_copy(model)
    B, T = 3, 29
    ids = rand_ids(2, B, T)
    with torch.no_grad():
        out = model(ids, use_chunking=chunked)
        ref = plain(ids, state=learned_state(model, B), use_chunking=chunked)
        zero = plain(ids, use_chunking=chunked)
        rows = [model(ids[i:i + 1], use_chunking=chunked).logits for i in range(B)]
        # An explicit state replaces the learnable one.
        given = plain(ids, state=zero.state, use_chunking=chunked)
        given_l = model(ids, state=zero.state, use_chunking=chunked)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, torch.cat(rows), atol=1e-5, rtol=0)
    assert (out.logits[:, 0] - zero.logits[:, 0]).abs().max() > 1e-3     # the very first token sees it
    torch.testing.assert_close(given_l.logits, given.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_chunking,grad_ckpt,bptt", [
    (True, False, "full"), (False, True, "full"), (True, True, "full"), (True, False, "truncated"),
])
def test_learnable_states_get_gradients(use_chunking, grad_ckpt, bptt):
    model = make_model(seed=3)
    ids, labels = rand_ids(3, 2, 30), rand_ids(4, 2, 30)
    model(ids, labels=labels).loss.backward()
    ref = state_grads(model)
    assert len(ref) == 6
    for n, g in ref.items():
        assert g.abs().max() > 1e-7, f"{n} gets no gradient"
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing(grad_ckpt)
    model(ids, labels=labels, use_chunking=use_chunking, return_logits=False, bptt=bptt).loss.backward()
    got = state_grads(model)
    assert set(got) == set(ref)
    if bptt == "full":   # exact
        for n in ref:
            assert (got[n] - ref[n]).norm() <= 2e-5 * ref[n].norm(), n
    else:
        # Only the first chunk's loss reaches the initial states. The WKV state's influence lasts (so its
        # gradient loses the later chunks' part); a token-shift state only touches the first token.
        for n in ref:
            assert got[n].abs().max() > 1e-7, n
            if n.endswith("time_state"):
                assert (got[n] - ref[n]).norm() > 1e-3 * ref[n].norm(), n


def test_learnable_states_with_chunking_under_ddp(tmp_path):
    """The learnable states are used in the first chunk only; every parameter's gradient must still reach
    DDP's reducer exactly once per backward (a per-chunk reentrant backward would mark them ready once
    per chunk and fail), and the result equals the plain model's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model, ref = make_model(seed=4), make_model(seed=4)
        ddp = DDP(model)
        ids, labels = rand_ids(3, 2, 30), rand_ids(4, 2, 30)
        for bptt in ("full", "truncated", "full"):
            model.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            ddp(ids, labels=labels, use_chunking=True, return_logits=False, bptt=bptt).loss.backward()
            ref(ids, labels=labels, use_chunking=True, return_logits=False, bptt=bptt).loss.backward()
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                assert (p.grad is None) == (q.grad is None), n
                if q.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-5, msg=n)
    finally:
        dist.destroy_process_group()


def test_state_tuning_trains_only_the_states():
    model = make_model(seed=5, perturb_states=False)
    model.enable_gradient_checkpointing()
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(STATE_SUFFIXES))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=5e-2, weight_decay=0.0)
    ids, labels = rand_ids(5, 2, 20), rand_ids(6, 2, 20)
    losses = []
    for _ in range(6):
        out = model(ids, labels=labels, use_chunking=True, return_logits=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n.endswith(STATE_SUFFIXES):
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert p.grad is None and torch.equal(p, before[n]), f"{n} changed"


def test_states_saved_to_their_own_file_and_loaded(tmp_path):
    tuned = make_model(seed=7, num_layers=3, layer_pattern="RAR")
    ids = rand_ids(7, 2, 21)
    states = {k: v.detach().clone() for k, v in tuned.state_dict().items() if k.endswith(STATE_SUFFIXES)}
    assert sorted(states) == sorted(f"blocks.{i}.{s}" for i in (0, 2) for s in STATE_SUFFIXES)
    path = tmp_path / "tuned.states.safetensors"
    save_file(states, str(path))

    # A fresh model with the base weights (everything but the states) and the states from the file.
    fresh = make_model(seed=99, num_layers=3, layer_pattern="RAR")
    base = {k: v for k, v in tuned.state_dict().items() if not k.endswith(STATE_SUFFIXES)}
    fresh.load_state_dict(base, strict=False)
    with torch.no_grad():
        assert (fresh(ids).logits - tuned(ids).logits).abs().max() > 1e-4   # states differ so far
    missing, unexpected = fresh.load_state_dict(load_file(str(path)), strict=False)
    assert not unexpected and not any(k.endswith(STATE_SUFFIXES) for k in missing)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, tuned(ids).logits)


def test_states_exported_next_to_the_weights_and_loaded(tmp_path):
    from kaggletrain.interop import export_checkpoint, load_checkpoint, states_path_for

    tuned = make_model(seed=8)
    ids = rand_ids(8, 2, 17)
    out = tmp_path / "m.safetensors"
    written = export_checkpoint(tuned, out, format="safetensors", dtype="fp32")
    sp = states_path_for(out)
    assert sp in [tmp_path / p.name for p in written] and sp.is_file()
    assert sorted(load_file(str(sp))) == sorted(f"blocks.{i}.{s}" for i in (0, 1) for s in STATE_SUFFIXES)
    loaded, _ = load_checkpoint(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tuned(ids).logits, atol=1e-6, rtol=0)


def test_learned_states_as_a_state_file(tmp_path):
    """The states as a ModelState file (infer/state_io): a model without learnable states continues
    from it exactly as the tuned model starts."""
    from kaggletrain.infer.state_io import load_state, save_state

    tuned = make_model(seed=9)
    plain = plain_copy(tuned)
    ids = rand_ids(9, 1, 19)
    save_state(learned_state(tuned, 1), tmp_path / "s.safetensors")
    state = load_state(tmp_path / "s.safetensors", plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, state=state).logits, tuned(ids).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Compression
# ---------------------------------------------------------------------------------------------

SCHEMES = ("bf16", "fp16", "int8")


def test_roundtrip_error_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 16, 16, generator=g) * torch.logspace(-3, 2, 16)[:, None]   # rows of all scales
    x.requires_grad_(True)
    for scheme in SCHEMES:
        y = roundtrip(x, scheme)
        assert y.dtype == torch.float32 and y.shape == x.shape
        err = (y - x).abs()
        if scheme == "bf16":
            assert torch.all(err <= x.abs() * 2**-8)
        elif scheme == "fp16":
            assert torch.all(err <= x.abs() * 2**-10 + 2**-24)
        else:  # int8: half a quantisation step of the row's own scale
            row_max = x.abs().amax(-1, keepdim=True)
            assert torch.all(err <= row_max / 127 * 0.5 * (1 + 1e-5))
        assert err.max() > 0
        # Gradients pass through (int8: straight-through).
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert torch.all(gx == 1)
        c = CompressedTensor.compress(x.detach(), scheme)
        assert torch.equal(c.expand(), y.detach())
        assert c.nbytes() < x.numel() * 4 * (0.55 if scheme != "int8" else 0.35)


@pytest.mark.parametrize("scheme,logit_tol", [("bf16", 5e-3), ("fp16", 1e-3), ("int8", 2e-2)])
def test_compressed_carry_is_close_and_uncompressed_stays_exact(scheme, logit_tol):
    model = make_model(seed=11, learnable=False)
    ids, labels = rand_ids(11, 2, 64), rand_ids(12, 2, 64)
    with torch.no_grad():
        exact = model(ids, labels=labels, use_chunking=True)
        model.enable_state_compression(scheme)
        comp = model(ids, labels=labels, use_chunking=True)
        model.config.rwkv_state_compression = False
        again = model(ids, labels=labels, use_chunking=True)
        unchunked = model(ids, labels=labels)
    err = (comp.logits - exact.logits).abs().max().item()
    assert 0 < err <= logit_tol, err
    assert abs(comp.loss.item() - exact.loss.item()) <= 1e-3
    # The first chunk has no carried state: bit-identical.
    assert torch.equal(comp.logits[:, :8], exact.logits[:, :8])
    # The uncompressed path is untouched and exact.
    assert torch.equal(again.logits, exact.logits)
    torch.testing.assert_close(exact.logits, unchunked.logits, atol=1e-5, rtol=0)
    for ls in exact.state.layers:
        assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in (ls.att_shift, ls.wkv, ls.ffn_shift))
    for ls in comp.state.layers:
        assert isinstance(ls.wkv, CompressedTensor)
    assert comp.state.nbytes() < exact.state.nbytes() * (0.55 if scheme != "int8" else 0.35)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_state_continues_a_sequence(scheme):
    model = make_model(seed=13, learnable=False)
    a, b = rand_ids(13, 2, 20), rand_ids(14, 2, 15)
    with torch.no_grad():
        ref = model(torch.cat([a, b], 1)).logits[:, 20:]
        state = model(a).state
        comp_state = state.compress(scheme)
        got = model(b, state=comp_state).logits
        exact = model(b, state=state).logits
    torch.testing.assert_close(exact, ref, atol=1e-5, rtol=0)
    err = (got - ref).abs().max().item()
    assert 0 < err < 2e-2, err


def test_compressed_state_files_are_smaller(tmp_path):
    from kaggletrain.infer.state_io import load_state, save_state

    model = make_model(seed=15, learnable=False, hidden_size=64, head_size=32)
    ids = rand_ids(15, 2, 40)
    with torch.no_grad():
        out = model(ids)
        follow = rand_ids(16, 2, 5)
        ref = model(follow, state=out.state).logits
    sizes = {}
    for scheme in (None,) + SCHEMES:
        st = out.state if scheme is None else out.state.compress(scheme)
        path = save_state(st, tmp_path / f"{scheme}.safetensors")
        sizes[scheme] = path.stat().st_size
        loaded = load_state(path, model)
        with torch.no_grad():
            got = model(follow, state=loaded).logits
        tol = {None: 0.0, "bf16": 2e-2, "fp16": 5e-3, "int8": 5e-2}[scheme]
        assert (got - ref).abs().max().item() <= tol, scheme
    assert sizes["bf16"] < 0.6 * sizes[None] and sizes["fp16"] < 0.6 * sizes[None], sizes
    assert sizes["int8"] < 0.4 * sizes[None], sizes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_carry_still_trains(scheme):
    """Gradients flow through the compressed carry (int8: straight-through) and stay near the exact ones."""
    model = make_model(seed=17, learnable=True)
    ids, labels = rand_ids(17, 2, 40), rand_ids(18, 2, 40)

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=labels, use_chunking=True, return_logits=False).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    exact = grads()
    model.enable_state_compression(scheme)
    comp = grads()
    model.config.rwkv_state_compression = False
    assert torch.isfinite(comp).all()
    rel = ((comp - exact).norm() / exact.norm()).item()
    assert 0 < rel < 5e-2, rel
