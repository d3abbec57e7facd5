"""Read RWKV-LM's binidx token files (Megatron's MMapIndexedDataset format).

A dataset is a pair `<prefix>.bin` (the token ids of all documents, back to back) and `<prefix>.idx`::

    magic     9 bytes  b"MMIDIDX\\x00\\x00"
    version   <Q       1
    dtype     <B       code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6/7 float64, 8 uint16
    n_seqs    <Q       number of documents
    n_docs    <Q       length of the doc_idx array
    sizes     int32[n_seqs]    tokens per document
    pointers  int64[n_seqs]    byte offset of each document in .bin
    doc_idx   int64[n_docs]

RWKV-LM trains on the concatenation of all documents (World-tokenised, uint16, documents ending with
token 0), which is exactly what `BinIdx.tokens()` returns.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kaggletrain.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
DTYPES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64, 8: np.uint16,
}
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8


def binidx_paths(source: str | Path) -> tuple[Path, Path] | None:
    """(bin, idx) if `source` names a binidx dataset by prefix, .bin or .idx; else None."""
    p = Path(source)
    if p.suffix in (".bin", ".idx"):
        prefix = p.with_suffix("")
    else:
        prefix = p
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    if p.suffix in (".bin", ".idx") or (bin_path.is_file() and idx_path.is_file()):
        return bin_path, idx_path
    return None


@dataclass
class BinIdx:
    bin_path: Path
    idx_path: Path
    dtype: np.dtype
    sizes: np.ndarray     # int32 [n_seqs]
    pointers: np.ndarray  # int64 [n_seqs], byte offsets into .bin

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    @property
    def contiguous(self) -> bool:
        """True when documents lie back to back from offset 0 (what make_data.py writes)."""
        expected = np.concatenate([[0], np.cumsum(self.sizes.astype(np.int64))[:-1]]) * self.dtype.itemsize
        return bool(np.array_equal(expected, self.pointers))

    def tokens(self) -> np.ndarray:
        """All documents concatenated, as a read-only memmap when possible (no copy)."""
        n = self.num_tokens
        if n == 0:
            raise DataError(f"{self.bin_path}: the binidx dataset has no tokens")
        if self.contiguous:
            return np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(n,))
        whole = np.memmap(self.bin_path, dtype=np.uint8, mode="r")
        parts = [
            whole[p : p + s * self.dtype.itemsize].view(self.dtype)
            for p, s in zip(self.pointers.tolist(), self.sizes.tolist())
        ]
        return np.concatenate(parts)


def read_binidx(source: str | Path) -> BinIdx:
    """Open and validate a binidx dataset; every problem is one DataError naming the file."""
    paths = binidx_paths(source)
    if paths is None:
        raise DataError(f"{source}: not a binidx dataset (expected {source}.bin and {source}.idx)")
    bin_path, idx_path = paths
    for p in (idx_path, bin_path):
        if not p.is_file():
            raise DataError(f"{p}: file not found (a binidx dataset needs both .bin and .idx)")
    raw = idx_path.read_bytes()
    if len(raw) < _HEADER:
        raise DataError(f"{idx_path}: too short for a binidx index header ({len(raw)} bytes)")
    if raw[: len(MAGIC)] != MAGIC:
        raise DataError(f"{idx_path}: not a binidx index (bad magic {raw[:len(MAGIC)]!r}, expected {MAGIC!r})")
    off = len(MAGIC)
    (version,) = struct.unpack_from("<Q", raw, off)
    if version != 1:
        raise DataError(f"{idx_path}: unsupported binidx version {version} (expected 1)")
    (code,) = struct.unpack_from("<B", raw, off + 8)
    if code not in DTYPES:
        raise DataError(f"{idx_path}: unknown binidx dtype code {code}")
    dtype = np.dtype(DTYPES[code])
    if dtype.kind == "f":
        raise DataError(f"{idx_path}: the dataset holds floating-point values (dtype code {code}), not token ids")
    n_seqs, n_docs = struct.unpack_from("<QQ", raw, off + 9)
    expected = _HEADER + n_seqs * 4 + n_seqs * 8 + n_docs * 8
    if len(raw) != expected:
        raise DataError(
            f"{idx_path}: index is {len(raw)} bytes but its header describes {expected} "
            f"({n_seqs} sequences): truncated or corrupted"
        )
    sizes = np.frombuffer(raw, dtype="<i4", count=n_seqs, offset=_HEADER)
    pointers = np.frombuffer(raw, dtype="<i8", count=n_seqs, offset=_HEADER + 4 * n_seqs)
    if n_seqs and (sizes.min() < 0 or pointers.min() < 0):
        raise DataError(f"{idx_path}: negative document size or offset: corrupted index")
    bin_size = bin_path.stat().st_size
    if n_seqs:
        end = int((pointers.astype(np.int64) + sizes.astype(np.int64) * dtype.itemsize).max())
        if end > bin_size:
            raise DataError(f"{bin_path}: {bin_size} bytes, but the index points up to byte {end}: truncated")
    return BinIdx(bin_path, idx_path, dtype, sizes.astype(np.int32), pointers.astype(np.int64))
