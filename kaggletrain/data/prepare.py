"""`prepare_data`: from `cfg.data` to memory-mapped train/validation token arrays and a tokenizer.

    source(s) --resolve--> files --read--> text pieces --tokenizer--> token cache (memmap)
              --max_tokens--> split: first (1 - val_fraction) trains, the rest validates

Every torchrun rank may call it at once: the cache lock makes one of them tokenise while the others
wait, then all map the same files.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kaggletrain.config import DataConfig, document_end_problem, resolve_cache_dir
from kaggletrain.data import builtin
from kaggletrain.data.binidx import read_binidx
from kaggletrain.data.cache import TokenCache, atomic_write_bytes, cache_key, max_token_id, token_dtype
from kaggletrain.data.sources import (
    PIECE_CHARS,
    ReadOptions,
    ResolvedSource,
    SourceFile,
    iter_pieces,
    resolve_source,
)
from kaggletrain.data.tokenizers import CharTokenizer, Tokenizer, build_tokenizer, tokenizer_from_dict
from kaggletrain.errors import DataError

PROGRESS_MIN_BYTES = 8 << 20  # show a progress bar only when tokenising at least this much text
END_OF_DOCUMENT = 0  # the World token that ends a document (RWKV-LM's make_data.py, binidx data)


@dataclass
class PreparedData:
    """Token streams ready for WindowSampler / eval_batches."""

    train_tokens: np.ndarray            # 1-D memmap, uint16 or uint32
    val_tokens: np.ndarray | None       # None when validation is off (val_fraction 0, no val_source)
    tokenizer: Tokenizer
    source: str                         # data.source as configured
    num_tokens: int                     # tokens of the source used (after max_tokens), before the split
    max_token_id: int                   # largest id in train and validation (for check_vocab)
    cache_files: list[Path] = field(default_factory=list)
    cache_hit: bool = False

    def check_vocab(self, vocab_size: int) -> None:
        """Raise DataError if a token id does not fit a model with `vocab_size` embeddings."""
        if self.max_token_id >= vocab_size:
            raise DataError(
                f"{self.source}: the data contains token id {self.max_token_id}, outside the model "
                f"vocabulary (model.vocab_size={vocab_size}); use a matching data.tokenizer or vocab_size"
            )

    def summary(self) -> str:
        val = f"{len(self.val_tokens):,}" if self.val_tokens is not None else "none"
        return (
            f"{self.source}: {self.num_tokens:,} tokens ({self.tokenizer.name}, vocab "
            f"{self.tokenizer.vocab_size}); train {len(self.train_tokens):,}, validation {val}"
            f"{' (cached)' if self.cache_hit else ''}"
        )


def check_vocab(tokens: np.ndarray, vocab_size: int, source: str = "data") -> None:
    """Raise DataError naming the first token id >= vocab_size (the trainer calls this)."""
    top = max_token_id(tokens)
    if top >= vocab_size:
        pos = int(np.argmax(np.asarray(tokens) >= vocab_size))
        raise DataError(
            f"{source}: token id {top} (first bad id at position {pos}) is outside the model vocabulary "
            f"(vocab_size={vocab_size}); use a matching data.tokenizer or model.vocab_size"
        )


def prepare_data(data: DataConfig, seq_len: int, progress: bool = False, console: Any = None) -> PreparedData:
    """Resolve, tokenise (cached), cap, split and check the data of a run."""
    cache = TokenCache(resolve_cache_dir(data.cache_dir))
    opts = ReadOptions(data.encoding, data.text_field, data.text_column, data.separator, _end_documents(data))
    ui = _Progress(progress, console)

    train_src = _resolve(data.source or "builtin", data.format, "data.source", cache, ui)
    val_src = _resolve(data.val_source, data.format, "data.val_source", cache, ui) if data.val_source else None
    tokenizer = _tokenizer_for(data.tokenizer, [s for s in (train_src, val_src) if s], opts, cache, ui)

    tokens, meta, hit = _tokens_for(train_src, tokenizer, opts, cache, ui)
    max_id = int(meta["max_token_id"])
    files = [cache.paths(meta["key"])[0]] if meta.get("cached_tokens") else []
    if data.max_tokens is not None:
        tokens = tokens[: data.max_tokens]
    n = len(tokens)
    spec = data.source or "builtin"

    if val_src is not None:
        train, (val, vmeta, vhit) = tokens, _tokens_for(val_src, tokenizer, opts, cache, ui)
        max_id = max(max_id, int(vmeta["max_token_id"]))
        hit = hit and vhit
        if vmeta.get("cached_tokens"):
            files.append(cache.paths(vmeta["key"])[0])
    elif data.val_fraction > 0:
        n_train = int(n * (1.0 - data.val_fraction))
        train, val = tokens[:n_train], tokens[n_train:]
    else:
        train, val = tokens, None

    need = seq_len + 1
    if len(train) < need:
        split = f" after holding out data.val_fraction={data.val_fraction}" if val is not None and val_src is None else ""
        raise DataError(
            f"{spec}: {len(train)} training tokens{split}, but one sequence needs train.seq_len + 1 = {need}; "
            "use more data or a smaller train.seq_len"
        )
    if val is not None and len(val) < need:
        where = data.val_source or spec
        raise DataError(
            f"{where}: {len(val)} validation tokens, but one sequence needs train.seq_len + 1 = {need}; "
            "use a larger data.val_fraction, a smaller train.seq_len, or data.val_fraction=0"
        )
    return PreparedData(train, val, tokenizer, spec, n, max_id, files, hit)


# ------------------------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar over bytes, shown only when asked for and the input is large."""

    def __init__(self, enabled: bool, console: Any):
        self.enabled = enabled
        self.console = console

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        from rich.console import Console

        with (self.console or Console(stderr=True)).status(text):
            yield

    @contextlib.contextmanager
    def bar(self, text: str, total: int) -> Iterator[Any]:
        if not self.enabled or total < PROGRESS_MIN_BYTES:
            yield lambda n: None
            return
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=self.console, transient=True) as p:
            task = p.add_task(text, total=total)
            yield lambda n: p.advance(task, n)


