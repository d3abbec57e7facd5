"""The kaggletrain sources, packed for a notebook to carry.

A pushed kernel uploads exactly one file, its notebook, so the package travels inside it as a base64 zip
(about a third larger than the zip; the whole notebook must stay under 1 MB). The zip is deterministic (sorted
names, fixed timestamps): the same tree always gives the same notebook, which keeps pushes diffable.
Only source-like files go in, so a stray kaggle.json or checkpoint next to the code can never ride along.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

# What each shipped package may contribute; everything else (caches, checkpoints, notebooks, JSON) stays home.
_SUFFIXES = {
    "kaggletrain": {".py", ".typed", ".cpp"},  # .cpp: the CPU decode kernels (infer/decode_cpu.cpp)
    "rwkv_cuda": {".py", ".cu", ".cpp", ".h", ".cuh"},
}
_ASSET_DIR = ("data", "assets")  # kaggletrain/data/assets: built-in corpus and tokenizer files
_NEVER = {"kaggle.json", "access_token", "access_token.txt", "credentials.json", ".env"}
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Bundle:
    b64: str  # base64 of the zip
    sha256: str  # of the zip bytes; the notebook checks it before unpacking
    files: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.b64)


def _package_dir(name: str) -> Path | None:
    # find_spec locates a package without executing it (rwkv_cuda must not start compiling here).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _wanted(pkg: str, rel: Path) -> bool:
    if "__pycache__" in rel.parts or rel.name in _NEVER or rel.name.startswith("."):
        return False
    if pkg == "kaggletrain" and rel.parts[:2] == _ASSET_DIR:
        return True
    return rel.suffix in _SUFFIXES[pkg]


def collect_files() -> list[tuple[str, Path]]:
    """(archive name, path) for every shipped file, sorted by archive name."""
    out = []
    for pkg in _SUFFIXES:
        root = _package_dir(pkg)
        if root is None:
            continue
        for path in root.rglob("*"):
            rel = path.relative_to(root)
            if path.is_file() and _wanted(pkg, rel):
                out.append((f"{pkg}/{rel.as_posix()}", path))
    return sorted(out)


def build_bundle() -> Bundle:
    buf = io.BytesIO()
    files = collect_files()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    raw = buf.getvalue()
    return Bundle(base64.b64encode(raw).decode("ascii"), hashlib.sha256(raw).hexdigest(),
                  tuple(n for n, _ in files))
