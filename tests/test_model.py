"""RWKVModel / ModelConfig behaviour (issue 2): config validation, official init, padding, state carrying,
chunking, gradient checkpointing, mixed precision and inference optimisation. CPU, tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kaggletrain import ModelConfig, RWKVModel
from kaggletrain.model.attention import AttentionBlock
from kaggletrain.model.rwkv7 import RWKV7Block

LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random, non-zero weights everywhere (the official init zeros several matrices)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.split(".")[-1]
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if name in ("emb.weight", "pos_emb.weight"):
            scale = 1.0 if name == "emb.weight" else 0.5
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


PURE = dict(num_layers=2)
HYBRID = dict(num_layers=3, attention_layers=[1], num_attention_heads=4)
HYBRID0 = dict(num_layers=3, attention_layers=[0], num_attention_heads=2)
POS = dict(num_layers=2, use_position_embeddings=True, max_position_embeddings=64)
HYBRID_POS = dict(num_layers=3, attention_layers=[1], num_attention_heads=4, use_position_embeddings=True,
                  max_position_embeddings=64)


def make_model(seed=0, dtype=torch.float32, **kw) -> RWKVModel:
    base = dict(hidden_size=128, num_layers=2, vocab_size=97, head_size=64)
    base.update(kw)
    torch.manual_seed(seed)
    return perturb(RWKVModel(ModelConfig(**base)), seed + 1000).to(dtype).eval()


def rand_ids(B, T, V, seed):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol, msg=""):
    torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=lambda m: f"{msg}\n{m}")


def rwkv_layers(model):
    return [i for i, b in enumerate(model.blocks) if b.is_rwkv_block]


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


# =============================================================================================
# ModelConfig
# =============================================================================================

@pytest.mark.parametrize("extra", [{}, {"layer_pattern": "RA"}], ids=["pure", "hybrid"])
def test_issue_usage_snippet_scaled_down(extra):
    config = ModelConfig(hidden_size=128, num_layers=2, num_attention_heads=2, vocab_size=256,
                         rwkv_chunk_size=16, rwkv_chunk_overlap=4, rwkv_use_learnable_states=True,
                         rwkv_state_compression=True, use_position_embeddings=True, **extra)
    torch.manual_seed(0)
    model = RWKVModel(config)
    model.enable_gradient_checkpointing()
    model.enable_mixed_precision(dtype=torch.bfloat16)
    model.enable_state_compression()
    B, T = 2, 37
    input_ids = rand_ids(B, T, 256, seed=1)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 30:] = 0  # right padding in one row
    labels = input_ids.clone()
    position_ids = torch.arange(T)[None].expand(B, T)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    use_chunking=True, position_ids=position_ids)
    assert outputs.loss is not None and torch.isfinite(outputs.loss)
    assert outputs.logits.shape == (B, T, 256)
    outputs.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    model.eval()
    model.optimize_for_inference()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    assert torch.isfinite(out.logits.float()).all()


def _param_count_formula(L, C, V, dims):
    return L * (12 * C * C + 19 * C + 2 * C * sum(dims)) + 2 * V * C + 4 * C


def test_parameter_count_matches_spec():
    torch.manual_seed(0)
    model = RWKVModel(ModelConfig(hidden_size=128, num_layers=2, vocab_size=256))
    assert model.num_parameters() == 546_048
    assert sum(p.numel() for p in model.state_dict().values()) == 546_048
    assert _param_count_formula(2, 128, 256, (32, 32, 32, 64)) == 546_048
    # another size, with explicit LoRA ranks
    cfg = ModelConfig(hidden_size=192, num_layers=3, vocab_size=97, d_decay=48, d_aaa=40, d_mv=32, d_gate=96)
    model = RWKVModel(cfg)
    assert model.num_parameters() == _param_count_formula(3, 192, 97, (48, 40, 32, 96))
    sd = model.state_dict()
    assert sd["blocks.2.att.w1"].shape == (192, 48) and sd["blocks.2.att.a2"].shape == (40, 192)
    assert sd["blocks.0.att.v1"].shape == (192, 32) and sd["blocks.1.att.g2"].shape == (96, 192)


@pytest.mark.parametrize("C,dims", [(128, (32, 32, 32, 64)), (768, (64, 64, 32, 128)),
                                    (1024, (64, 64, 64, 160)), (2048, (128, 128, 64, 224)),
                                    (4096, (160, 160, 96, 320))])
def test_lora_dims_table(C, dims):
    d = ModelConfig(hidden_size=C).lora_dims
    assert (d["w"], d["a"], d["v"], d["g"]) == dims


@pytest.mark.parametrize("kwargs,field", [
    (dict(hidden_size=100), "hidden_size"),                              # not a multiple of head_size 64
    (dict(hidden_size=96, head_size=64), "hidden_size"),
    (dict(rwkv_chunk_size=16, rwkv_chunk_overlap=16), "rwkv_chunk_overlap"),
    (dict(rwkv_chunk_size=16, rwkv_chunk_overlap=20), "rwkv_chunk_overlap"),
    (dict(rwkv_chunk_overlap=-1), "rwkv_chunk_overlap"),
    (dict(num_layers=2, attention_layers=[2]), "attention_layers"),
    (dict(num_layers=2, attention_layers=[-1]), "attention_layers"),
    (dict(layer_pattern="RXA"), "layer_pattern"),
    (dict(layer_pattern=""), "layer_pattern"),
    (dict(num_layers=4, layer_pattern="RA", attention_layers=[0]), "layer_pattern"),
    (dict(hidden_size=128, attention_layers=[0], num_attention_heads=3), "num_attention_heads"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_invalid_config_raises_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        ModelConfig(**kwargs)
    assert field in str(e.value)


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(ValueError) as e:
        ModelConfig(hiden_size=128)
    msg = str(e.value)
    assert "hiden_size" in msg and "did you mean" in msg and "hidden_size" in msg


def test_layer_pattern_and_attention_layers():
    cfg = ModelConfig(num_layers=6, layer_pattern="RRA")
    assert cfg.attention_layers == [2, 5]
    model = RWKVModel(ModelConfig(hidden_size=64, num_layers=3, vocab_size=17, layer_pattern="RAR"))
    assert [b.is_rwkv_block for b in model.blocks] == [True, False, True]


# =============================================================================================
# Official initialisation (spec section 3)
# =============================================================================================

def test_official_init_values():
    torch.manual_seed(0)
    C, L, V, N = 128, 3, 256, 64
    model = RWKVModel(ModelConfig(hidden_size=C, num_layers=L, vocab_size=V, head_size=N))
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    lin = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig = z * z.abs()
    tol = 1e-6
    for l in range(L):
        att = f"blocks.{l}.att."
        r01, r10 = l / (L - 1), 1 - l / L
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01 ** 0.3)
        expect = {
            "x_r": 1 - ddd ** (0.2 * r10), "x_g": 1 - ddd ** (0.2 * r10),
            "x_w": 1 - ddd ** (0.9 * r10), "x_a": 1 - ddd ** (0.9 * r10),
            "x_k": 1 - ddd ** (0.7 * r10), "x_v": 1 - ddd ** (0.7 * r10),
            "w0": www + 0.5 + 2.5 * zig, "a0": -0.19 + 0.3 * zig + 0.4 * lin,
            "v0": 0.73 - 0.4 * lin, "k_k": 0.71 - 0.1 * lin, "k_a": torch.full((C,), 1.02),
        }
        for name, val in expect.items():
            assert sd[att + name].shape == (1, 1, C), name
            close(sd[att + name].reshape(C), val.double(), tol, f"layer {l} {name}")
        close(sd[att + "r_k"], torch.full((C // N, N), -0.04, dtype=torch.float64), tol, "r_k")
        close(sd[att + "ln_x.weight"], torch.full((C,), ((l + 1) / L) ** 0.7, dtype=torch.float64), tol, "ln_x")
        assert (sd[att + "ln_x.bias"] == 0).all()
        for zero in ("w1", "a1", "v1", "g1", "output.weight"):
            assert (sd[att + zero] == 0).all(), zero
        assert (sd[f"blocks.{l}.ffn.value.weight"] == 0).all()
        close(sd[f"blocks.{l}.ffn.x_k"].reshape(C), 1 - ddd ** (r10 ** 4), tol, "ffn.x_k")
        eye = torch.eye(C, dtype=torch.float64)
        for name, gain in (("receptance.weight", 1.0), ("value.weight", 1.0), ("key.weight", 0.1)):
            W = sd[att + name]
            close(W @ W.T, gain ** 2 * eye, 1e-5, name)
        for name in ("w2", "a2", "v2", "g2"):  # [D, C] with D < C: orthonormal rows, gain 0.1
            W = sd[att + name]
            D = W.shape[0]
            close(W @ W.T, 0.01 * torch.eye(D, dtype=torch.float64), 1e-5, name)
        Wk = sd[f"blocks.{l}.ffn.key.weight"]  # [4C, C]: orthonormal columns, gain 1
        assert Wk.shape == (4 * C, C)
        close(Wk.T @ Wk, eye, 1e-5, "ffn.key")
        for ln in ("ln1", "ln2"):
            assert (sd[f"blocks.{l}.{ln}.weight"] == 1).all() and (sd[f"blocks.{l}.{ln}.bias"] == 0).all()
    assert (sd["blocks.0.ln0.weight"] == 1).all() and (sd["blocks.0.ln0.bias"] == 0).all()
    emb = sd["emb.weight"]
    assert emb.abs().max() <= 1e-4 and emb.abs().max() > 5e-5
    head = sd["head.weight"]  # V > C: gain 0.5 * sqrt(V / C)
    close(head.T @ head, (0.5 * math.sqrt(V / C)) ** 2 * torch.eye(C, dtype=torch.float64), 1e-5, "head")


def test_official_init_head_gain_when_vocab_small():
    torch.manual_seed(0)
    model = RWKVModel(ModelConfig(hidden_size=128, num_layers=2, vocab_size=97))
    W = model.head.weight.double()
    close(W @ W.T, 0.25 * torch.eye(97, dtype=torch.float64), 1e-5, "head")


def test_block_classes_declare_is_rwkv_block():
    assert RWKV7Block.is_rwkv_block is True
    assert AttentionBlock.is_rwkv_block is False


# =============================================================================================
# Padding
# =============================================================================================

LENGTHS = (13, 7, 10)


def _pad_batch(seqs, T, side, pad_id):
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, sl] = s
        mask[b, sl] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["pure", "hybrid", "hybrid_pos"])
def test_padding_left_right_unpadded_agree(kind):
    cfg = {"pure": PURE, "hybrid": HYBRID, "hybrid_pos": HYBRID_POS}[kind]
    model = make_model(seed=3, dtype=torch.float64, **cfg)
    V = model.config.vocab_size
    seqs = [rand_ids(1, n, V, seed=20 + n)[0] for n in LENGTHS]
    T = max(LENGTHS)
    with torch.no_grad():
        single = [model(s[None], labels=s[None]) for s in seqs]
        for side in ("right", "left"):
            for pad_id in (0, V - 1):
                ids, mask = _pad_batch(seqs, T, side, pad_id)
                labels = ids.clone()
                labels[mask == 0] = (pad_id + 5) % V  # garbage labels at pads must not count
                out = model(ids, attention_mask=mask, labels=labels)
                for b, (s, ref) in enumerate(zip(seqs, single)):
                    n = len(s)
                    sl = slice(0, n) if side == "right" else slice(T - n, T)
                    close(out.logits[b, sl], ref.logits[0], 1e-9, f"{side} pad={pad_id} row {b}")
                    for i in rwkv_layers(model):
                        st, rs = out.state.layers[i], ref.state.layers[i]
                        close(st.wkv[b], rs.wkv[0], 1e-9, f"{side} wkv state layer {i}")
                        close(st.att_shift[b], rs.att_shift[0], 1e-9, f"{side} att shift layer {i}")
                        close(st.ffn_shift[b], rs.ffn_shift[0], 1e-9, f"{side} ffn shift layer {i}")
                    assert int(out.state.position[b]) == n
                # loss: mean next-token CE over real targets only
                ce = torch.cat([F.cross_entropy(r.logits[0, :-1], s[1:], reduction="none")
                                for s, r in zip(seqs, single)])
                assert out.num_targets == sum(n - 1 for n in LENGTHS)
                # (loss dtype is checked separately: test_float64_model_gives_float64_loss)
                close(out.loss.double(), ce.mean(), 1e-6, f"{side} loss")


@pytest.mark.parametrize("kind", ["pure", "hybrid_pos"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_continue_after_padded_batch(kind, side):
    """A padded batch's state continues each sequence as if it had never been padded (RWKV state,
    attention KV cache with its validity mask, positions)."""
    cfg = {"pure": PURE, "hybrid_pos": HYBRID_POS}[kind]
    model = make_model(seed=4, dtype=torch.float64, **cfg)
    V = model.config.vocab_size
    seqs = [rand_ids(1, n, V, seed=40 + n)[0] for n in LENGTHS]
    more = rand_ids(len(LENGTHS), 5, V, seed=99)
    T = max(LENGTHS)
    ids, mask = _pad_batch(seqs, T, side, 0)
    with torch.no_grad():
        st = model(ids, attention_mask=mask).state
        cont = model(more, state=st).logits
        for b, s in enumerate(seqs):
            full = model(torch.cat([s, more[b]])[None]).logits[0, len(s):]
            close(cont[b], full, 1e-9, f"row {b}")


# =============================================================================================
# Whole sequence vs token by token (carried state)
# =============================================================================================

@pytest.mark.parametrize("kind", ["pure", "hybrid", "hybrid0", "pos", "hybrid_pos"])
def test_whole_vs_token_by_token_and_pieces(kind):
    cfg = {"pure": PURE, "hybrid": HYBRID, "hybrid0": HYBRID0, "pos": POS, "hybrid_pos": HYBRID_POS}[kind]
    model = make_model(seed=5, **cfg)
    B, T = 2, 23
    ids = rand_ids(B, T, model.config.vocab_size, seed=6)
    with torch.no_grad():
        whole = model(ids)
        assert whole.logits.abs().max() > 0.5
        st, steps = None, []
        for t in range(T):
            o = model(ids[:, t:t + 1], state=st)
            st = o.state
            steps.append(o.logits)
        close(torch.cat(steps, 1), whole.logits, 1e-5, "token by token")
        for i in rwkv_layers(model):
            close(st.layers[i].wkv, whole.state.layers[i].wkv, 1e-5, "final wkv state")
        assert st.position.tolist() == [T] * B
        st, parts = None, []
        for lo, hi in ((0, 6), (6, 7), (7, T)):  # three uneven pieces
            o = model(ids[:, lo:hi], state=st)
            st = o.state
            parts.append(o.logits)
        close(torch.cat(parts, 1), whole.logits, 1e-5, "pieces")


def test_position_embeddings_honour_position_ids():
    model = make_model(seed=7, **POS)
    V = model.config.vocab_size
    ids = rand_ids(1, 9, V, seed=8)
    with torch.no_grad():
        fresh = model(ids).logits
        explicit0 = model(ids, position_ids=torch.arange(9)[None]).logits
        shifted = model(ids, position_ids=torch.arange(9)[None] + 20).logits
        st = model(rand_ids(1, 20, V, seed=9)).state  # 20 tokens consumed
        cont = model(ids, state=st).logits
        cont20 = model(ids, state=st, position_ids=torch.arange(9)[None] + 20).logits
        cont0 = model(ids, state=st, position_ids=torch.arange(9)[None]).logits
    assert st.position.tolist() == [20]
    close(fresh, explicit0, 1e-6, "default position ids are 0..T-1")
    assert (shifted - fresh).abs().max() > 1e-3  # position ids change the result
    close(cont, cont20, 1e-6, "a continued sequence starts at the consumed position")
    assert (cont0 - cont).abs().max() > 1e-3
    with pytest.raises(ValueError):
        model(ids, position_ids=torch.arange(9)[None] + 60)  # beyond max_position_embeddings=64


# =============================================================================================
# Chunked forward (use_chunking=True)
# =============================================================================================

@pytest.mark.parametrize("cs,ov", [(8, 0), (8, 3), (5, 4), (16, 4), (12, 1)])
def test_chunking_equals_unchunked_pure(cs, ov):
    model = make_model(seed=10, rwkv_chunk_size=cs, rwkv_chunk_overlap=ov, **PURE)
    B, T = 2, 37
    ids = rand_ids(B, T, model.config.vocab_size, seed=11)
    with torch.no_grad():
        ref = model(ids, labels=ids)
        out = model(ids, labels=ids, use_chunking=True)
    close(out.logits, ref.logits, 1e-5, "logits")
    close(out.loss, ref.loss, 1e-5, "loss")
    assert out.num_targets == ref.num_targets == B * (T - 1)
    for i in rwkv_layers(model):
        close(out.state.layers[i].wkv, ref.state.layers[i].wkv, 1e-5, "state")
        close(out.state.layers[i].att_shift, ref.state.layers[i].att_shift, 1e-5, "shift")


def test_chunking_with_right_padding_equals_unchunked():
    model = make_model(seed=12, rwkv_chunk_size=8, rwkv_chunk_overlap=2, **PURE)
    ids = rand_ids(2, 30, model.config.vocab_size, seed=13)
    mask = torch.ones_like(ids)
    mask[1, 19:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, labels=ids)
        out = model(ids, attention_mask=mask, labels=ids, use_chunking=True)
    close(out.logits[0], ref.logits[0], 1e-5)
    close(out.logits[1, :19], ref.logits[1, :19], 1e-5)
    close(out.loss, ref.loss, 1e-5)


@pytest.mark.parametrize("return_logits", [True, False])
def test_chunked_full_bptt_gradients_equal_unchunked(return_logits):
    model = make_model(seed=14, dtype=torch.float64, rwkv_chunk_size=8, rwkv_chunk_overlap=3, **PURE).train()
    ids = rand_ids(2, 29, model.config.vocab_size, seed=15)
    model.zero_grad()
    ref = model(ids, labels=ids)
    ref.loss.backward()
    g_ref = grads(model)
    model.zero_grad()
    out = model(ids, labels=ids, use_chunking=True, return_logits=return_logits)
    out.loss.backward()
    g = grads(model)
    close(out.loss, ref.loss, 1e-6)
    for n in g_ref:
        scale = float(g_ref[n].abs().max())
        close(g[n], g_ref[n], 1e-6 * max(scale, 1e-3), n)
    assert sum(float(v.abs().sum()) for v in g.values()) > 0


def test_truncated_bptt_detaches_state_between_chunks():
    """Labels only in the last chunk: with full BPTT the embeddings of tokens seen only in the first chunk
    get gradient (through the carried state); with truncated BPTT they get none."""
    V = 97
    model = make_model(seed=16, dtype=torch.float64, vocab_size=V, rwkv_chunk_size=8, rwkv_chunk_overlap=0,
                       **PURE).train()
    g = torch.Generator().manual_seed(17)
    early = torch.randint(0, 40, (2, 8), generator=g)       # first chunk: tokens 0..39
    late = torch.randint(40, V, (2, 16), generator=g)       # later chunks: tokens 40..96
    ids = torch.cat([early, late], 1)
    labels = ids.clone()
    labels[:, :17] = -100  # shifted targets of positions < 16 ignored: loss only from the last chunk
    res = {}
    for bptt in ("full", "truncated"):
        model.zero_grad()
        out = model(ids, labels=labels, use_chunking=True, bptt=bptt)
        out.loss.backward()
        res[bptt] = (out.loss.detach(), model.emb.weight.grad[:40].clone(), model.emb.weight.grad[40:].clone())
    close(res["full"][0], res["truncated"][0], 1e-6, "same loss")
    assert res["full"][1].abs().max() > 1e-8       # early tokens get gradient through the state
    assert res["truncated"][1].abs().max() == 0    # ... but not when the state is detached
    assert res["truncated"][2].abs().max() > 1e-8
    assert (res["full"][2] - res["truncated"][2]).abs().max() > 1e-10  # later grads differ too


def test_wkv_impl_sequential_equals_chunked_in_model():
    m1 = make_model(seed=18, dtype=torch.float64, wkv_impl="sequential", **HYBRID)
    m2 = make_model(seed=18, dtype=torch.float64, wkv_impl="chunked", **HYBRID)
    ids = rand_ids(2, 21, m1.config.vocab_size, seed=19)
    with torch.no_grad():
        close(m1(ids).logits, m2(ids).logits, 1e-10)


def test_float64_model_gives_float64_loss():
    """A float64 model (the reference path) must not round its loss, and so every gradient, to float32."""
    model = make_model(seed=26, dtype=torch.float64, **PURE)
    ids = rand_ids(1, 9, model.config.vocab_size, seed=27)
    out = model(ids, labels=ids)
    expect = F.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    assert out.loss.dtype == torch.float64
    close(out.loss, expect, 1e-12)


# =============================================================================================
# Gradient checkpointing, mixed precision, inference optimisation
# =============================================================================================

@pytest.mark.parametrize("kind", ["pure", "hybrid"])
def test_gradient_checkpointing_same_loss_and_grads(kind):
    cfg = {"pure": PURE, "hybrid": HYBRID}[kind]
    model = make_model(seed=20, dtype=torch.float64, **cfg).train()
    ids = rand_ids(2, 19, model.config.vocab_size, seed=21)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    model.zero_grad()
    ref = model(ids, attention_mask=mask, labels=ids)
    ref.loss.backward()
    g_ref = grads(model)
    model.enable_gradient_checkpointing()
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    g = grads(model)
    close(out.loss, ref.loss, 1e-12)
    for n in g_ref:
        close(g[n], g_ref[n], 1e-10, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_runs_and_is_close(dtype):
    model = make_model(seed=22, **HYBRID).train()
    ids = rand_ids(2, 24, model.config.vocab_size, seed=23)
    ref = model(ids, labels=ids)
    model.enable_mixed_precision(dtype=dtype)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    for i in rwkv_layers(model):
        assert out.state.layers[i].wkv.dtype == torch.float32  # the WKV state stays float32
    scale = ref.logits.abs().max()
    assert (out.logits.float() - ref.logits).abs().max() < 0.03 * scale
    assert abs(float(out.loss.detach()) - float(ref.loss.detach())) < 0.05 * float(ref.loss.detach())


@pytest.mark.parametrize("kind", ["pure", "hybrid0"])
def test_optimize_for_inference_same_logits(kind):
    cfg = {"pure": PURE, "hybrid0": HYBRID0}[kind]
    model = make_model(seed=24, **cfg)
    ids = rand_ids(2, 17, model.config.vocab_size, seed=25)
    with torch.no_grad():
        ref = model(ids).logits
        model.eval()
        model.optimize_for_inference()
        out = model(ids).logits
        st = None
        steps = []
        for t in range(ids.shape[1]):
            o = model(ids[:, t:t + 1], state=st)
            st = o.state
            steps.append(o.logits)
    close(out, ref, 1e-5)
    close(torch.cat(steps, 1), ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimize_for_inference_half_weights_on_cpu(dtype):
    """optimize_for_inference(bf16/fp16) runs without autocast on a CPU (ln_x stays float32, the output
    projection gets its weights' dtype), token by token too, within half-precision rounding."""
    model = make_model(seed=26, **HYBRID0)
    ids = rand_ids(2, 11, model.config.vocab_size, seed=27)
    with torch.no_grad():
        ref = model(ids).logits
        model.optimize_for_inference(dtype)
        out = model(ids).logits
        st, steps = None, []
        for t in range(ids.shape[1]):
            o = model(ids[:, t:t + 1], state=st)
            st, steps = o.state, steps + [o.logits]
    assert out.dtype == dtype
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() < 0.03 * scale
    assert (torch.cat(steps, 1).float() - ref).abs().max() < 0.03 * scale


def test_optimize_for_inference_then_move_or_cast():
    """`model.optimize_for_inference(); model.to(...)` (e.g. .cuda(), .double()) must keep working: the
    folded embedding has to follow the module like any buffer."""
    model = make_model(seed=28, **PURE)
    ids = rand_ids(1, 7, model.config.vocab_size, seed=29)
    with torch.no_grad():
        ref = make_model(seed=28, dtype=torch.float64, **PURE)(ids).logits
        model.optimize_for_inference()
        model.to(torch.float64)
        out = model(ids).logits
    assert out.dtype == torch.float64
    close(out, ref, 1e-5)  # the fold was computed in float32 before the cast
    assert not any("fold" in k for k in model.state_dict())  # not part of the checkpoint


def test_train_after_optimize_for_inference_trains_again():
    """optimize_for_inference() freezes the weights; .train() undoes it (the docstring's promise), so a
    model switched back to training gets gradients again."""
    model = make_model(seed=30, **PURE)
    n_trainable = model.num_parameters(trainable_only=True)
    model.optimize_for_inference()
    model.train()
    assert model.num_parameters(trainable_only=True) == n_trainable
    ids = rand_ids(1, 7, model.config.vocab_size, seed=31)
    model(ids, labels=ids).loss.backward()
    assert model.head.weight.grad is not None and model.emb.weight.grad is not None
