"""Resolve `data.source` into files and read them as a stream of text pieces.

Kinds of source:
  * `builtin`                       the standard-library docstring corpus (materialised in the cache)
  * a file                          format by extension: .jsonl/.ndjson, .csv, .bin/.idx, else text
  * a folder                        every non-hidden file below it, sorted by relative path
  * a glob (`data/**/*.txt`)        matching files, sorted
  * a binidx prefix                 `<prefix>.bin` + `<prefix>.idx`

Text is streamed in pieces of at most a few MB cut at line ends, so a 5 GB .txt file never sits in
memory, and the piece boundaries (hence World tokenisation) depend only on the content. Every problem
is one DataError line naming the file (and line number where there is one).
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kaggletrain.data.binidx import binidx_paths
from kaggletrain.errors import DataError

PIECE_CHARS = 1 << 20   # target size of one text piece
READ_BYTES = 1 << 20    # raw read size
TEXT_FORMATS = ("txt", "jsonl", "csv")
_EXT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_GLOB_CHARS = set("*?[")
_SURROGATE = re.compile("[\ud800-\udfff]")  # after json.loads, only unpaired ones remain


@dataclass(frozen=True)
class SourceFile:
    path: Path
    format: str  # txt | jsonl | csv


@dataclass
class ResolvedSource:
    """What a `data.source` string refers to."""

    spec: str                       # as written in the config
    kind: str                       # builtin | binidx | text
    files: list[SourceFile] = field(default_factory=list)
    binidx: tuple[Path, Path] | None = None
    single_file: bool = False       # a single named file: emptiness is an error, not a skip
    content_key: str | None = None  # set when the content has its own stable key (builtin corpus)

    def identity(self) -> list[list]:
        """What the cache key hashes: each file's absolute path, size and mtime."""
        if self.content_key:
            return [["content", self.content_key]]
        paths = [f.path for f in self.files] if self.kind == "text" else list(self.binidx or ())
        out = []
        for p in paths:
            st = p.stat()
            out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        if self.kind == "text":
            for row, f in zip(out, self.files):
                row.append(f.format)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)


def resolve_source(spec: str, fmt: str = "auto", key: str = "data.source") -> ResolvedSource:
    """Turn a source string into files (not read yet). Raises DataError for missing/empty sources."""
    spec = str(spec)
    if spec.strip().lower() == "builtin":
        if fmt not in ("auto", "txt"):
            raise DataError(f"{key}: the builtin corpus is plain text; data.format {fmt!r} does not apply")
        return ResolvedSource(spec, "builtin")
    expanded = os.path.expanduser(spec)
    path = Path(expanded)

    if fmt == "binidx" or (fmt == "auto" and not path.is_dir() and not (_GLOB_CHARS & set(spec))
                           and (path.suffix in (".bin", ".idx") or (not path.exists() and binidx_paths(path)))):
        paths = binidx_paths(path)
        if paths is None:
            raise DataError(f"{spec}: no binidx dataset here (expected {spec}.bin and {spec}.idx) ({key})")
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p}: file not found (a binidx dataset needs both .bin and .idx) ({key})")
        return ResolvedSource(spec, "binidx", binidx=paths)

    if _GLOB_CHARS & set(spec) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{spec}: no files match this pattern ({key})")
        return ResolvedSource(spec, "text", [SourceFile(p, _file_format(p, fmt)) for p in matches])

    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise DataError(f"{spec}: the folder has no (non-hidden) files ({key})")
        return ResolvedSource(spec, "text", [SourceFile(p, _file_format(p, fmt)) for p in files])

    if path.is_file():
        return ResolvedSource(spec, "text", [SourceFile(path, _file_format(path, fmt))], single_file=True)
    if path.exists():
        raise DataError(f"{spec}: not a regular file or folder ({key})")
    raise DataError(f"{spec}: file not found ({key})")


