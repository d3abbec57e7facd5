"""The token cache: tokenise once, memory-map forever.

An entry is `<key>.tokens` (raw little-endian uint16 or uint32 ids, one flat stream) plus
`<key>.json` (dtype, token count, largest id, what it was made from). The key hashes the source files'
identity (path, size, mtime), the tokenizer and the read options (encoding, fields, separator or
end-of-document tokens), so editing a file or switching tokenizer makes a new entry while re-running the
same config reuses the old one.

Concurrency and crashes: an entry is built under a `filelock` lock (torchrun ranks or parallel runs
sharing one cache wait for the first builder), written to a temporary name and renamed into place;
the .json is renamed last and marks the entry complete. A killed build leaves only temporary files.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kaggletrain.errors import DataError

CACHE_FORMAT = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65536, e.g. World), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def max_token_id(tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """Largest id in a (possibly huge, memory-mapped) token array, read in chunks; -1 if empty."""
    best = -1
    for start in range(0, len(tokens), chunk):
        best = max(best, int(np.max(tokens[start : start + chunk])))
    return best


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class TokenWriter:
    """Appends token arrays to a temporary file; tracks the count and the largest id."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.dtype = dtype
        self.count = 0
        self.max_id = -1
        self._f = open(path, "wb")

    def append(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        ids = np.asarray(ids)
        top = int(ids.max())
        if top > np.iinfo(self.dtype).max or (ids.dtype.kind == "i" and int(ids.min()) < 0):
            raise DataError(f"token ids outside the range of {self.dtype} (max {top})")
        self._f.write(ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self.count += len(ids)
        self.max_id = max(self.max_id, top)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class TokenCache:
    """Entries under one directory; see the module docstring."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def ensure_dir(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{self.root}: cannot create the token cache ({e.strerror or e}); set data.cache_dir") from None
        if not os.access(self.root, os.W_OK):
            raise DataError(f"{self.root}: the token cache is not writable; set data.cache_dir")

    def lock(self, key: str):
        from filelock import FileLock

        self.ensure_dir()
        return FileLock(str(self.root / f"{key}.lock"))

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.tokens", self.root / f"{key}.json"

    def read_meta(self, key: str) -> dict[str, Any] | None:
        meta_path = self.paths(key)[1]
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT else None

    def write_meta(self, key: str, meta: dict[str, Any]) -> None:
        self.ensure_dir()
        atomic_write_bytes(self.paths(key)[1], json.dumps({"format": CACHE_FORMAT, **meta}, indent=1).encode())

    def load(self, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The entry's tokens (read-only memmap) and meta, or None if absent or incomplete."""
        meta = self.read_meta(key)
        tokens_path = self.paths(key)[0]
        if meta is None or "num_tokens" not in meta:
            return None
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        n = int(meta["num_tokens"])
        try:
            if tokens_path.stat().st_size != n * dtype.itemsize or n == 0:
                return None
        except OSError:
            return None
        return np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n,)), meta

    def get_or_build(
        self, key: str, dtype: np.dtype, fill: Callable[[TokenWriter], dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any], bool]:
        """Load entry `key`, or build it with `fill(writer) -> extra meta`. Returns (tokens, meta, hit)."""
        hit = self.load(key)
        if hit is not None:
            return (*hit, True)
        with self.lock(key):
            hit = self.load(key)  # another process may have built it while we waited
            if hit is not None:
                return (*hit, True)
            tokens_path, _ = self.paths(key)
            tmp = tokens_path.with_name(f".{tokens_path.name}.{uuid.uuid4().hex[:8]}.tmp")
            writer = TokenWriter(tmp, dtype)
            try:
                extra = fill(writer)
                writer.close()
                if writer.count == 0:
                    raise DataError(extra.get("empty_message", "no tokens"))
                os.replace(tmp, tokens_path)
            except OSError as e:
                raise DataError(f"{self.root}: cannot write the token cache ({e.strerror or e}); free disk "
                                f"space or set data.cache_dir") from None
            finally:
                if not writer._f.closed:
                    writer._f.close()
                if tmp.exists():
                    tmp.unlink()
            extra.pop("empty_message", None)
            meta = {"dtype": dtype.name, "num_tokens": writer.count, "max_token_id": writer.max_id, **extra}
            self.write_meta(key, meta)
        loaded = self.load(key)
        assert loaded is not None
        return (*loaded, False)
