"""Reading any supported checkpoint into an `RWKVModel`, and writing kaggletrain checkpoint directories.

Formats (`detect_format`), decided from the content, not the file name:
  "rwkv"         an official RWKV-7 .pth state dict (bf16/fp16/fp32), as published and as `rwkv` loads
  "kaggletrain"  a directory: model.safetensors (official key names), config.json, optional tokenizer.json
                 and states.safetensors
  "safetensors"  a single .safetensors file (config in its metadata when kaggletrain wrote it, else inferred
                 from shapes like an official file)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from kaggletrain.errors import CheckpointError, ConfigError
from kaggletrain.interop.files import (describe_file, read_safetensors, read_torch_file, sniff, write_json,
                                       write_safetensors)
from kaggletrain.interop.export import states_path_for
from kaggletrain.interop.official import config_from_state_dict, fill_unused, is_state_key, unwrap_state_dict
from kaggletrain.model.config import ModelConfig

FORMAT_NAME = "kaggletrain"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATES_FILE = "states.safetensors"
META_CONFIG_KEY = "kaggletrain_config"  # safetensors metadata: ModelConfig.to_dict() as JSON


def detect_format(path: str | os.PathLike) -> str:
    """'rwkv', 'kaggletrain' or 'safetensors'; CheckpointError saying what `path` is otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / CONFIG_FILE).is_file() or (p / WEIGHTS_FILE).is_file():
            return "kaggletrain"
        inner = sorted(c.name for c in p.iterdir() if c.is_dir() and (c / CONFIG_FILE).is_file())
        if inner:
            raise CheckpointError(f"{p}: a directory of checkpoints, not a checkpoint; pass one of: "
                                  + ", ".join(inner[:8]))
        listing = ", ".join(sorted(c.name for c in p.iterdir())[:8]) or "nothing"
        raise CheckpointError(f"{p}: directory without {CONFIG_FILE}/{WEIGHTS_FILE}, not a kaggletrain "
                              f"checkpoint (contains: {listing})")
    kind = sniff(p)
    if kind in ("zip", "pickle"):
        return "rwkv"
    if kind == "safetensors":
        return "safetensors"
    raise CheckpointError(f"{p}: not a checkpoint; found {describe_file(p)}")


