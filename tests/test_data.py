"""Data pipeline: tokenizers, sources, the token cache, the split, sampling and every data error."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kaggletrain.config import config_from_dict
from kaggletrain.data import (
    ByteTokenizer,
    CharTokenizer,
    WindowSampler,
    WorldTokenizer,
    build_tokenizer,
    check_vocab,
    eval_batches,
    prepare_data,
    tokenizer_from_dict,
)
from kaggletrain.data import builtin
from kaggletrain.data.binidx import MAGIC, read_binidx
from kaggletrain.errors import DataError

SAMPLE = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 😀🚀, math ∑∫√.\n"
    "\tTabs, \r\nCRLF lines, and    runs of spaces.\n"
)

try:
    import pyrwkv_tokenizer  # noqa: F401

    HAVE_PYRWKV = True
except ImportError:
    HAVE_PYRWKV = False


def data_cfg(tmp_path: Path, **data):
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return config_from_dict({"data": data}).data


def text_file(tmp_path: Path, text: str, name: str = "corpus.txt") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def write_binidx(prefix: Path, docs: list[list[int]], dtype=np.uint16, code: int = 8) -> Path:
    """A minimal Megatron/RWKV-LM MMapIndexedDataset writer (same layout as RWKV-LM's make_data.py)."""
    sizes = np.array([len(d) for d in docs], dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(sizes.astype(np.int64))[:-1]]).astype(np.int64) * itemsize
    doc_idx = np.arange(len(docs) + 1, dtype=np.int64)
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())
    return prefix


def data_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, "errors must be one line"
    return msg


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [SAMPLE, "", "a", "\x00\x7f\u0080\uffff\U0010ffff"])
def test_byte_and_char_round_trips_are_exact(text: str):
    byte = ByteTokenizer()
    assert byte.decode(byte.encode(text)) == text
    assert all(0 <= i < 256 for i in byte.encode(text))
    char = CharTokenizer.from_text([text or "x"])
    assert char.decode(char.encode(text)) == text
    again = tokenizer_from_dict(json.loads(json.dumps(char.to_dict())))  # stored with the run as JSON
    assert again.encode(text) == char.encode(text) and again.vocab_size == char.vocab_size


def test_char_vocabulary_is_sorted_and_rejects_unknown_characters():
    tok = build_tokenizer("char", ["hello", "world"])
    assert tok.vocab_size == len(set("helloworld")) and tok.chars == sorted(set("helloworld"))
    assert "not in the char-level vocabulary" in data_error(tok.encode, "help!")
    assert tok.decode([0, 999]) == tok.chars[0] + "\ufffd"
    assert list(tok.token_byte_lengths()) == [1] * tok.vocab_size


def test_tokenizers_reject_bad_saved_dicts():
    assert "unknown saved tokenizer" in data_error(tokenizer_from_dict, {"type": "bpe"})
    assert "not a saved tokenizer" in data_error(tokenizer_from_dict, "byte")
    assert "unknown tokenizer" in data_error(build_tokenizer, "sentencepiece")


@pytest.mark.skipif(not HAVE_PYRWKV, reason="pyrwkv_tokenizer not installed")
def test_world_round_trip_and_known_ids():
    tok = build_tokenizer("world")
    assert tok.vocab_size == 65536 and tok.name == "world"
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert max(ids) < 65536
    assert tok.encode("\n") == [11]  # id 11 is '\n' in rwkv_vocab_v20230424
    emoji = tok.encode("😀")
    assert len(emoji) > 1 and tok.decode(emoji[:1]) == "\ufffd"  # partial UTF-8 never raises
    lengths = tok.token_byte_lengths()
    assert lengths[11] == 1 and lengths[0] == 0
    assert int(lengths[np.array(ids)].sum()) == len(SAMPLE.encode("utf-8"))  # bits-per-byte ready


