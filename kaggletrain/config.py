"""The run-config schema: one source for validation, dotted overrides and the generated reference.

A run is described by one YAML file with a few top-level keys and five sections::

    name: tiny                # run name (default: the config file's name)
    out_dir: runs/tiny        # run directory (default: runs/<name>)
    model:      {...}         # kaggletrain.model.config.ModelConfig fields + init_from
    data:       {...}         # DataConfig
    train:      {...}         # TrainConfig
    checkpoint: {...}         # CheckpointConfig
    logging:    {...}         # LoggingConfig

Every key has a type, a default and a help text (dataclass field metadata); the same metadata drives
validation, the error messages and `docs/configuration.md` (`config_reference_markdown()`), so the three
cannot drift apart. The model section's keys come from `dataclasses.fields(ModelConfig)`.

Every problem raises `ConfigError` with one line naming the file (or the override) and the key path::

    configs/x.yaml: train.lr: expected a number > 0, got 'abc' (line 12)

Relative paths in a config (data.source, out_dir, ...) are relative to the working directory, as in
nanoGPT and litgpt, not to the config file.

Regenerate the reference with ``python -m kaggletrain.config > docs/configuration.md``.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kaggletrain.errors import ConfigError

SECTION_NAMES = ("model", "data", "train", "checkpoint", "logging")
TOP_LEVEL_KEYS = ("name", "out_dir") + SECTION_NAMES
DEFAULT_CACHE_DIR = "~/.cache/kaggletrain/tokens"
# Vocabulary sizes a tokenizer fixes without looking at the data (char depends on the data).
KNOWN_VOCAB_SIZES = {"byte": 256, "world": 65536}


def _f(default: Any, help: str, **constraints: Any) -> Any:
    """A schema field: default, help text and optional constraints (ge/gt/le/lt, doc_default)."""
    meta = {"help": help, **constraints}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens (see kaggletrain.data)."""

    source: str | None = _f(
        "builtin",
        "Training text: a .txt file, a folder (all non-hidden files, recursively, sorted), a glob "
        "('data/**/*.txt'), a .jsonl or .csv file, an RWKV-LM binidx prefix or its .bin/.idx file, or "
        "'builtin' (docstrings of Python's standard library: no download). null means builtin.",
    )
    format: Literal["auto", "txt", "jsonl", "csv", "binidx"] = _f(
        "auto",
        "How to read the source. auto: by extension (.jsonl, .csv, .bin/.idx or a prefix with both; "
        "anything else is plain text), per file for folders and globs.",
    )
    text_field: str = _f("text", "The JSON field holding the text in .jsonl files (one document per line).")
    text_column: str = _f("text", "The column holding the text in .csv files (one document per row).")
    tokenizer: Literal["byte", "char", "world"] = _f(
        "byte",
        "byte: UTF-8 bytes (vocab 256). char: one token per character, vocabulary built from the data "
        "and saved with the run. world: the RWKV World tokenizer (vocab 65536) used by official RWKV "
        "models; needed to fine-tune them.",
    )
    val_fraction: float = _f(
        0.1,
        "Fraction of the token stream held out for validation: the first (1 - val_fraction) trains, the "
        "last part validates. 0 disables validation. Ignored when val_source is set.",
        ge=0.0, lt=1.0,
    )
    val_source: str | None = _f(
        None, "A separate validation source (same kinds as source); then all of source trains."
    )
    cache_dir: str | None = _f(
        None,
        "Where tokenised data is cached (memory-mapped token files keyed by the source files and the "
        f"tokenizer). null: $KAGGLETRAIN_CACHE_DIR if set, else {DEFAULT_CACHE_DIR}.",
    )
    max_tokens: int | None = _f(
        None, "Use at most this many tokens of the source (before the train/validation split); null: all.",
        ge=1,
    )
    encoding: str = _f(
        "utf-8", "Text encoding of the source files (e.g. latin-1, cp1252, utf-16) for non-UTF-8 data."
    )
    separator: str = _f(
        "\n\n",
        "Text inserted between documents (files of a folder or glob, .jsonl lines, .csv rows) when "
        "document_end is separator.",
    )
    document_end: Literal["auto", "eos", "separator"] = _f(
        "auto",
        "How documents (a .txt file, each file of a folder or glob, each .jsonl line and .csv row) are "
        "delimited in the token stream. eos: each document is tokenised on its own and followed by token "
        "0, the World end-of-document token, as in RWKV-LM's make_data.py and binidx data (separator is not "
        "used; world tokenizer only), so the model learns where a document ends (`generate` stops there). "
        "separator: documents joined by the separator text. auto: eos with the world tokenizer, else "
        "separator. binidx data keeps its own tokens.",
    )