def build_model(sd: dict[str, torch.Tensor], config: ModelConfig, source: str,
                dtype: Optional[torch.dtype] = torch.float32, device=None):
    """An RWKVModel holding exactly the tensors of `sd` (cast to `dtype`; None keeps the file's dtype).

    The model is built on the meta device so the random init (orthogonal matrices: minutes for a 7B model)
    never runs; every parameter comes from the file.
    """
    from kaggletrain.model.model import RWKVModel

    sd = fill_unused(sd, config)
    with torch.device("meta"):
        model = RWKVModel(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors ({', '.join(unexpected[:5])})")
        raise CheckpointError(f"{source}: does not match the inferred architecture: {'; '.join(parts)}")
    bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
           if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{source}: tensor shapes disagree with each other: {'; '.join(bad[:4])}")
    loaded = {}
    for k, t in sd.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor '{k}' has dtype {t.dtype}, expected a float type")
        # copy=True: tensors may be memory-mapped from the file (or shared with the caller's dict).
        loaded[k] = t.to(device=device or "cpu", dtype=dtype or t.dtype, copy=True)
    model.load_state_dict(loaded, strict=True, assign=True)
    return model


def _read_dir(p: Path) -> tuple[dict, ModelConfig, dict]:
    cfg_path = p / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{p}: missing {CONFIG_FILE}")
    try:
        cfg_json = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg_json, dict) or not isinstance(cfg_json.get("model"), dict):
        raise CheckpointError(f"{cfg_path}: expected an object with a 'model' section")
    if cfg_json.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise CheckpointError(f"{cfg_path}: format is {cfg_json.get('format')!r}, expected {FORMAT_NAME!r}")
    version = cfg_json.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: checkpoint format version {version!r} is newer than this "
                              f"kaggletrain understands ({FORMAT_VERSION}); upgrade kaggletrain")
    try:
        config = ModelConfig.from_dict(cfg_json["model"])
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: invalid model config: {e}") from None
    w = p / WEIGHTS_FILE
    if not w.is_file():
        raise CheckpointError(f"{p}: missing {WEIGHTS_FILE}")
    tensors, _ = read_safetensors(w)
    return tensors, config, cfg_json


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """`path` itself, or for a training run directory its newest complete checkpoint
    (`<run>/checkpoints/latest`, as kaggletrain.train writes them)."""
    p = Path(path)
    if p.is_dir() and not (p / CONFIG_FILE).is_file():
        from kaggletrain.train.checkpoint import latest_checkpoint

        for root in (p / "checkpoints", p):
            found = latest_checkpoint(root)
            if found is not None:
                return found
    return p


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """The tensors of any supported checkpoint (official names, file dtype), its ModelConfig and meta
    (see `load_checkpoint`). Nothing is built; a run directory means its latest checkpoint."""
    p = resolve_checkpoint(path)
    fmt = detect_format(p)
    meta: dict[str, Any] = {"format": fmt, "path": str(p), "config": None, "tokenizer": None, "states": None}
    if fmt == "kaggletrain":
        sd, config, cfg_json = _read_dir(p)
        meta["config"] = cfg_json
        tok = p / TOKENIZER_FILE
        if tok.is_file():
            try:
                meta["tokenizer"] = json.loads(tok.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{tok}: not valid JSON ({e})") from None
        if (p / STATES_FILE).is_file():
            meta["states"] = read_safetensors(p / STATES_FILE)[0]
    else:
        if fmt == "safetensors":
            sd, st_meta = read_safetensors(p)
            saved = st_meta.get(META_CONFIG_KEY)
        else:
            sd, saved = unwrap_state_dict(read_torch_file(p), str(p)), None
        states = _sibling_states(p, fmt)
        if states is not None:
            sd = {**sd, **states}
            meta["states_file"] = str(states_path_for(p))
        if saved is not None:
            try:
                cfg_dict = json.loads(saved)
                if states:
                    cfg_dict["rwkv_use_learnable_states"] = True
                config = ModelConfig.from_dict(cfg_dict)
            except (json.JSONDecodeError, TypeError, ConfigError) as e:
                raise CheckpointError(f"{p}: invalid model config in the file's metadata: {e}") from None
        else:
            config = config_from_state_dict(sd, str(p))
    if not sd:
        raise CheckpointError(f"{p}: contains no tensors")
    meta["source_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    return sd, config, meta


def load_state_dict_any(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Just the tensors (official key names, as stored) of any checkpoint `load_checkpoint` reads."""
    return read_checkpoint(path)[0]


def load_checkpoint(path: str | os.PathLike, dtype: Optional[torch.dtype] = torch.float32,
                    device=None) -> tuple[Any, dict]:
    """Load any supported checkpoint (an official .pth, a kaggletrain directory or run directory, a
    .safetensors file). Returns (model, meta).

    meta: "format" (see `detect_format`), "path", "source_dtype" (dtype of the stored weights), "config"
    (the full config.json of a kaggletrain directory, else None), "tokenizer" (tokenizer.json contents or
    None), "states" (tensors of states.safetensors or None) and, when learnable states were read from an
    exported `<name>.states.<ext>` next to a file, "states_file".
    `dtype`: parameter dtype of the returned model (float32 by default, the training dtype; None keeps the
    file's dtype). The model is in train mode, as a freshly constructed one.
    """
    sd, config, meta = read_checkpoint(path)
    return build_model(sd, config, meta["path"], dtype=dtype, device=device), meta


def _sibling_states(p: Path, fmt: str) -> Optional[dict[str, torch.Tensor]]:
    """Learnable states that `export_checkpoint` wrote next to the weights (`<name>.states.<ext>`)."""
    sp = states_path_for(p)
    if sp == p or not sp.is_file():
        return None
    if fmt == "safetensors":
        tensors = read_safetensors(sp)[0]
    else:
        tensors = unwrap_state_dict(read_torch_file(sp), str(sp))
    bad = [k for k in tensors if not is_state_key(k)]
    if bad:
        raise CheckpointError(f"{sp}: expected learnable states only (blocks.N.att.time_state, ...), found {bad[:3]}")
    return tensors


def model_metadata(model) -> dict[str, str]:
    return {"format": FORMAT_NAME, META_CONFIG_KEY: json.dumps(model.config.to_dict())}


def save_weights(model, path: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """Write the model's full state dict (official key names, learnable states included) to one
    .safetensors file, with the ModelConfig in its metadata so `load_checkpoint(path)` rebuilds the model.
    Atomic. `dtype` casts floating tensors (None keeps them)."""
    sd = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
          for k, t in model.state_dict().items()}
    write_safetensors(path, sd, model_metadata(model))
    return Path(path)


def save_pretrained(model, directory: str | os.PathLike, tokenizer=None,
                    states: Optional[dict[str, torch.Tensor]] = None, extra: Optional[dict] = None,
                    dtype: Optional[torch.dtype] = None) -> Path:
    """Write a kaggletrain checkpoint directory (see module docstring). Each file is replaced atomically,
    config.json last, so a directory with a config.json always has the weights that belong to it.

    tokenizer: an object with `to_dict()` or a plain dict (written as tokenizer.json).
    states: tensors for states.safetensors (e.g. `ModelState.to_tensors()`).
    extra: more top-level config.json entries (the trainer adds its run config, step, ...).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_weights(model, d / WEIGHTS_FILE, dtype=dtype)
    if tokenizer is not None:
        write_json(d / TOKENIZER_FILE, tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else tokenizer)
    if states is not None:
        write_safetensors(d / STATES_FILE, states)
    cfg = {**(extra or {}), "model": model.config.to_dict(), "format": FORMAT_NAME, "version": FORMAT_VERSION}
    write_json(d / CONFIG_FILE, cfg)
    return d