@pytest.mark.skipif(not HAVE_PYRWKV, reason="needs pyrwkv_tokenizer to compare against")
def test_python_world_fallback_matches_pyrwkv():
    fast = WorldTokenizer(backend="pyrwkv")
    slow = WorldTokenizer(backend="python")
    text = SAMPLE + "def f(x):\n    return x ** 2  # squares\n" * 3
    assert slow.encode(text) == fast.encode(text)
    assert slow.decode(slow.encode(text)) == text


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def decoded(prepared) -> str:
    parts = [prepared.train_tokens] + ([prepared.val_tokens] if prepared.val_tokens is not None else [])
    return prepared.tokenizer.decode(np.concatenate(parts).tolist())


def test_txt_file_split_is_first_90_percent_train(tmp_path: Path):
    text = "".join(f"line {i}: some words\n" for i in range(200))
    p = prepare_data(data_cfg(tmp_path, source=str(text_file(tmp_path, text))), seq_len=8)
    n = len(text.encode())
    assert p.num_tokens == n and len(p.train_tokens) == int(n * 0.9)
    assert p.tokenizer.decode(p.train_tokens.tolist()) == text[: int(n * 0.9)]
    assert decoded(p) == text
    assert p.train_tokens.dtype == np.uint16 and isinstance(p.train_tokens, np.memmap)
    p.check_vocab(256)


def test_folder_and_glob_read_sorted_non_hidden_files(tmp_path: Path):
    root = tmp_path / "docs"
    text_file(root, "second\n", "b.txt")
    text_file(root, "first\n", "a.txt")
    text_file(root, "third\n", "sub/c.md")
    text_file(root, "secret\n", ".hidden.txt")
    text_file(root, "", "empty.txt")  # empty files inside a folder are skipped
    sep = "\n<doc>\n"
    p = prepare_data(data_cfg(tmp_path, source=str(root), val_fraction=0.0, separator=sep), seq_len=4)
    assert decoded(p) == sep.join(["first\n", "second\n", "third\n"])
    assert p.val_tokens is None
    g = prepare_data(data_cfg(tmp_path, source=str(root / "**" / "*.txt"), val_fraction=0.0, separator=sep), seq_len=4)
    assert decoded(g) == sep.join(["first\n", "second\n"])


def test_jsonl_and_csv_documents(tmp_path: Path):
    lines = [json.dumps({"text": f"doc {i}", "id": i}) for i in range(5)]
    jl = text_file(tmp_path, "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", "d.jsonl")
    p = prepare_data(data_cfg(tmp_path, source=str(jl), val_fraction=0.0, separator="|"), seq_len=4)
    assert decoded(p) == "|".join(f"doc {i}" for i in range(5))

    cs = text_file(tmp_path, 'id,body\n1,"hello, world"\n2,"two\nlines"\n3,\n4,last\n', "d.csv")
    p = prepare_data(data_cfg(tmp_path, source=str(cs), text_column="body", val_fraction=0.0, separator="|"), seq_len=4)
    assert decoded(p) == "hello, world|two\nlines|last"


def _split_at_eos(tokens) -> list[list[int]]:
    docs, cur = [], []
    for t in tokens:
        if t == 0:
            docs.append(cur)
            cur = []
        else:
            cur.append(int(t))
    assert cur == [], "the stream must end with token 0"
    return docs


def test_world_documents_end_with_token_0_as_in_rwkv_lm(tmp_path: Path):
    # RWKV-LM's make_data.py: tokenizer.encode(doc) + [0] for every document, no separator text.
    docs = ["User: hi\n\nAssistant: hello", "User: bye\n\nAssistant: ok", "日本語 😀"]
    world = WorldTokenizer()
    expected = [t for d in docs for t in world.encode(d) + [0]]
    jl = text_file(tmp_path, "".join(json.dumps({"text": d}) + "\n" for d in docs), "chats.jsonl")
    cs = text_file(tmp_path, "text\n" + "".join('"' + d.replace('"', '""') + '"\n' for d in docs), "chats.csv")
    folder = tmp_path / "folder"
    for i, d in enumerate(docs):
        text_file(folder, d, f"{i}.txt")
    for src in (jl, cs, folder, folder / "*.txt"):
        p = prepare_data(data_cfg(tmp_path, source=str(src), tokenizer="world", val_fraction=0.0), seq_len=4)
        assert p.train_tokens.tolist() == expected, src
    # A single .txt file is one document, ended the same way.
    one = prepare_data(data_cfg(tmp_path, source=str(folder / "0.txt"), tokenizer="world", val_fraction=0.0), 4)
    assert one.train_tokens.tolist() == world.encode(docs[0]) + [0]
    # document_end=separator keeps the text separator (and no token 0); byte data keeps its separator.
    sep = prepare_data(data_cfg(tmp_path, source=str(jl), tokenizer="world", document_end="separator",
                                val_fraction=0.0), seq_len=4)
    assert 0 not in sep.train_tokens.tolist() and decoded(sep) == "\n\n".join(docs)
    byte = prepare_data(data_cfg(tmp_path, source=str(jl), val_fraction=0.0), seq_len=4)
    assert decoded(byte) == "\n\n".join(docs)


