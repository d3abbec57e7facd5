"""Tokenizers: byte-level, character-level and RWKV World.

All three share one small interface::

    tok.name                    # "byte" | "char" | "world"
    tok.vocab_size              # ids are in [0, vocab_size)
    tok.encode(text) -> list[int]
    tok.decode(ids) -> str      # never raises: unknown ids / partial UTF-8 become U+FFFD
    tok.to_dict() -> dict       # JSON-ready; tokenizer_from_dict(d) rebuilds it (saved with each run)
    tok.encode_array(text) -> np.ndarray   # fast path used when tokenising whole corpora
    tok.token_byte_lengths() -> np.ndarray # UTF-8 bytes per id, for bits-per-byte

Byte and char round trips are exact for any text; World round trips are exact for normal text (it is a
greedy longest-match tokenizer over a byte vocabulary that contains every single byte).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from kaggletrain.errors import DataError

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536  # the model's embedding size; the file defines ids 1..65529, 0 ends a document


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    def token_byte_lengths(self) -> np.ndarray: ...


def _ids(ids: Iterable[int]) -> list[int]:
    # Accept lists, numpy arrays and torch tensors alike.
    if hasattr(ids, "tolist"):
        ids = ids.tolist()  # type: ignore[union-attr]
    return [int(i) for i in ids]


class ByteTokenizer:
    """UTF-8 bytes: vocab 256, no training, exact round trip for every string."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        # Ids >= 256 can only come from a model with a padded vocabulary; show them as U+FFFD.
        data = b"".join(bytes((i,)) if 0 <= i < 256 else b"\xef\xbf\xbd" for i in _ids(ids))
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "byte"}

    def token_byte_lengths(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class CharTokenizer:
    """One id per Unicode character, the vocabulary being the sorted characters of the data.

    The vocabulary is data-dependent, so it is stored with the run (`to_dict`) and rebuilt from there.
    """

    name = "char"

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        if not chars:
            raise DataError("char tokenizer: the data has no characters to build a vocabulary from")
        if any(len(c) != 1 for c in chars):
            raise DataError("char tokenizer: vocabulary entries must be single characters")
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, for searchsorted

    @classmethod
    def from_text(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(seen)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).astype(np.int64).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        idx = np.searchsorted(self._codes, cps)
        idx_c = np.minimum(idx, len(self._codes) - 1)
        bad = self._codes[idx_c] != cps
        if bad.any():
            ch = chr(int(cps[int(np.argmax(bad))]))
            raise DataError(
                f"character {ch!r} is not in the char-level vocabulary ({self.vocab_size} characters "
                "built from the training data)"
            )
        return idx.astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        n = self.vocab_size
        return "".join(self.chars[i] if 0 <= i < n else "\ufffd" for i in _ids(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": "".join(self.chars)}

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8", errors="surrogatepass")) for c in self.chars], dtype=np.int64)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------------------------
# RWKV World
# ------------------------------------------------------------------------------------------------


def _world_vocab_path() -> Path:
    """The World vocabulary file, from pyrwkv_tokenizer or the rwkv package, without importing either."""
    for pkg in ("pyrwkv_tokenizer", "rwkv"):
        spec = importlib.util.find_spec(pkg)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            p = Path(loc) / WORLD_VOCAB_FILE
            if p.is_file():
                return p
    raise DataError(
        "the RWKV World tokenizer needs its vocabulary: pip install pyrwkv-tokenizer (or rwkv)"
    )


@functools.lru_cache(maxsize=2)
def load_world_vocab(path: Path) -> dict[int, bytes]:
    """Parse `<id> <python literal> <byte length>` lines (literal_eval: the file never executes code)."""
    table: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            try:
                first, last = line.index(" "), line.rindex(" ")
                lit = line[first + 1 : last]
                if len(lit) >= 2 and lit[0] == lit[-1] in "'\"" and "\\" not in lit and lit.count(lit[0]) == 2:
                    value: Any = lit[1:-1]  # a plain quoted string (most entries): skip the slow parser
                else:
                    value = ast.literal_eval(lit)
                token = value.encode("utf-8") if isinstance(value, str) else value
                if not isinstance(token, bytes) or len(token) != int(line[last:]):
                    raise ValueError("length mismatch")
                table[int(line[:first])] = token
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{path}: line {lineno}: not a World vocabulary entry ({e})") from None
    return table


class _ByteTrie:
    """Greedy longest-match over a byte vocabulary (the fallback when pyrwkv_tokenizer is missing)."""

    def __init__(self, table: dict[int, bytes]):
        self.root: dict = {}
        for idx, token in table.items():
            node = self.root
            for b in token:
                node = node.setdefault(b, {})
            node[-1] = idx  # key -1 marks "a token ends here"

    def encode(self, data: bytes) -> list[int]:
        out: list[int] = []
        i, n, root = 0, len(data), self.root
        while i < n:
            node, j, best, best_end = root, i, None, i
            while j < n:
                node = node.get(data[j])
                if node is None:
                    break
                j += 1
                if -1 in node:
                    best, best_end = node[-1], j
            if best is None:  # cannot happen with the World vocabulary (it has every byte)
                raise DataError(f"World tokenizer: byte 0x{data[i]:02x} has no token")
            out.append(best)
            i = best_end
        return out


@functools.lru_cache(maxsize=1)
def _pyrwkv() -> Any:
    """The Rust World tokenizer (loaded once per process; it is stateless), or None if not installed."""
    try:
        from pyrwkv_tokenizer import RWKVTokenizer
    except ImportError:
        return None
    return RWKVTokenizer()


class WorldTokenizer:
    """The RWKV World tokenizer (vocab 65536), as used by the official RWKV-7 models.

    Encoding uses the Rust `pyrwkv_tokenizer` when installed, else a pure-Python trie over the same
    vocabulary file (same greedy longest match, same ids, about 100x slower). Decoding always uses the
    byte table, because pyrwkv_tokenizer panics on partial UTF-8 (which generation produces).
    """

    name = "world"
    vocab_size = WORLD_VOCAB_SIZE

    def __init__(self, backend: str = "auto"):
        if backend not in ("auto", "pyrwkv", "python"):
            raise ValueError(f"backend must be auto, pyrwkv or python, got {backend!r}")
        self._fast = _pyrwkv() if backend in ("auto", "pyrwkv") else None
        if backend == "pyrwkv" and self._fast is None:
            raise DataError("pyrwkv_tokenizer is not installed: pip install pyrwkv-tokenizer")
        self.backend = "pyrwkv" if self._fast is not None else "python"
        self._table: dict[int, bytes] | None = None
        self._trie: _ByteTrie | None = None

    @property
    def table(self) -> dict[int, bytes]:
        if self._table is None:
            self._table = load_world_vocab(_world_vocab_path())  # cached per process
        return self._table

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return list(self._fast.encode(text))
        if self._trie is None:
            self._trie = _ByteTrie(self.table)
        return self._trie.encode(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text (one call into the Rust tokenizer for many short documents)."""
        if self._fast is not None:
            return [list(ids) for ids in self._fast.encode_batch(texts)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        table = self.table
        return b"".join(table.get(i, b"\xef\xbf\xbd") if i != 0 else b"" for i in _ids(ids)).decode(
            "utf-8", errors="replace"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"type": "world", "vocab": WORLD_VOCAB_FILE}

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i, token in self.table.items():
            lengths[i] = len(token)
        return lengths

    def __repr__(self) -> str:
        return f"WorldTokenizer(vocab_size={self.vocab_size}, backend={self.backend!r})"


# ------------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------------


def build_tokenizer(name: str, texts: Iterable[str] | None = None) -> Tokenizer:
    """A tokenizer by name; `char` needs `texts` (an iterable of strings) to build its vocabulary."""
    if name == "byte":
        return ByteTokenizer()
    if name == "world":
        return WorldTokenizer()
    if name == "char":
        if texts is None:
            raise DataError("char tokenizer: needs the training text to build its vocabulary")
        return CharTokenizer.from_text(texts)
    raise DataError(f"unknown tokenizer {name!r}: expected byte, char or world")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer saved with `to_dict()` (e.g. from a checkpoint)."""
    if not isinstance(d, dict) or "type" not in d:
        raise DataError(f"not a saved tokenizer: {str(d)[:80]!r}")
    kind = d["type"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "world":
        return WorldTokenizer()
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars:
            raise DataError("saved char tokenizer has no 'chars'")
        return CharTokenizer(chars)
    raise DataError(f"unknown saved tokenizer type {kind!r}")