def _resolve(spec: str, fmt: str, key: str, cache: TokenCache, ui: _Progress) -> ResolvedSource:
    src = resolve_source(spec, fmt, key)
    if src.kind == "builtin":
        src = _builtin_source(spec, cache, ui)
    return src


def _builtin_source(spec: str, cache: TokenCache, ui: _Progress) -> ResolvedSource:
    """The stdlib-docstring corpus, extracted once into the cache as a text file."""
    max_bytes = builtin.DEFAULT_MAX_BYTES  # read at call time (tests shrink it)
    key = "builtin-" + builtin.corpus_key(max_bytes)
    path = cache.root / f"{key}.txt"
    if not path.is_file():
        with cache.lock(key):
            if not path.is_file():
                with ui.status("Extracting the built-in corpus (standard-library docstrings, once)..."):
                    text = builtin.build_corpus(max_bytes)
                atomic_write_bytes(path, text.encode("utf-8"))
    # Keyed by the corpus's content key, not the cached file's mtime.
    return ResolvedSource(spec, "text", [SourceFile(path, "txt")], single_file=True, content_key=key)


def _end_documents(data: DataConfig) -> bool:
    """data.document_end resolved: whether each document ends with the end-of-document token (World's 0)."""
    if (problem := document_end_problem(data)) is not None:  # (a DataConfig not read through load_config)
        raise DataError(f"data.document_end: {problem}")
    return data.document_end == "eos" or (data.document_end == "auto" and data.tokenizer == "world")


def _read_options_key(opts: ReadOptions, src: ResolvedSource) -> dict[str, Any]:
    formats = {f.format for f in src.files}
    out: dict[str, Any] = {"encoding": opts.encoding}
    if opts.end_documents:
        out["document_end"] = "eos"
    else:
        out["separator"] = opts.separator
    if "jsonl" in formats:
        out["text_field"] = opts.text_field
    if "csv" in formats:
        out["text_column"] = opts.text_column
    return out


def _tokenizer_for(name: str, sources: list[ResolvedSource], opts: ReadOptions, cache: TokenCache,
                   ui: _Progress) -> Tokenizer:
    if name != "char":
        return build_tokenizer(name)
    # The char vocabulary is every character of the text the run reads (train and validation), so
    # validation never meets an unknown character. It is cached like tokens, keyed by the sources.
    for s in sources:
        if s.kind == "binidx":
            raise DataError(f"{s.spec}: binidx data holds token ids; the char tokenizer needs text (use world or byte)")
    key = "chars-" + cache_key([s.identity() for s in sources], [_read_options_key(opts, s) for s in sources])
    meta = cache.read_meta(key)
    if meta is None:
        with cache.lock(key):
            meta = cache.read_meta(key)
            if meta is None:
                seen: set[str] = set()
                for s in sources:
                    with ui.bar("Building the character vocabulary", s.total_bytes) as advance:
                        for piece, nbytes in iter_pieces(s, opts):
                            seen.update(piece)
                            advance(nbytes)
                if not seen:
                    raise DataError(f"{sources[0].spec}: no text found")
                meta = {"tokenizer": CharTokenizer(seen).to_dict()}
                cache.write_meta(key, meta)
    return tokenizer_from_dict(meta["tokenizer"])