def test_world_document_ends_survive_encoding_batches(tmp_path: Path, monkeypatch):
    # Many documents, and documents longer than one read, cut into several encoding batches.
    from kaggletrain.data import prepare, sources

    monkeypatch.setattr(prepare, "PIECE_CHARS", 100)
    monkeypatch.setattr(sources, "READ_BYTES", 64)
    docs = [f"document {i}: " + "some words on a line\n" * (i % 7) + "end" for i in range(40)]
    folder = tmp_path / "many"
    for i, d in enumerate(docs):
        text_file(folder, d, f"{i:03d}.txt")
    p = prepare_data(data_cfg(tmp_path, source=str(folder), tokenizer="world", val_fraction=0.0), seq_len=4)
    assert [p.tokenizer.decode(d) for d in _split_at_eos(p.train_tokens.tolist())] == docs


def test_document_end_is_part_of_the_cache_key(tmp_path: Path):
    jl = text_file(tmp_path, '{"text": "one document"}\n{"text": "another one"}\n', "d.jsonl")
    old = prepare_data(data_cfg(tmp_path, source=str(jl), tokenizer="world", document_end="separator",
                                val_fraction=0.0), seq_len=4)
    new = prepare_data(data_cfg(tmp_path, source=str(jl), tokenizer="world", val_fraction=0.0), seq_len=4)
    assert not new.cache_hit and new.num_tokens == old.num_tokens + 1  # "\n\n" (one token) -> two 0s
    assert new.train_tokens.tolist().count(0) == 2
    again = prepare_data(data_cfg(tmp_path, source=str(jl), tokenizer="world", document_end="eos",
                                  val_fraction=0.0), seq_len=4)
    assert again.cache_hit and again.train_tokens.tolist() == new.train_tokens.tolist()


@pytest.mark.parametrize("tokenizer", ["byte", "char", "world"])
def test_jsonl_unpaired_surrogates_become_replacement_characters(tmp_path: Path, tokenizer: str):
    # '\ud83d' without its pair (a cut emoji in scraped data) is valid JSON but not encodable text.
    jl = text_file(tmp_path, '{"text": "first document"}\n{"text": "broken \\ud83d emoji \\udc00 \\ud83d\\ude00 ok"}\n'
                   '{"text": "last \\udfff"}\n', "scraped.jsonl")
    with pytest.warns(UserWarning) as caught:
        p = prepare_data(data_cfg(tmp_path, source=str(jl), tokenizer=tokenizer, val_fraction=0.0), seq_len=4)
    msgs = [str(w.message) for w in caught]
    assert msgs and all(m == f"{jl}: 3 unpaired UTF-16 surrogate escape(s) in field 'text' (the first, \\ud83d on "
                        "line 2; half of an emoji?) replaced by U+FFFD" for m in msgs)
    text = decoded(p)
    assert "broken \ufffd emoji \ufffd 😀 ok" in text and "last \ufffd" in text


def test_explicit_format_overrides_the_extension(tmp_path: Path):
    f = text_file(tmp_path, json.dumps({"body": "from a .log file"}) + "\n", "x.log")
    p = prepare_data(data_cfg(tmp_path, source=str(f), format="jsonl", text_field="body", val_fraction=0.0), seq_len=4)
    assert decoded(p) == "from a .log file"


