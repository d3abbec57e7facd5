"""Generation: batch == one prompt at a time, the fast decode step == the model, sampling controls, stop
sequences, streaming, saved/reused states, and the `kaggletrain generate` command."""

from __future__ import annotations

import pytest
import torch

from kaggletrain.cli import main as cli_main
from kaggletrain.errors import KaggletrainError
from kaggletrain.infer import SamplingParams, TextStream, generate, run_last, select_next
from kaggletrain.infer.fast import DecodeStep
from kaggletrain.infer.sampling import apply_repetition_penalty, filter_top_k_top_p
from kaggletrain.infer.state_io import load_state, save_state
from tiny_models import make_model  # tests/tiny_models.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 200], [1]]
VARIANTS = {
    "rwkv": {},
    "states": {"rwkv_use_learnable_states": True},
    "hybrid": {"num_layers": 3, "attention_layers": [1], "use_position_embeddings": True,
               "max_position_embeddings": 128},
}


@pytest.fixture(params=["onednn+kernel", "onednn", "torch"])
def cpu_products(request, monkeypatch):
    """Run the CPU decode step with oneDNN products (where this torch has them) and the compiled WKV step
    kernel (where it builds), with oneDNN and PyTorch's WKV ops, and with F.linear and PyTorch's ops (what
    a torch build without oneDNN on a machine without a compiler gets)."""
    from kaggletrain.infer import cpu_kernel, cpu_linear

    onednn = request.param.startswith("onednn")
    if onednn and not cpu_linear.onednn_ok():
        pytest.skip("this torch build has no oneDNN fused linear")
    monkeypatch.setattr(cpu_linear, "_ONEDNN", onednn)
    if request.param.endswith("kernel"):
        if cpu_kernel.step_kernel(warn=False) is None:
            pytest.skip(f"the CPU WKV step kernel does not build here: {cpu_kernel.build_info()['error']}")
    else:
        monkeypatch.setenv("KAGGLETRAIN_DISABLE_CPU_KERNEL", "1")
    return request.param


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_step_and_prefill_match_the_model(variant, cpu_products):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    # batch 1 and batch 3 take different head paths; optimize_for_inference folds ln0 and re-lays weights
    for rows, optimize in (([0], False), ([0, 1, 2], False), ([0], True), ([0, 1, 2], True)):
        if optimize:
            model.optimize_for_inference()
        logits, st = run_last(model, ids[rows, :8])
        assert torch.allclose(logits, full[rows, 7], atol=1e-5, rtol=0)
        step = DecodeStep(model)
        for t in range(8, 12):
            logits, st = step(ids[rows, t], st)
            assert torch.allclose(logits, full[rows, t], atol=1e-5, rtol=0), t
    # A masked row keeps its state bit for bit.
    before = st.expand()
    _, after = step(ids[:, 0], st, torch.tensor([1, 0, 1]))
    for old, new in zip(before.layers, after.expand().layers):
        for name in ("att_shift", "wkv", "ffn_shift"):
            if hasattr(old, name):
                assert torch.equal(getattr(old, name)[1], getattr(new, name)[1])
    assert after.position.tolist() == [13, 12, 13]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_generation_equals_one_prompt_at_a_time(variant):
    model = make_model(**VARIANTS[variant])
    batch = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    for prompt, got in zip(PROMPTS, batch.tokens):
        assert generate(model, prompt, max_new_tokens=6, temperature=0).tokens[0] == got
    assert batch.finish_reasons == ["length"] * 3
    # Greedy decoding is the argmax of the model's own logits, step by step.
    seq = list(PROMPTS[1])
    for tok in batch.tokens[1]:
        with torch.no_grad():
            assert int(model(torch.tensor([seq])).logits[0, -1].argmax()) == tok
        seq.append(tok)


