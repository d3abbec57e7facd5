"""The built-in corpus: docstrings of Python's standard library.

Every Python installation carries it, so `data.source: builtin` trains with no download and no data
files. It is English technical prose (about 2 MB on CPython 3.11), enough for a tiny model to learn
words and punctuation in a minute.

Determinism: files are visited in sorted relative-path order, docstrings in source order (module,
then classes and functions depth-first), and the text is capped at `max_bytes`; the cache key covers
the Python version, the stdlib location, every file's size and mtime, and the cap.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

CORPUS_VERSION = 1
DEFAULT_MAX_BYTES = 4_000_000
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), in sorted relative-path order."""
    root = root or stdlib_dir()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def corpus_key(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """A stable hash of everything the corpus text depends on (cheap: stat calls only)."""
    root = stdlib_dir()
    h = hashlib.sha256(f"builtin-v{CORPUS_VERSION}|{sys.version}|{root}|{max_bytes}".encode())
    for p in stdlib_files(root):
        st = p.stat()
        h.update(f"|{p.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Docstrings in source order: the node's own, then its classes and functions depth-first."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc and doc.strip():
            yield doc.strip()
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child)


def build_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The corpus text: docstrings joined by blank lines, at most `max_bytes` UTF-8 bytes."""
    pieces: list[str] = []
    total = 0
    for path in stdlib_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. invalid escape sequences in old modules
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately invalid (e.g. lib2to3 test data)
        for doc in _docstrings(tree):
            n = len(doc.encode("utf-8")) + 2
            if total + n > max_bytes:
                return "\n\n".join(pieces)
            pieces.append(doc)
            total += n
    return "\n\n".join(pieces)