def test_val_source_and_max_tokens(tmp_path: Path):
    train = text_file(tmp_path, "abcabcabcabc" * 10, "train.txt")
    val = text_file(tmp_path, "xyzxyz" * 5, "val.txt")
    p = prepare_data(data_cfg(tmp_path, source=str(train), val_source=str(val), tokenizer="char"), seq_len=4)
    assert len(p.train_tokens) == 120 and len(p.val_tokens) == 30  # all of source trains
    assert p.tokenizer.decode(p.val_tokens.tolist()) == "xyz" * 10  # val chars are in the vocabulary
    assert p.tokenizer.vocab_size == 6
    capped = prepare_data(data_cfg(tmp_path, source=str(train), max_tokens=50), seq_len=4)
    assert capped.num_tokens == 50 and len(capped.train_tokens) == 45 and len(capped.val_tokens) == 5


def test_encoding_option_reads_latin1(tmp_path: Path):
    f = tmp_path / "latin.txt"
    f.write_bytes("café crème brûlée\n".encode("latin-1") * 4)
    msg = data_error(prepare_data, data_cfg(tmp_path, source=str(f)), 4)
    assert msg.startswith(f"{f}: line 1: not valid utf-8 text (byte 0xe9 at offset 3)") and "data.encoding" in msg
    p = prepare_data(data_cfg(tmp_path, source=str(f), encoding="latin-1", val_fraction=0.0), seq_len=4)
    assert decoded(p) == "café crème brûlée\n" * 4


def _bad_byte_at_line_5000(fmt: str) -> bytes:
    lines = [b"text\n"] if fmt == "csv" else []
    lines += [(b'{"text": "document %d"}\n' if fmt == "jsonl" else b"row %d\n") % i for i in range(len(lines) + 1, 10_001)]
    lines[4999] = b'{"text": "caf\xe9"}\n' if fmt == "jsonl" else b"caf\xe9\n"
    return b"".join(lines)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
def test_decode_errors_name_the_real_line_and_offset(tmp_path: Path, fmt: str):
    # Far past the readers' 8 KB read-ahead: the line and absolute offset of the byte itself.
    data = _bad_byte_at_line_5000(fmt)
    f = tmp_path / f"big.{fmt}"
    f.write_bytes(data)
    at = data.index(b"\xe9")
    assert data_error(prepare_data, data_cfg(tmp_path, source=str(f)), 2).startswith(
        f"{f}: line 5000: not valid utf-8 text (byte 0xe9 at offset {at}):")


def test_decode_error_location_across_reads_bom_and_wide_encodings(tmp_path: Path, monkeypatch):
    from kaggletrain.data import sources

    monkeypatch.setattr(sources, "READ_BYTES", 5)  # characters split across reads
    f = tmp_path / "bom.txt"
    data = "\ufeffnaïve\ncafé\n€uro ".encode() + b"\xff rest\n"
    f.write_bytes(data)
    at = data.index(b"\xff")
    assert data_error(prepare_data, data_cfg(tmp_path, source=str(f)), 2).startswith(
        f"{f}: line 3: not valid utf-8 text (byte 0xff at offset {at}):")
    wide = tmp_path / "wide.txt"
    data = "line one\nline two\nthree ".encode("utf-16-le") + b"\x00\xdc" + "!\n".encode("utf-16-le")
    wide.write_bytes(data)  # a lone low surrogate
    assert data_error(prepare_data, data_cfg(tmp_path, source=str(wide), encoding="utf-16-le"), 2).startswith(
        f"{wide}: line 3: not valid utf-16-le text (byte 0x00 at offset {len(data) - 6}):")