def test_padded_tensor_input_and_model_method():
    model = make_model()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, temperature=0)
    assert out.tokens[0] == generate(model, [5, 6, 7], max_new_tokens=4, temperature=0).tokens[0]
    assert model.training is False


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone():
    model = make_model()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    c = generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    # top-k 2 keeps two tokens; top-p keeps the smallest prefix reaching p.
    assert torch.isfinite(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[True, True, False, False, False]]
    probs = torch.softmax(logits, -1)[0]
    p = float(probs[0] + probs[1]) - 1e-4
    assert torch.isfinite(filter_top_k_top_p(logits, 0, p)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 1e-6)).sum() == 1
    # repetition penalty: positive logits divided, negative multiplied, unseen untouched.
    seen = torch.tensor([[True, False, False, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.0, 0.5, -2.0, -3.0]]
    g = torch.Generator().manual_seed(0)
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6)):
        assert select_next(logits.repeat(4, 1), params, None, g).tolist() == [0, 0, 0, 0]
    with pytest.raises(KaggletrainError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(KaggletrainError, match="temperature"):
        SamplingParams(temperature=-1)


def test_repetition_penalty_changes_greedy_output():
    model = make_model()
    plain = generate(model, PROMPTS[0], max_new_tokens=20, temperature=0).tokens[0]
    strong = generate(model, PROMPTS[0], max_new_tokens=20, temperature=0, repetition_penalty=1e6).tokens[0]
    assert len(set(strong) & set(PROMPTS[0])) == 0 and len(set(strong)) == len(strong)
    assert plain != strong


def test_stop_sequences_eos_and_streaming_callback():
    model = make_model()
    free = generate(model, PROMPTS, max_new_tokens=8, temperature=0).tokens
    stop_seq = free[1][2:4]
    seen_steps = []

    def stream(tokens):
        seen_steps.append(list(tokens))
        return [2] if len(seen_steps) == 3 else None  # the callback stops row 2 after 3 tokens

    out = generate(model, PROMPTS, max_new_tokens=8, temperature=0, stop_token_sequences=[stop_seq],
                   eos_token_id=free[0][1], stream=stream)
    assert out.tokens[0] == free[0][:2] and out.finish_reasons[0] == "eos"
    assert out.tokens[1][-2:] == stop_seq and out.finish_reasons[1] == "stop"
    assert out.tokens[2] == free[2][:3] and out.finish_reasons[2] == "callback"
    assert seen_steps[0] == [free[0][0], free[1][0], free[2][0]]
    assert seen_steps[2][0] is None  # row 0 had finished


def test_state_after_prompt_is_reusable_and_saved_exactly(tmp_path):
    model = make_model(rwkv_use_learnable_states=True)
    head, tail = [3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]
    whole = generate(model, head + tail, max_new_tokens=6, temperature=0).tokens[0]
    prefix = generate(model, head, max_new_tokens=0, return_state=True)
    assert prefix.tokens == [[]]
    save_state(prefix.state, tmp_path / "head.safetensors")
    loaded = load_state(tmp_path / "head.safetensors", model)
    assert generate(model, tail, max_new_tokens=6, temperature=0, state=loaded).tokens[0] == whole
    # One saved state shared by a batch of continuations.
    batch = generate(model, [tail, [7]], max_new_tokens=6, temperature=0, state=loaded)
    assert batch.tokens[0] == whole
    assert batch.tokens[1] == generate(model, head + [7], max_new_tokens=6, temperature=0).tokens[0]


def test_returned_state_covers_prompt_and_output():
    model = make_model()
    out = generate(model, PROMPTS, max_new_tokens=5, temperature=0, return_state=True,
                   stop_token_sequences=[generate(model, PROMPTS[0], max_new_tokens=2, temperature=0).tokens[0]])
    assert out.finish_reasons[0] == "stop" and len(out.tokens[0]) == 2
    for i, (prompt, toks) in enumerate(zip(PROMPTS, out.tokens)):
        _, ref = run_last(model, torch.tensor([prompt + toks]))
        got = out.state.select([i])
        assert got.position.tolist() == [len(prompt) + len(toks)]
        for a, b in zip(got.layers, ref.layers):
            assert torch.allclose(a.wkv, b.wkv, atol=1e-5) and torch.allclose(a.att_shift, b.att_shift, atol=1e-5)


def test_bad_inputs_raise_kaggletrain_errors():
    model = make_model()
    for kwargs, pattern in (({"input_ids": [[1], []]}, "prompt 1 is empty"),
                            ({"input_ids": [1, 999]}, r"outside \[0, 256\)"),
                            ({"input_ids": [1], "max_new_tokens": -1}, "max_new_tokens"),
                            ({"input_ids": [[1], [2], [3]], "state": generate(model, [[1], [2]], max_new_tokens=0,
                                                                              return_state=True).state},
                             "batch size 2")):
        with pytest.raises(KaggletrainError, match=pattern):
            generate(model, **kwargs)


def test_text_stream_holds_partial_characters_and_stop_strings():
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    s = TextStream(decode, ["STOP"])
    pieces = [s.push(b)[0] for b in "héllo ST".encode()]
    assert "".join(pieces) + s.finish() == "héllo ST"
    s = TextStream(decode, ["STOP"])
    out = "".join(s.push(b)[0] for b in "ab STOP cd".encode()[:7])
    assert s.stopped and out == "ab " and s.text == "ab "
    assert s.push(ord("x")) == ("", True)


# ---- the command line ---------------------------------------------------------------------------
@pytest.fixture
def byte_checkpoint(tmp_path):
    return make_model().save_pretrained(tmp_path / "ck", tokenizer={"type": "byte"})


def test_generate_cli_streams_and_reuses_state(byte_checkpoint, tmp_path, capsys):
    args = ["generate", str(byte_checkpoint), "--prompt", "Hello", "-n", "12", "--temperature", "0"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    model = make_model()
    expected = bytes(generate(model, list(b"Hello"), max_new_tokens=12, temperature=0).tokens[0])
    assert text == expected.decode("utf-8", errors="replace") + "\n"

    st = tmp_path / "s.safetensors"
    assert cli_main(["generate", str(byte_checkpoint), "-p", "Hel", "-n", "0", "--save-state", str(st)]) == 0
    capsys.readouterr()
    assert cli_main(["generate", str(byte_checkpoint), "-p", "lo", "-n", "12", "-t", "0", "--state", str(st)]) == 0
    assert capsys.readouterr().out == text

    # Batch of prompts with sampling controls and a stop string.
    assert cli_main(["generate", str(byte_checkpoint), "-p", "a", "-p", "bcd", "-n", "5", "--seed", "3",
                     "--top-k", "5", "--top-p", "0.9", "--repetition-penalty", "1.2", "--stop", "zz"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 2


def test_generate_cli_reports_a_stop_string_as_stop(byte_checkpoint, capsys):
    out = generate(make_model(), list(b"Hello"), max_new_tokens=12, temperature=0).tokens[0]
    text = bytes(out).decode("utf-8", errors="replace")
    assert len(text) >= 6
    stop = text[4:6]
    assert cli_main(["generate", str(byte_checkpoint), "-p", "Hello", "-p", "Hello", "-n", "12", "-t", "0",
                     "--stop", stop]) == 0
    printed = capsys.readouterr().out
    head = "--- [{}] 'Hello' (stop)\n" + text[: text.index(stop)] + "\n"
    assert printed == head.format(0) + head.format(1)


@pytest.mark.parametrize("extra, pattern", [
    (["--top-p", "2"], "top_p"),
    (["--state", "nothing.safetensors"], "state file not found"),
    (["--device", "tpu"], "--device"),
    # A prompt or stop string that is not UTF-8 on the command line (argv decoded with surrogateescape)
    (["-p", "caf\udce9"], "--prompt b'caf\\xe9': not valid utf-8 text (byte 0xe9 at offset 3)"),
    (["--stop", "\udcff!"], "--stop b'\\xff!': not valid utf-8 text (byte 0xff at offset 0)"),
])
def test_generate_cli_errors_are_one_line(byte_checkpoint, capsys, extra, pattern):
    assert cli_main(["generate", str(byte_checkpoint), "-p", "x", "-n", "2", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert pattern in err and len(err.splitlines()) == 1


def test_generate_cli_rejects_a_state_from_another_model(byte_checkpoint, tmp_path, capsys):
    other = make_model(hidden_size=64, head_size=32)
    st = generate(other, [1, 2], max_new_tokens=0, return_state=True).state
    save_state(st, tmp_path / "o.safetensors")
    assert cli_main(["generate", str(byte_checkpoint), "-p", "x", "--state", str(tmp_path / "o.safetensors")]) == 2
    assert "do not fit this model" in capsys.readouterr().err


def test_tokenizer_choice_follows_the_vocabulary():
    from kaggletrain.infer import tokenizer_for

    assert tokenizer_for({}, 65536).name == "world"
    assert tokenizer_for({}, 256).name == "byte"
    assert tokenizer_for({"tokenizer": {"type": "char", "chars": "ab"}}, 2).name == "char"
    with pytest.raises(KaggletrainError, match="vocab_size=1000"):
        tokenizer_for({"path": "x"}, 1000)


def test_train_after_optimize_for_inference_restores_contiguous_weights(monkeypatch):
    """Without oneDNN and the compiled kernels, optimize_for_inference re-lays the FFN key weights for CPU
    decoding (MKL gemv); .train() puts them back."""
    from kaggletrain.infer import cpu_linear

    monkeypatch.setattr(cpu_linear, "_ONEDNN", False)
    monkeypatch.setenv("KAGGLETRAIN_DISABLE_CPU_KERNEL", "1")
    model = make_model()
    model.optimize_for_inference()
    assert not model.blocks[0].ffn.key.weight.is_contiguous()
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.train()
    for n, p in model.named_parameters():
        assert p.is_contiguous(), n
        assert torch.equal(p, before[n]), n


def test_decode_head_copy_is_cached_and_follows_weight_changes():
    """Batch-1 CPU decoding reads the head from a transposed copy: made once per model (not per
    generate call), and remade when the head's weights change in place (training, loading)."""
    import torch

    from kaggletrain import ModelConfig, RWKVModel
    from kaggletrain.infer.fast import DecodeStep

    torch.manual_seed(3)
    model = RWKVModel(ModelConfig(hidden_size=64, num_layers=2, head_size=32, vocab_size=300)).eval()
    model.optimize_for_inference()
    prompt, nxt = torch.tensor([[4, 8, 15]]), torch.tensor([16])
    with torch.no_grad():
        state = model(prompt).state
        first, _ = DecodeStep(model)(nxt, state)
        copy = model._decode_head_t[1]
        DecodeStep(model)(nxt, state)
        assert model._decode_head_t[1] is copy  # reused by the next generation
        model.head.weight.mul_(1.5)
        changed, _ = DecodeStep(model)(nxt, state)
        ref = model(torch.cat([prompt, nxt[:, None]], 1)).logits[:, -1]
    assert model._decode_head_t[1] is not copy
    torch.testing.assert_close(changed, ref, rtol=1e-5, atol=1e-5)
    assert (changed - first).abs().max() > 1e-3
    assert not any("head_t" in k for k in model.state_dict())
