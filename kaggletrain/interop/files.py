"""Low-level checkpoint file I/O: atomic writes and safe readers for .pth and .safetensors.

Every reader turns the ways a file can be wrong (missing, truncated, a pickle that wants to run code, not a
checkpoint at all) into `CheckpointError` with a message saying what was found, so callers never have to
interpret torch/zipfile/safetensors exceptions themselves.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from kaggletrain.errors import CheckpointError
from kaggletrain.train.out_of_memory import is_out_of_memory, reading

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80  # first byte of a pickle (protocol >= 2): torch's legacy, pre-zip format


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename.

    Readers never see a half-written file, and a crash leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def describe_file(path: Path) -> str:
    """A few words on what a file that is not a checkpoint looks like (for error messages)."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with open(path, "rb") as f:
        head = f.read(64)
    text = head.decode("utf-8", errors="ignore")  # a multi-byte character may be cut at byte 64
    if b"\x00" not in head and text and all(c.isprintable() or c.isspace() for c in text):
        return f"a text file starting with {text[:40]!r}"
    return f"a {size}-byte binary file starting with bytes {head[:8].hex(' ')}"


def sniff(path: Path) -> str:
    """'zip' (torch .pth), 'pickle' (legacy torch), 'safetensors' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    # safetensors first: u64 little-endian header length, then a JSON object. Its first byte can be
    # 0x80 (a header of 128 + 256k bytes), which would otherwise look like a pickle protocol marker.
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= path.stat().st_size - 8:
            return "safetensors"
    if head[:1] == bytes([PICKLE_PROTO]):
        return "pickle"
    return "unknown"


def read_torch_file(path: Path) -> dict:
    """torch.load with weights_only=True (never runs pickled code), mapped to the CPU.

    Returns whatever dict the file holds; errors become CheckpointError.
    """
    kind = sniff(path)
    if kind not in ("zip", "pickle"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint; found {describe_file(path)}")
    try:
        # mmap keeps peak memory at one copy when the caller converts dtypes (zip format only).
        obj = torch.load(path, weights_only=True, map_location="cpu", mmap=(kind == "zip"))
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/... depending on damage
        if is_out_of_memory(e):  # a large official checkpoint on a small machine: not the file's fault
            raise reading(path, e) from None
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg or "Unsupported operand" in msg:
            first = msg.strip().splitlines()[0][:200]
            raise CheckpointError(
                f"{path}: refusing to load: the file contains pickled Python objects, not just tensors "
                f"(weights_only=True rejected it: {first})") from None
        if "central directory" in msg or "zip archive" in msg or isinstance(e, EOFError) or "truncated" in msg:
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch file ({msg.splitlines()[0][:160]})") from None
        raise CheckpointError(f"{path}: cannot read PyTorch file: {type(e).__name__}: {msg[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), found a {type(obj).__name__}")
    return obj


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a .safetensors file and its string metadata."""
    from safetensors import SafetensorError, safe_open

    if sniff(path) != "safetensors":
        raise CheckpointError(f"{path}: not a safetensors file; found {describe_file(path)}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            raise reading(path, e) from None
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None
    return tensors, meta


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage; copy only those (a full copy of a 7B model would not fit).
    owners: dict[int, int] = {}
    for t in tensors.values():
        ptr = t.untyped_storage().data_ptr()
        owners[ptr] = owners.get(ptr, 0) + 1
    flat = {}
    for k, t in tensors.items():
        t = t.detach()
        flat[k] = t.clone() if owners[t.untyped_storage().data_ptr()] > 1 else t.contiguous()
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def write_torch(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    # clone(): torch.save writes whole storages, so a slice would drag its parent tensor along.
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        torch.save(plain, tmp)