def test_utf8_byte_order_mark_is_not_text(tmp_path: Path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffhello from Windows\r\n".encode("utf-8") * 3)
    p = prepare_data(data_cfg(tmp_path, source=str(f), val_fraction=0.0), seq_len=4)
    assert decoded(p) == "hello from Windows\r\n" + "\ufeffhello from Windows\r\n" * 2  # only the leading BOM
    c = text_file(tmp_path, "\ufefftext,id\nrow one,1\n", "bom.csv")
    assert decoded(prepare_data(data_cfg(tmp_path, source=str(c), val_fraction=0.0), seq_len=4)) == "row one"


def test_builtin_corpus_is_deterministic_docstrings(tmp_path: Path, monkeypatch):
    a = builtin.build_corpus(20_000)
    assert a == builtin.build_corpus(20_000)
    assert 10_000 < len(a.encode()) <= 20_000 and "\n\n" in a
    assert builtin.corpus_key(20_000) == builtin.corpus_key(20_000) != builtin.corpus_key(30_000)
    monkeypatch.setattr(builtin, "DEFAULT_MAX_BYTES", 20_000)  # the real cap is a few MB: too slow here
    p = prepare_data(data_cfg(tmp_path, source="builtin"), seq_len=16)
    assert decoded(p) == a
    assert prepare_data(data_cfg(tmp_path, source="builtin"), seq_len=16).cache_hit


# ------------------------------------------------------------------------------------------------
# binidx
# ------------------------------------------------------------------------------------------------


def test_binidx_uint16_is_mapped_directly(tmp_path: Path):
    docs = [[5, 6, 7, 0], [8, 9, 0], list(range(10, 60)) + [0]]
    prefix = write_binidx(tmp_path / "corpus_text_document", docs)
    flat = [t for d in docs for t in d]
    for spec in (prefix, f"{prefix}.bin", f"{prefix}.idx"):
        p = prepare_data(data_cfg(tmp_path, source=str(spec), tokenizer="world", val_fraction=0.0), seq_len=8)
        assert p.train_tokens.tolist() == flat
        assert Path(p.train_tokens.filename).resolve() == Path(f"{prefix}.bin").resolve()  # no copy
        assert p.max_token_id == 59


def test_binidx_int32_is_converted(tmp_path: Path):
    docs = [[1, 2, 3, 70000], [4, 5, 6, 7, 8, 9]]
    prefix = write_binidx(tmp_path / "big", docs, dtype=np.int32, code=4)
    bi = read_binidx(prefix)
    assert bi.dtype == np.int32 and bi.num_tokens == 10 and bi.contiguous
    # id 70000 does not fit the World vocabulary: caught at preparation, naming the file
    msg = data_error(prepare_data, data_cfg(tmp_path, source=str(prefix), tokenizer="world", val_fraction=0.0), 4)
    assert msg.startswith(f"{prefix}.bin: token id 70000") and "vocabulary (65536)" in msg


@pytest.mark.parametrize("damage, expected", [
    (lambda idx, bin_: idx.write_bytes(b"NOTANIDX" + idx.read_bytes()[8:]), "bad magic"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-5]), "truncated or corrupted"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:20]), "too short"),
    (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:6]), "truncated"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:17] + b"\x07" + idx.read_bytes()[18:]), "floating-point"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:17] + b"\x63" + idx.read_bytes()[18:]), "unknown binidx dtype code 99"),
    (lambda idx, bin_: bin_.unlink(), "file not found"),
])
def test_bad_binidx_files(tmp_path: Path, damage, expected):
    prefix = write_binidx(tmp_path / "d", [[1, 2, 3], [4, 5, 6, 7]])
    damage(Path(f"{prefix}.idx"), Path(f"{prefix}.bin"))
    msg = data_error(prepare_data, data_cfg(tmp_path, source=f"{prefix}.idx", val_fraction=0.0), 2)
    assert expected in msg and str(prefix) in msg


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_missing_empty_binary_and_short_sources(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    assert data_error(prepare_data, data_cfg(tmp_path, source=str(missing)), 8) == f"{missing}: file not found (data.source)"
    assert "no files match" in data_error(prepare_data, data_cfg(tmp_path, source=str(tmp_path / "*.zzz")), 8)
    empty = text_file(tmp_path, "", "empty.txt")
    assert data_error(prepare_data, data_cfg(tmp_path, source=str(empty)), 8) == f"{empty}: the file is empty"
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    assert "looks like a binary file (NUL byte at offset 4)" in data_error(
        prepare_data, data_cfg(tmp_path, source=str(binary)), 8)
    short = text_file(tmp_path, "x" * 100, "short.txt")
    msg = data_error(prepare_data, data_cfg(tmp_path, source=str(short)), 128)
    assert "90 training tokens" in msg and "train.seq_len + 1 = 129" in msg
    msg = data_error(prepare_data, data_cfg(tmp_path, source=str(short)), 16)
    assert "10 validation tokens" in msg and "= 17" in msg
    assert len(prepare_data(data_cfg(tmp_path, source=str(short), val_fraction=0.0), 16).train_tokens) == 100
    folder = tmp_path / "nothing"
    folder.mkdir()
    assert "has no (non-hidden) files" in data_error(prepare_data, data_cfg(tmp_path, source=str(folder)), 8)
    text_file(folder, "", "a.txt")
    assert "no text found" in data_error(prepare_data, data_cfg(tmp_path, source=str(folder)), 8)


def test_jsonl_and_csv_errors_give_line_numbers(tmp_path: Path):
    bad_json = text_file(tmp_path, '{"text": "ok"}\n{"text": broken}\n', "a.jsonl")
    assert data_error(prepare_data, data_cfg(tmp_path, source=str(bad_json)), 2).startswith(
        f"{bad_json}: line 2: not valid JSON")
    no_field = text_file(tmp_path, '{"text": "ok"}\n\n{"body": "x"}\n', "b.jsonl")
    assert data_error(prepare_data, data_cfg(tmp_path, source=str(no_field)), 2) == (
        f"{no_field}: line 3: no field 'text' (fields: body); set data.text_field")
    not_obj = text_file(tmp_path, '["a"]\n', "c.jsonl")
    assert "line 1: expected a JSON object" in data_error(prepare_data, data_cfg(tmp_path, source=str(not_obj)), 2)
    no_col = text_file(tmp_path, "id,body\n1,x\n", "d.csv")
    assert data_error(prepare_data, data_cfg(tmp_path, source=str(no_col)), 2) == (
        f"{no_col}: no column 'text' (columns: id, body); set data.text_column")
    bad_bytes = tmp_path / "e.jsonl"
    bad_bytes.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    assert "not valid utf-8 text" in data_error(prepare_data, data_cfg(tmp_path, source=str(bad_bytes)), 2)


def test_check_vocab(tmp_path: Path):
    tokens = np.array([1, 2, 300, 4], dtype=np.uint16)
    check_vocab(tokens, 301)
    msg = data_error(check_vocab, tokens, 256, source="corpus.txt")
    assert msg.startswith("corpus.txt: token id 300 (first bad id at position 2)") and "vocab_size=256" in msg
    p = prepare_data(data_cfg(tmp_path, source=str(text_file(tmp_path, "é" * 40)), val_fraction=0.0), seq_len=4)
    assert "outside the model vocabulary (model.vocab_size=128)" in data_error(p.check_vocab, 128)


# ------------------------------------------------------------------------------------------------
# Token cache
# ------------------------------------------------------------------------------------------------


def test_cache_hit_invalidation_and_atomic_files(tmp_path: Path):
    src = text_file(tmp_path, "hello world\n" * 50)
    cfg = data_cfg(tmp_path, source=str(src))
    first = prepare_data(cfg, seq_len=8)
    second = prepare_data(cfg, seq_len=8)
    assert not first.cache_hit and second.cache_hit
    assert np.array_equal(first.train_tokens, second.train_tokens)
    cache = tmp_path / "cache"
    assert not [p for p in cache.iterdir() if ".tmp" in p.name], "no temporary files left behind"
    assert len(list(cache.glob("*.tokens"))) == 1
    # another tokenizer -> another entry; an edited file -> another entry
    assert not prepare_data(data_cfg(tmp_path, source=str(src), tokenizer="char"), seq_len=8).cache_hit
    src.write_text("hello there\n" * 60, encoding="utf-8")
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    edited = prepare_data(cfg, seq_len=8)
    assert not edited.cache_hit and edited.num_tokens == 720
    # a torn entry (tokens file shorter than its metadata says) is rebuilt, not trusted
    tokens_file = edited.cache_files[0]
    tokens_file.write_bytes(tokens_file.read_bytes()[:10])
    rebuilt = prepare_data(cfg, seq_len=8)
    assert not rebuilt.cache_hit and rebuilt.num_tokens == 720


def test_concurrent_preparation_tokenises_once(tmp_path: Path):
    src = text_file(tmp_path, "concurrent ranks share one cache entry\n" * 200)
    cfg = data_cfg(tmp_path, source=str(src), tokenizer="char")
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(prepare_data(cfg, seq_len=16))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and sum(not r.cache_hit for r in results) == 1
    assert all(np.array_equal(r.train_tokens, results[0].train_tokens) for r in results)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def test_window_sampler_shapes_shift_and_content():
    tokens = np.arange(1000, dtype=np.uint16)
    s = WindowSampler(tokens, seq_len=16, global_batch=8, seed=3)
    x, y = s.batch(0)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens of the stream
    offsets = s.global_offsets(0)
    assert offsets.min() >= 0 and offsets.max() <= 1000 - 17
    assert torch.equal(x[:, 0], torch.from_numpy(offsets))


def test_batches_depend_only_on_seed_and_step():
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
    a = WindowSampler(tokens, 32, 8, seed=7)
    b = WindowSampler(tokens, 32, 8, seed=7)
    for step in (0, 1, 5, 10_000):
        assert all(torch.equal(u, v) for u, v in zip(a.batch(step), b.batch(step)))
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], WindowSampler(tokens, 32, 8, seed=8).batch(0)[0])


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_partition_the_same_global_batch(world_size: int):
    tokens = np.random.default_rng(1).integers(0, 65536, 4000).astype(np.uint16)
    single = WindowSampler(tokens, 24, 8, seed=11)
    for step in (0, 3):
        xs, ys = zip(*(WindowSampler(tokens, 24, 8, seed=11, rank=r, world_size=world_size).batch(step)
                       for r in range(world_size)))
        x1, y1 = single.batch(step)
        assert torch.equal(torch.cat(xs), x1) and torch.equal(torch.cat(ys), y1)