def _folder_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _file_format(path: Path, fmt: str) -> str:
    if fmt in TEXT_FORMATS:
        return fmt
    if path.suffix.lower() in (".bin", ".idx"):
        raise DataError(f"{path}: binidx files must be given on their own as data.source (prefix, .bin or .idx)")
    return _EXT_FORMATS.get(path.suffix.lower(), "txt")


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadOptions:
    encoding: str = "utf-8"
    text_field: str = "text"
    text_column: str = "text"
    separator: str = "\n\n"
    end_documents: bool = False  # mark each document's end (for the tokenizer's end token) instead of separator


def _codec(opts: ReadOptions) -> str:
    """The codec to decode with: UTF-8 files written on Windows often start with a BOM; drop it."""
    return "utf-8-sig" if codecs.lookup(opts.encoding).name == "utf-8" else opts.encoding


def _is_wide(encoding: str) -> bool:
    """UTF-16/32 text is full of NUL bytes, so the NUL sniff must not apply to it."""
    name = codecs.lookup(encoding).name
    return name.startswith(("utf-16", "utf-32"))


def _sniff(path: Path, opts: ReadOptions, single: bool) -> bool:
    """Reject binary files; return False for an empty file (skipped unless it is the only file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        if single:
            raise DataError(f"{path}: the file is empty")
        return False
    nul = -1 if _is_wide(opts.encoding) else head.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: looks like a binary file (NUL byte at offset {nul}), not text")
    return True


def _decode_error(path: Path, opts: ReadOptions) -> DataError:
    """Where the first undecodable byte of `path` is, from a fresh scan: the text readers decode ahead in
    blocks (TextIOWrapper by 8 KB), so their line count and the error's block-relative offset are not it."""
    new_decoder = codecs.getincrementaldecoder(_codec(opts))
    decoder = new_decoder(errors="strict")
    offset = lines = 0  # raw bytes read; line breaks decoded
    with open(path, "rb") as f:
        while True:
            raw = f.read(READ_BYTES)
            state = decoder.getstate()  # its first item: bytes held back from the previous read
            try:
                lines += decoder.decode(raw, final=not raw).count("\n")
            except UnicodeDecodeError as e:
                data = state[0] + raw  # e.object is this, or a suffix of it (utf-8-sig drops a BOM)
                bad = len(data) - len(e.object) + e.start  # in data
                if bad > len(state[0]):  # the good bytes of this read before it: count their line breaks
                    good = new_decoder(errors="strict")
                    good.setstate(state)
                    lines += good.decode(raw[: bad - len(state[0])]).count("\n")
                return DataError(
                    f"{path}: line {lines + 1}: not valid {opts.encoding} text (byte 0x{data[bad:bad + 1].hex()} at "
                    f"offset {offset - len(state[0]) + bad}): a binary file, or text in another encoding (set "
                    "data.encoding, e.g. latin-1)"
                )
            if not raw:
                break
            offset += len(raw)
    return DataError(f"{path}: not valid {opts.encoding} text (it changed while being read?)")


def read_txt(path: Path, opts: ReadOptions) -> Iterator[tuple[str, int]]:
    """(piece, raw bytes consumed) for one text file: pieces end at a line break where possible."""
    decoder = codecs.getincrementaldecoder(_codec(opts))(errors="strict")
    carry = ""
    offset = 0  # raw bytes read so far
    with open(path, "rb") as f:
        while True:
            raw = f.read(READ_BYTES)
            final = not raw
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError:
                raise _decode_error(path, opts) from None
            if "\x00" in text:
                raise DataError(f"{path}: looks like a binary file (NUL character near byte {offset}), not text")
            offset += len(raw)
            text = carry + text
            if final:
                if text:
                    yield text, 0
                return
            cut = text.rfind("\n")
            if cut < 0 and len(text) < 8 * PIECE_CHARS:
                carry = text  # no line break yet: wait for one (bounded, see above)
                yield "", len(raw)
                continue
            cut = cut + 1 if cut >= 0 else len(text)
            carry = text[cut:]
            yield text[:cut], len(raw)