@dataclass
class TrainConfig:
    """Optimisation, precision and hardware."""

    seq_len: int = _f(256, "Context length in tokens of each training sequence.", ge=1)
    batch_size: int = _f(
        16,
        "Global batch: sequences per optimizer step, over all processes. Gradient accumulation = "
        "batch_size / (micro_batch_size x number of processes).",
        ge=1,
    )
    micro_batch_size: int | None = _f(
        None,
        "Sequences per process per forward/backward pass (lower it to save memory; the global batch, "
        "and so the training, stays the same). null: batch_size / number of processes (no accumulation).",
        ge=1,
    )
    max_steps: int = _f(1000, "Number of optimizer steps.", ge=1)
    lr: float = _f(6e-4, "Peak learning rate (after warm-up).", gt=0.0)
    min_lr: float | None = _f(
        None, "Final learning rate of the cosine/linear decay. null: lr / 10.", ge=0.0
    )
    warmup_steps: int = _f(100, "Linear warm-up steps from 0 to lr.", ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = _f(
        "cosine", "Decay from lr to min_lr after warm-up: cosine, linear, or constant (stays at lr)."
    )
    weight_decay: float = _f(
        0.1, "AdamW weight decay, applied to 2-D weight matrices only (official RWKV-7 groups).", ge=0.0
    )
    betas: tuple[float, float] = _f((0.9, 0.99), "AdamW (beta1, beta2); RWKV-LM uses [0.9, 0.99].", ge=0.0, lt=1.0)
    eps: float = _f(
        1e-8,
        "AdamW epsilon. The official RWKV-7 recipe uses 1e-18 (pure Adam normalisation, tuned for long "
        "bf16 pre-training of large models); 1e-8 (PyTorch's default) is the safer default here because "
        "with tiny eps, parameters whose gradients are near zero get full-size, noise-driven updates, "
        "which hurts small models, short runs and fine-tunes. Set 1e-18 to reproduce the official recipe.",
        gt=0.0,
    )
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value; 0 disables clipping.", ge=0.0)
    l2wrap: bool = _f(
        True, "RWKV's L2Wrap: a tiny extra gradient that keeps the largest logit from drifting upwards."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = _f(
        "auto",
        "auto: bf16 on GPUs with native bf16 (A100, H100, L4), fp16 with gradient scaling on older GPUs "
        "(T4), fp32 on CPU. fp16 trains with dynamic loss scaling on any device (a CPU run checks the T4's "
        "path).",
    )
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda when a GPU is visible, else cpu.")
    gradient_checkpointing: bool = _f(
        False, "Recompute block activations in the backward pass: 5-6x less activation memory; steps ~1.2x slower on GPU, ~1.35x on CPU (docs/performance.md)."
    )
    use_chunking: bool = _f(
        False,
        "Process each sequence in chunks of model.rwkv_chunk_size tokens, carrying the recurrent state "
        "between chunks (long contexts in bounded memory).",
    )
    bptt: Literal["full", "truncated"] = _f(
        "full",
        "With use_chunking: full backpropagates through the carried state across chunks; truncated "
        "detaches it at chunk boundaries (less memory, shorter credit assignment).",
    )
    state_tuning: bool = _f(
        False,
        "Train only the learnable initial states (model.rwkv_use_learnable_states must be true), keeping "
        "the weights frozen: RWKV's cheap fine-tuning. Usually with model.init_from.",
    )
    distributed: Literal["ddp", "fsdp"] = _f(
        "ddp",
        "Under torchrun: ddp replicates the model on every process; fsdp shards parameters, gradients "
        "and optimizer state (models that do not fit one GPU).",
    )
    seed: int = _f(1337, "Random seed for initialisation and the data order.", ge=0)
    eval_interval: int = _f(
        250, "Evaluate the validation loss every this many steps (and at the end); 0: only at the end.", ge=0
    )
    eval_batches: int = _f(
        20,
        "Validation batches per evaluation: eval_batches x batch_size fixed windows of seq_len tokens, spread "
        "evenly over the validation split (all of it if shorter), the same every time; run in micro-batches "
        "of micro_batch_size, so the loss depends on neither micro_batch_size nor the number of processes.",
        ge=1,
    )
    detect_anomaly: bool = _f(
        False, "torch.autograd anomaly detection: finds the op producing NaN/inf (slow; debugging only)."
    )
    compile: bool = _f(False, "torch.compile each block and the head's loss slices (faster steps on GPU after a "
                              "compile warm-up of a minute or so; if torch.compile fails, one warning and eager "
                              "mode). CUDA only.")

    def micro_batch(self, world_size: int = 1) -> int:
        """Sequences per process per forward pass for `world_size` processes."""
        return self.micro_batch_size or max(1, self.batch_size // max(1, world_size))

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each process."""
        return max(1, self.batch_size // (self.micro_batch(world_size) * max(1, world_size)))

    def final_lr(self) -> float:
        """min_lr, with null resolved to lr / 10."""
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass
class CheckpointConfig:
    """When and what to save in the run directory (out_dir)."""

    every_steps: int = _f(500, "Save a checkpoint every this many steps (and always at the end); 0: only at the end.", ge=0)
    keep_last: int = _f(3, "Keep this many most recent checkpoints; 0 keeps all.", ge=0)
    save_optimizer: bool = _f(
        True, "Include optimizer, scheduler and scaler state (needed for exact resume; about 2x larger)."
    )
    resume: Union[bool, Literal["auto"]] = _f(
        False,
        "true: continue from the latest checkpoint in out_dir (error if none). auto: continue if one "
        "exists, else start fresh (for Kaggle sessions that restart). false: start fresh.",
    )


@dataclass
class LoggingConfig:
    """What the run reports."""

    log_interval: int = _f(10, "Log loss, learning rate and tokens/s every this many steps.", ge=1)
    tensorboard: bool = _f(False, "Also write TensorBoard event files into the run directory.")
    plot: bool = _f(True, "Write a loss-curve PNG into the run directory at the end of the run.")
    progress: bool = _f(True, "Show a live progress bar; false prints plain log lines (better when output goes to a file).")


_SECTION_TYPES = {
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}

# Top-level scalar keys, described like section fields so that docs and validation share them.
_TOP_LEVEL_HELP = {
    "name": ("str", "Run name (letters, digits, '.', '_', '-'). Default: the config file's name.",
             "<config file name>"),
    "out_dir": ("str", "Run directory: checkpoints, metrics, the resolved config. Default: runs/<name>.",
                "runs/<name>"),
}
_INIT_FROM_HELP = (
    "A checkpoint to initialise the weights from before training (a kaggletrain run directory or "
    "checkpoint, or an official RWKV-7 .pth). null: random initialisation. Read only by a fresh start: a "
    "resumed or evaluated run takes every weight from its own checkpoint, so the base may be gone by then."
)
_VOCAB_HELP_SUFFIX = " null: taken from the tokenizer (256 byte, 65536 world, data-dependent for char)."


class ModelSection(dict):
    """The `model` section: ModelConfig fields plus `init_from`; a dict with attribute access."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


# ------------------------------------------------------------------------------------------------
# Field specs: what a value must look like, derived from type hints + metadata
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    kind: str  # int | float | bool | str | choice | list | tuple | bool_or_auto | any
    optional: bool = False
    choices: tuple = ()
    item: "_Spec | None" = None
    length: int | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        """Human text of what is expected, e.g. 'a number > 0' or "one of 'a', 'b'"."""
        if self.kind == "int":
            text = "an integer" + self._range()
        elif self.kind == "float":
            text = "a number" + self._range()
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "bool_or_auto":
            text = "true, false or 'auto'"
        elif self.kind == "str":
            text = "a string"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "tuple":
            text = f"a list of {self.length} numbers" + self._range(" each")
        elif self.kind == "list":
            text = "a list of " + {"int": "integers", "float": "numbers", "str": "strings"}.get(
                self.item.kind if self.item else "any", "values")
        else:
            text = "a value"
        return text + (" or null" if self.optional else "")

    def type_name(self) -> str:
        """Short type for the docs table."""
        base = {
            "int": "int", "float": "float", "bool": "bool", "str": "str", "any": "any",
            "bool_or_auto": "bool \\| `auto`",
            "choice": " \\| ".join(f"`{c}`" for c in self.choices),
            "tuple": f"[{', '.join(['float'] * (self.length or 0))}]",
            "list": f"list[{self.item.kind if self.item else 'any'}]",
        }[self.kind]
        return base + (" \\| null" if self.optional else "")

    def _range(self, each: str = "") -> str:
        lo = f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}" if self.gt is not None else None
        hi = f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}" if self.lt is not None else None
        if lo and hi:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            low = self.ge if self.ge is not None else self.gt
            high = self.le if self.le is not None else self.lt
            return f"{each} in {left}{_num(low)}, {_num(high)}{right}"
        return f"{each} {lo or hi}" if (lo or hi) else ""


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def _spec_for(tp: Any, meta: Any) -> _Spec:
    """Turn a type hint (+ field metadata constraints) into a _Spec."""
    rng = {k: meta.get(k) for k in ("ge", "gt", "le", "lt")}
    optional = False
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        optional = len(non_none) < len(args)
        if len(non_none) == 2 and bool in non_none and any(typing.get_origin(a) is Literal for a in non_none):
            return _Spec("bool_or_auto", optional)
        if len(non_none) != 1:
            return _Spec("any", optional)
        tp = non_none[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return _Spec("choice", optional, choices=tuple(args))
    if origin is tuple:
        return _Spec("tuple", optional, length=len(args), **rng)
    if origin is list:
        item = _spec_for(args[0], {}) if args else _Spec("any")
        return _Spec("list", optional, item=item)
    if tp in (int, float, bool, str):
        return _Spec(tp.__name__, optional, **(rng if tp in (int, float) else {}))
    return _Spec("any", optional)


def _err(msg: str) -> ConfigError:
    """A ConfigError whose message stays on one line whatever text the user's input contained."""
    return ConfigError(msg.replace("\r", "\\r").replace("\n", "\\n"))


class _Invalid(Exception):
    """A value did not match its spec; the caller adds file and key path."""


def _coerce(value: Any, spec: _Spec) -> Any:
    """Check `value` against `spec`, converting harmless spellings (e.g. '3e-4' -> 0.0003)."""
    if value is None:
        if spec.optional:
            return None
        raise _Invalid(f"expected {spec.describe()}, got null")
    kind = spec.kind
    if kind == "any":
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise _bad(spec, value)
    if kind == "bool_or_auto":
        if isinstance(value, bool) or value == "auto":
            return value
        raise _bad(spec, value)
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `name: 2024` means the string "2024"
        raise _bad(spec, value)
    if kind == "choice":
        if isinstance(value, str) and value.lower() in spec.choices:
            return value.lower()
        if value in spec.choices and not isinstance(value, bool):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value.lower(), [str(c) for c in spec.choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise _Invalid(f"expected {spec.describe()}, got {value!r}{hint}")
    if kind in ("int", "float"):
        return _check_range(_number(value, spec), spec, value)
    if kind == "tuple":
        if not isinstance(value, (list, tuple)) or len(value) != spec.length:
            raise _bad(spec, value)
        item_spec = dataclasses.replace(spec, kind="float", optional=False)
        try:
            return tuple(_coerce(v, item_spec) for v in value)
        except _Invalid:
            raise _bad(spec, value) from None
    if kind == "list":
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _bad(spec, value)
        try:
            return [_coerce(v, spec.item) for v in value] if spec.item else list(value)
        except _Invalid:
            raise _bad(spec, value) from None
    raise AssertionError(kind)


def _number(value: Any, spec: _Spec) -> int | float:
    """Accept ints, floats and numeric strings; YAML 1.1 (PyYAML) reads `3e-4` as a string."""
    original = value
    if isinstance(value, bool):
        raise _bad(spec, original)
    if isinstance(value, str):
        try:
            value = float(value.strip().replace("_", ""))
        except ValueError:
            raise _bad(spec, original) from None
    if not isinstance(value, (int, float)):
        raise _bad(spec, original)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(spec, original)
    if spec.kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise _bad(spec, original)
            value = int(value)
        return value
    return float(value)


def _check_range(v: int | float, spec: _Spec, original: Any) -> int | float:
    ok = ((spec.ge is None or v >= spec.ge) and (spec.gt is None or v > spec.gt)
          and (spec.le is None or v <= spec.le) and (spec.lt is None or v < spec.lt))
    if not ok:
        raise _bad(spec, original)
    return v


def _bad(spec: _Spec, value: Any) -> _Invalid:
    return _Invalid(f"expected {spec.describe()}, got {value!r}")


def _section_specs(cls: type) -> dict[str, tuple[_Spec, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (_spec_for(hints[f.name], f.metadata), f) for f in dataclasses.fields(cls)}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _model_config_cls() -> type:
    # Imported lazily: kaggletrain.model pulls in torch, and the config must load fast for --help.
    from kaggletrain.model.config import ModelConfig

    return ModelConfig


def _model_specs() -> dict[str, tuple[_Spec, Any, str]]:
    """model.<key> -> (spec, default, help), from dataclasses.fields(ModelConfig) + init_from."""
    cls = _model_config_cls()
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[_Spec, Any, str]] = {}
    for f in dataclasses.fields(cls):
        spec = _spec_for(hints.get(f.name, Any), {})
        default = _default_of(f)
        help_text = f.metadata.get("help", "")
        if f.name == "vocab_size":
            # The tokenizer usually decides the vocabulary, so the run config leaves it open.
            spec, default, help_text = dataclasses.replace(spec, optional=True), None, help_text + _VOCAB_HELP_SUFFIX
        out[f.name] = (spec, default, help_text)
    out["init_from"] = (_Spec("str", optional=True), None, _INIT_FROM_HELP)
    return out


# ------------------------------------------------------------------------------------------------
# The run config
# ------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """A validated run configuration. Build it with load_config / config_from_dict."""

    name: str
    out_dir: str
    model: ModelSection
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Where it came from (for messages); not part of the configuration itself.
    source: str | None = field(default=None, compare=False, repr=False)

    def model_config(self, vocab_size: int | None = None) -> Any:
        """The `ModelConfig` of this run.

        model.vocab_size wins when set; when null it is `vocab_size` (the trainer passes the
        tokenizer's), else the tokenizer's fixed size (byte 256, world 65536).
        """
        values = {k: v for k, v in self.model.items() if k != "init_from"}
        if values.get("vocab_size") is None:
            vocab_size = vocab_size or KNOWN_VOCAB_SIZES.get(self.data.tokenizer)
            if vocab_size is None:
                raise _err(
                    f"{self.source or 'config'}: model.vocab_size: null with tokenizer "
                    f"'{self.data.tokenizer}': pass the tokenizer's vocab_size to model_config()"
                )
            values["vocab_size"] = int(vocab_size)
        try:
            return _model_config_cls()(**values)
        except ValueError as e:
            raise _model_error(self.source or "config", e) from None

    def validate_for_world_size(self, world_size: int) -> int:
        """Check the batch arithmetic for `world_size` processes; return accumulation steps."""
        t = self.train
        where = self.source or "config"
        if world_size < 1:
            raise _err(f"{where}: world size must be >= 1, got {world_size}")
        if t.batch_size % world_size:
            raise _err(
                f"{where}: train.batch_size: {t.batch_size} sequences cannot be split evenly over "
                f"{world_size} processes; use a multiple of {world_size}"
            )
        micro = t.micro_batch(world_size)
        per_rank = t.batch_size // world_size
        if micro > per_rank or per_rank % micro:
            raise _err(
                f"{where}: train.batch_size: {t.batch_size} must be a multiple of micro_batch_size x "
                f"processes = {micro} x {world_size} = {micro * world_size}"
            )
        return per_rank // micro

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready dict; config_from_dict(cfg.to_dict()) == cfg."""
        out: dict[str, Any] = {"name": self.name, "out_dir": self.out_dir, "model": _plain(dict(self.model))}
        for sec in _SECTION_TYPES:
            out[sec] = _plain(dataclasses.asdict(getattr(self, sec)))
        return out

    @property
    def cache_dir(self) -> Path:
        """The resolved token-cache directory."""
        return resolve_cache_dir(self.data.cache_dir)


def document_end_problem(data: DataConfig) -> str | None:
    """Why data.document_end does not fit data.tokenizer (eos is World's token 0), or None."""
    if data.document_end == "eos" and data.tokenizer != "world":
        return (f"eos needs data.tokenizer: world (the {data.tokenizer} tokenizer has no end-of-document token); "
                "use separator or auto")
    return None


def resolve_cache_dir(cache_dir: str | None) -> Path:
    """data.cache_dir with null resolved to $KAGGLETRAIN_CACHE_DIR or the default."""
    raw = cache_dir or os.environ.get("KAGGLETRAIN_CACHE_DIR") or DEFAULT_CACHE_DIR
    return Path(os.path.expanduser(raw))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------------
# Loading: YAML -> raw dict (+ line numbers) -> overrides -> validated RunConfig
# ------------------------------------------------------------------------------------------------


class _Where:
    """Formats error locations: the file (with line numbers) or the override that set a key."""

    def __init__(self, source: str, lines: dict[str, int] | None = None):
        self.source = source
        self.lines = lines or {}
        self.overrides: dict[str, str] = {}

    def error(self, path: str, msg: str) -> ConfigError:
        # The override that set this key, or one of its parents/children (e.g. `trian.lr=1` for `trian`).
        for key, item in reversed(list(self.overrides.items())):
            if key == path or key.startswith(path + ".") or path.startswith(key + "."):
                return _err(f"override '{item}': {path}: {msg}")
        line = self.lines.get(path)
        suffix = f" (line {line})" if line else ""
        return _err(f"{self.source}: {path}: {msg}{suffix}" if path else f"{self.source}: {msg}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Map 'section.key' -> line number, from the composed YAML node tree."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                out[path] = k.start_mark.line + 1
                _key_lines(v, path, out)
    return out


def _read_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    src = str(path)
    if not path.exists():
        raise _err(f"{src}: config file not found")
    if path.is_dir():
        raise _err(f"{src}: is a directory, expected a YAML config file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _err(f"{src}: cannot read config file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(f"{src}: not a UTF-8 text file (bad byte at offset {e.start}); is it a YAML config?") from None
    if "\x00" in text:
        raise _err(f"{src}: looks like a binary file, expected a YAML config")
    loader = None
    try:
        loader = _Loader(text)  # the reader rejects control characters here already
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = e.problem or e.context or "invalid YAML"
        raise _err(f"{src}: {where}YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, max(0, e.position)) + 1
        raise _err(f"{src}: line {line}: YAML syntax error: control character #x{e.character:02x} is not allowed in YAML") from None
    except yaml.YAMLError as e:
        raise _err(f"{src}: YAML error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, _key_lines(node) if node is not None else {}


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML run config. Raises ConfigError naming file and key."""
    p = Path(path)
    data, lines = _read_yaml(p)
    if data is None:
        raise _err(f"{p}: the config is empty; expected a mapping of sections (model, data, train, ...)")
    if not isinstance(data, dict):
        raise _err(
            f"{p}: expected a mapping of sections (model, data, train, ...) at the top level, "
            f"got {_yaml_kind(data)}"
        )
    return _build(data, _Where(str(p), lines), overrides, default_name=p.stem)


def config_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "config"
) -> RunConfig:
    """Validate a config given as a dict (e.g. one saved in a checkpoint)."""
    if not isinstance(data, dict):
        raise _err(f"{source}: expected a mapping of sections, got {_yaml_kind(data)}")
    return _build(data, _Where(source), overrides, default_name="run")


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically); the file loads back equal to `cfg`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Resolved kaggletrain config of run '{cfg.name}'"
        + (f" (from {cfg.source})" if cfg.source else "")
        + ".\n# Reproduce with: kaggletrain train <this file>\n"
    )
    text = header + yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=None)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def _yaml_kind(x: Any) -> str:
    if isinstance(x, list):
        return "a list"
    if isinstance(x, str):
        return f"the text {x[:40]!r}"
    return f"{type(x).__name__} {x!r}"


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', '3e-4' parsed as YAML). Raises ConfigError naming the override."""
    if not isinstance(item, str) or "=" not in item:
        raise _err(f"override '{item}': expected KEY=VALUE, e.g. train.lr=3e-4")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise _err(f"override '{item}': expected a dotted key such as train.lr before '='")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "invalid YAML value"
        raise _err(f"override '{item}': cannot parse the value: {problem}") from None
    return key, value


def _apply_overrides(data: dict[str, Any], overrides: list[str], where: _Where) -> dict[str, Any]:
    data = _plain(data)
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        # The schema is two levels deep: top-level keys, and section.key.
        if len(parts) > 2 or (len(parts) == 2 and parts[0] in _TOP_LEVEL_HELP):
            parent = ".".join(parts[:-1])
            raise _err(f"override '{item}': '{parent}' is not a section; expected section.key or a top-level key")
        node = data
        if len(parts) == 2:
            node = data.get(parts[0])
            if node is None:
                node = data[parts[0]] = {}
            if not isinstance(node, dict):
                raise _err(f"override '{item}': '{parts[0]}' in the config is not a mapping of keys")
        node[parts[-1]] = value
        where.overrides[key] = item
    return data


def _unknown(key: str, known: list[str], path: str, where: _Where) -> ConfigError:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(known)}"
    return where.error(path, f"unknown key{hint}")


def _build(data: dict[str, Any], where: _Where, overrides: list[str] | None, default_name: str) -> RunConfig:
    if overrides:
        data = _apply_overrides(data, list(overrides), where)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown(key, list(TOP_LEVEL_KEYS), str(key), where)

    name = _top_level_str(data, "name", where, default_name)
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise where.error("name", f"expected letters, digits, '.', '_' or '-' (it names a directory), got {name!r}")
    out_dir = _top_level_str(data, "out_dir", where, f"runs/{name}")
    if not out_dir.strip():
        raise where.error("out_dir", "expected a directory path, got an empty string")

    sections: dict[str, Any] = {}
    for sec, cls in _SECTION_TYPES.items():
        sections[sec] = cls(**_validate_section(data.get(sec), sec, _section_specs(cls), where))
    model = _validate_model(data.get("model"), where, sections["data"].tokenizer)
    cfg = RunConfig(name=name, out_dir=out_dir, model=model, source=where.source, **sections)
    _cross_checks(cfg, where)
    return cfg


def _top_level_str(data: dict, key: str, where: _Where, default: str) -> str:
    value = data.get(key)
    if value is None:
        return default
    try:
        return _coerce(value, _Spec("str"))
    except _Invalid as e:
        raise where.error(key, str(e)) from None


def _section_mapping(raw: Any, sec: str, where: _Where) -> dict[str, Any]:
    if raw is None:
        return {}  # `logging:` with nothing under it means all defaults
    if not isinstance(raw, dict):
        raise where.error(sec, f"expected a mapping of keys, got {_yaml_kind(raw)}")
    return raw


def _validate_section(raw: Any, sec: str, specs: dict[str, tuple[_Spec, Any]], where: _Where) -> dict[str, Any]:
    raw = _section_mapping(raw, sec, where)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in specs:
            raise _unknown(key, list(specs), f"{sec}.{key}", where)
        spec = specs[key][0]
        try:
            out[key] = _coerce(value, spec)
        except _Invalid as e:
            raise where.error(f"{sec}.{key}", str(e)) from None
    return out


def _validate_model(raw: Any, where: _Where, tokenizer: str) -> ModelSection:
    specs = _model_specs()
    given = _validate_section(raw, "model", {k: (s,) for k, (s, _, _) in specs.items()}, where)
    section = ModelSection({k: given.get(k, default) for k, (_, default, _) in specs.items()})
    # Let ModelConfig check the architecture now (hidden_size % head_size, layer indices...), so a bad
    # model section fails at load time, not minutes later. A null vocab_size is checked with a stand-in.
    values = {k: v for k, v in section.items() if k != "init_from"}
    if values.get("vocab_size") is None:
        values["vocab_size"] = KNOWN_VOCAB_SIZES.get(tokenizer, 256)
    try:
        _model_config_cls()(**values)
    except ValueError as e:
        raise _model_error(where, e) from None
    return section


def _model_error(where: _Where | str, e: ValueError) -> ConfigError:
    """Re-home ModelConfig's 'ModelConfig.<field>: msg' as '<file>: model.<field>: msg'."""
    msg = str(e)
    m = re.match(r"ModelConfig\.(\w+): (.*)", msg, re.S)
    path, text = (f"model.{m.group(1)}", m.group(2)) if m else ("model", msg)
    if isinstance(where, _Where):
        return where.error(path, text)
    return _err(f"{where}: {path}: {text}")


def _cross_checks(cfg: RunConfig, where: _Where) -> None:
    """Rules that involve more than one key."""
    t, d, m = cfg.train, cfg.data, cfg.model
    if t.min_lr is not None and t.min_lr > t.lr:
        raise where.error("train.min_lr", f"must not exceed train.lr={t.lr}, got {t.min_lr}")
    if t.micro_batch_size is not None:
        if t.micro_batch_size > t.batch_size or t.batch_size % t.micro_batch_size:
            raise where.error(
                "train.micro_batch_size",
                f"train.batch_size={t.batch_size} must be a multiple of it, got {t.micro_batch_size}",
            )
    if t.state_tuning and not m.get("rwkv_use_learnable_states", True):
        raise where.error("train.state_tuning", "needs model.rwkv_use_learnable_states: true (the states are what it trains)")
    if m.get("use_position_embeddings") and t.seq_len > m.get("max_position_embeddings", t.seq_len):
        raise where.error(
            "train.seq_len",
            f"{t.seq_len} exceeds model.max_position_embeddings={m['max_position_embeddings']}",
        )
    if d.source is None:
        d.source = "builtin"
    if not d.source.strip():
        raise where.error("data.source", "expected a file, folder, glob or 'builtin', got an empty string")
    if d.val_source is not None and not d.val_source.strip():
        raise where.error("data.val_source", "expected a file, folder or glob, got an empty string")
    if (problem := document_end_problem(d)) is not None:
        raise where.error("data.document_end", problem)
    if d.format == "binidx" and d.tokenizer == "char":
        raise where.error("data.tokenizer", "binidx data holds token ids already; char needs text (use world or byte)")
    for key in ("text_field", "text_column"):
        if not getattr(d, key):
            raise where.error(f"data.{key}", "expected a non-empty name")
    try:
        codecs.lookup(d.encoding)
    except LookupError:
        raise where.error("data.encoding", f"unknown text encoding {d.encoding!r} (e.g. utf-8, latin-1)") from None


# ------------------------------------------------------------------------------------------------
# Reference documentation
# ------------------------------------------------------------------------------------------------


def _doc_default(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return "`" + json.dumps(value, ensure_ascii=False) + "`"


def _doc_cell(text: str) -> str:
    # Escape what markdown tables and HTML would swallow: pipes, and <placeholders>.
    return text.replace("|", "\\|").replace("<", "\\<").replace(">", "\\>").replace("\n", " ")


def config_reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the schema."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m kaggletrain.config > docs/configuration.md`; do not edit by hand. -->",
        "",
        "A run is one YAML file: two top-level keys and five sections. Every key is optional; a missing key",
        "takes its default. Override any key on the command line with `section.key=value` (the value is",
        "read as YAML: `train.lr=3e-4`, `train.betas=[0.9,0.95]`, `model.attention_layers=[1,3]`,",
        "`data.val_source=null`):",
        "",
        "```",
        "kaggletrain train configs/tiny.yaml train.lr=3e-4 model.num_layers=6",
        "```",
        "",
        "Relative paths are relative to the working directory. Unknown keys, wrong types and out-of-range",
        "values stop the run with one line naming the file, the key and what was expected. The resolved",
        "config is saved as `<out_dir>/config.yaml` and is itself a valid config.",
        "",
        "## Top level",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for key, (tp, help_text, default) in _TOP_LEVEL_HELP.items():
        lines.append(f"| `{key}` | {tp} | `{default}` | {_doc_cell(help_text)} |")

    sections: list[tuple[str, str, list[tuple[str, _Spec, Any, str]]]] = []
    model_rows = [(k, s, d, h) for k, (s, d, h) in _model_specs().items()]
    sections.append(("model", "The architecture (`kaggletrain.model.config.ModelConfig`) and its initialisation.", model_rows))
    for sec, cls in _SECTION_TYPES.items():
        rows = [(k, s, _default_of(f), f.metadata["help"]) for k, (s, f) in _section_specs(cls).items()]
        sections.append((sec, (cls.__doc__ or "").strip(), rows))

    for sec, doc, rows in sections:
        lines += ["", f"## `{sec}`", "", _doc_cell(doc), "", "| key | type | default | description |", "|---|---|---|---|"]
        for key, spec, default, help_text in rows:
            lines.append(f"| `{key}` | {spec.type_name()} | {_doc_default(default)} | {_doc_cell(help_text)} |")
    lines += [
        "",
        "## Batch arithmetic",
        "",
        "`train.batch_size` is the global batch. With N processes (torchrun), each optimizer step runs",
        "`batch_size / (micro_batch_size x N)` micro-batches per process; `batch_size` must be divisible by",
        "`micro_batch_size x N`. The data order depends only on `train.seed` and the step, so a run resumed",
        "with a different number of processes continues the same data stream.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m kaggletrain.config > docs/configuration.md
    import sys

    sys.stdout.write(config_reference_markdown())