def _tokens_for(src: ResolvedSource, tokenizer: Tokenizer, opts: ReadOptions, cache: TokenCache,
                ui: _Progress) -> tuple[np.ndarray, dict[str, Any], bool]:
    if src.kind == "binidx":
        return _binidx_tokens(src, tokenizer, cache)
    key = cache_key("tokens", src.identity(), tokenizer.to_dict(), _read_options_key(opts, src))
    dtype = token_dtype(tokenizer.vocab_size)

    def fill(writer) -> dict[str, Any]:
        buf: list[str | None] = []  # text pieces; None: a document ends here
        size = 0
        with ui.bar(f"Tokenising {src.spec} ({tokenizer.name})", src.total_bytes) as advance:
            for piece, nbytes in iter_pieces(src, opts):
                if piece or piece is None:
                    buf.append(piece)
                    size += len(piece or "")
                # Encode in ~1 MB batches: few tokenizer calls, bounded memory.
                if size >= PIECE_CHARS:
                    writer.append(_encode(tokenizer, buf))
                    buf, size = [], 0
                advance(nbytes)
            if buf:
                writer.append(_encode(tokenizer, buf))
        return {"source": src.spec, "tokenizer": tokenizer.to_dict(), "key": key, "cached_tokens": True,
                "empty_message": f"{src.spec}: no text found (empty files or documents)"}

    tokens, meta, hit = cache.get_or_build(key, dtype, fill)
    return tokens, meta, hit


def _encode(tokenizer: Tokenizer, pieces: list[str | None]) -> np.ndarray:
    """Token ids of text pieces, each None becoming END_OF_DOCUMENT. Documents are encoded one by one, as
    RWKV-LM does, so no token spans two of them."""
    if None not in pieces:
        return tokenizer.encode_array("".join(pieces))  # type: ignore[arg-type]
    texts, cur = [], []
    for p in pieces:
        if p is None:
            texts.append("".join(cur))
            cur = []
        else:
            cur.append(p)
    texts.append("".join(cur))  # the start of a document that goes on in the next batch (or "")
    ids = tokenizer.encode_batch(texts)  # type: ignore[attr-defined]  (world only: see _end_documents)
    out: list[int] = []
    for doc in ids[:-1]:
        out.extend(doc)
        out.append(END_OF_DOCUMENT)
    out.extend(ids[-1])
    return np.asarray(out, dtype=np.uint32)


def _binidx_tokens(src: ResolvedSource, tokenizer: Tokenizer, cache: TokenCache) -> tuple[np.ndarray, dict[str, Any], bool]:
    """binidx tokens: the .bin itself when it is contiguous uint16, else a converted cache entry."""
    bi = read_binidx(src.binidx[0])  # type: ignore[index]
    key = cache_key("binidx", src.identity())
    if bi.dtype == np.uint16 and bi.contiguous:
        tokens = bi.tokens()
        meta = cache.read_meta(key)
        hit = meta is not None
        if meta is None:  # one pass for the largest id, remembered in the cache
            meta = {"source": src.spec, "max_token_id": max_token_id(tokens), "key": key}
            cache.write_meta(key, meta)
    else:
        def fill(writer) -> dict[str, Any]:
            raw = bi.tokens()
            if raw.dtype.kind == "i" and len(raw) and int(raw.min()) < 0:
                raise DataError(f"{bi.bin_path}: negative token ids: not a token dataset, or corrupted")
            for start in range(0, len(raw), 1 << 24):
                writer.append(raw[start : start + (1 << 24)])
            return {"source": src.spec, "key": key, "cached_tokens": True,
                    "empty_message": f"{bi.bin_path}: the binidx dataset has no tokens"}

        dtype = np.dtype(np.uint16) if bi.dtype.itemsize <= 2 else np.dtype(np.uint32)
        tokens, meta, hit = cache.get_or_build(key, dtype, fill)
    if int(meta["max_token_id"]) >= tokenizer.vocab_size:
        raise DataError(
            f"{bi.bin_path}: token id {meta['max_token_id']} is outside the {tokenizer.name} tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}); is data.tokenizer right (RWKV-LM binidx data is World)?"
        )
    return tokens, meta, hit