def _text_stream(path: Path, opts: ReadOptions) -> tuple[io.TextIOWrapper, io.BufferedReader]:
    raw = open(path, "rb")
    return io.TextIOWrapper(raw, encoding=_codec(opts), errors="strict", newline=""), raw


def read_jsonl(path: Path, opts: ReadOptions) -> Iterator[tuple[str, int]]:
    """One document per line: the `text_field` of each JSON object. Blank lines are skipped."""
    text_io, raw = _text_stream(path, opts)
    last = 0
    lineno = 0
    first_bad, bad_count = "", 0  # unpaired surrogates replaced
    with text_io:
        try:
            for lineno, line in enumerate(text_io, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
                if opts.text_field not in obj:
                    fields = ", ".join(map(str, list(obj)[:8])) or "none"
                    raise DataError(
                        f"{path}: line {lineno}: no field '{opts.text_field}' (fields: {fields}); "
                        "set data.text_field"
                    )
                value = obj[opts.text_field]
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise DataError(
                        f"{path}: line {lineno}: field '{opts.text_field}' is {type(value).__name__}, expected a string"
                    )
                # A "\ud83d" escape without its pair (a cut emoji, common in scraped data) is valid JSON but
                # not text any tokenizer can encode: keep the document, with U+FFFD in its place.
                if not value.isascii() and (m := _SURROGATE.search(value)):
                    first_bad = first_bad or f"\\u{ord(m.group()):04x} on line {lineno}"
                    value, n = _SURROGATE.subn("\ufffd", value)
                    bad_count += n
                pos = raw.tell()
                yield value, pos - last
                last = pos
        except UnicodeDecodeError:
            raise _decode_error(path, opts) from None
    if bad_count:
        warnings.warn(f"{path}: {bad_count} unpaired UTF-16 surrogate escape(s) in field '{opts.text_field}' "
                      f"(the first, {first_bad}; half of an emoji?) replaced by U+FFFD", stacklevel=2)


def read_csv(path: Path, opts: ReadOptions) -> Iterator[tuple[str, int]]:
    """One document per row: the `text_column` cell. Empty cells are skipped."""
    csv.field_size_limit(2**31 - 1)  # documents can be long; the default limit is 128 KB
    text_io, raw = _text_stream(path, opts)
    last = 0
    with text_io:
        reader = csv.reader(text_io)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the CSV file has no header row")
            if opts.text_column not in header:
                cols = ", ".join(header[:12])
                raise DataError(f"{path}: no column '{opts.text_column}' (columns: {cols}); set data.text_column")
            col = header.index(opts.text_column)
            for row in reader:
                if col < len(row) and row[col]:
                    pos = raw.tell()
                    yield row[col], pos - last
                    last = pos
        except UnicodeDecodeError:
            raise _decode_error(path, opts) from None
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None


_READERS = {"txt": read_txt, "jsonl": read_jsonl, "csv": read_csv}


def iter_pieces(src: ResolvedSource, opts: ReadOptions) -> Iterator[tuple[str | None, int]]:
    """The whole source as (text piece, raw bytes consumed), documents joined by opts.separator, or, with
    opts.end_documents, each document followed by (None, 0): its end, where the end-of-document token goes.

    A .txt file is one document; each .jsonl line and .csv row is one document. Empty files in a
    folder or glob, and empty documents, are skipped; a source with no text at all is an error (raised by
    the caller, who knows the token count).
    """
    first = True
    for f in src.files:
        if not _sniff(f.path, opts, src.single_file):
            continue
        if f.format == "txt":
            docs: Iterator[Iterator[tuple[str, int]]] = iter([read_txt(f.path, opts)])
        else:
            docs = ((item,) for item in _READERS[f.format](f.path, opts))  # type: ignore[assignment]
        for doc in docs:
            started = False
            for piece, nbytes in doc:
                if piece and not started:
                    if not first and opts.separator and not opts.end_documents:
                        yield opts.separator, 0
                    first = False
                    started = True
                yield piece, nbytes
            if started and opts.end_documents:
                yield None, 0