def test_resume_with_another_world_size_continues_the_stream():
    tokens = np.arange(3000, dtype=np.uint16)
    run = WindowSampler(tokens, 16, 4, seed=5)
    for _ in range(3):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # checkpoints store it as plain data
    assert state["step"] == 3
    halves = []
    for r in range(2):
        resumed = WindowSampler(tokens, 16, 4, seed=999, rank=r, world_size=2)
        resumed.load_state_dict(state)
        halves.append(resumed.next_batch()[0])
    assert torch.equal(torch.cat(halves), run.next_batch()[0])


def test_sampler_refuses_changed_data_and_bad_sizes():
    s = WindowSampler(np.arange(500, dtype=np.uint16), 16, 4)
    state = s.state_dict()
    other = WindowSampler(np.arange(600, dtype=np.uint16), 16, 4)
    msg = data_error(other.load_state_dict, state)
    assert "drawn from 500 training tokens and the data now gives 600" in msg and "data.document_end" in msg
    with pytest.raises(Exception, match="cannot be split evenly over 3"):
        WindowSampler(np.arange(500, dtype=np.uint16), 16, 4, world_size=3)
    assert "has 10 tokens, but one sequence needs train.seq_len + 1 = 17" in data_error(
        WindowSampler, np.arange(10, dtype=np.uint16), 16, 4)


def test_eval_batches_are_fixed_non_overlapping_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = eval_batches(tokens, seq_len=10, batch_size=8, max_batches=3)
    again = eval_batches(tokens, seq_len=10, batch_size=8, max_batches=3)
    assert len(batches) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == sorted(set(starts)) and all(s % 10 == 0 for s in starts)
    assert starts[-1] > 800  # spread over the whole split, not just its start
    every = eval_batches(tokens, seq_len=10, batch_size=32)
    assert sum(len(x) for x, _ in every) == 99  # (1000 - 1) // 10 windows cover the split
