"""Run-directory checkpoints: atomic, resumable, never executing code on load.

Layout of `<out_dir>/checkpoints/`:
    step-00000100/   model.safetensors  config.json  trainer_state.pt  run_config.yaml  tokenizer.json
    latest           text file naming the newest complete checkpoint directory

A checkpoint is written into a hidden temporary directory, flushed to disk, then renamed into place,
and only then does `latest` move (itself via a temporary file + os.replace). A crash at any moment
leaves the previous checkpoint and pointer intact. Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from kaggletrain.errors import CheckpointError

FORMAT = "kaggletrain"
FORMAT_VERSION = 1
POINTER = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_meta(model_config_dict: dict, step: int, extra: Optional[dict] = None) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "model": model_config_dict, "step": step, **(extra or {})}


def save_checkpoint(ckpt_root: Path, step: int, *, model_state: dict[str, torch.Tensor], meta: dict,
                    trainer_state: Optional[dict] = None, run_config_yaml: Optional[str] = None,
                    tokenizer: Optional[dict] = None, keep_last: int = 0) -> Path:
    """Write checkpoint `step` atomically under `ckpt_root`; move `latest`; prune to `keep_last`."""
    from safetensors.torch import save_file

    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        if run_config_yaml is not None:
            (tmp / "run_config.yaml").write_text(run_config_yaml)
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(json.dumps(tokenizer))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): swap, never leave a gap
            old = ckpt_root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(ckpt_root)
        atomic_write_text(ckpt_root / POINTER, name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are ignored)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-")
            and (p / "model.safetensors").exists() and (p / "config.json").exists()]
    return sorted(dirs, key=lambda p: p.name)


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The pointer's target if it is complete, else the newest complete directory."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / POINTER
    if pointer.exists():
        target = ckpt_root / pointer.read_text().strip()
        if (target / "model.safetensors").exists() and (target / "config.json").exists():
            return target
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def read_meta(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: not a kaggletrain checkpoint (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kaggletrain checkpoint (format={meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this kaggletrain "
                              f"understands ({FORMAT_VERSION}); upgrade kaggletrain")
    return meta


def load_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / "model.safetensors"
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing weights file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted weights ({str(e).splitlines()[0]})") from None


def load_trainer_state(ckpt_dir: Path) -> Optional[dict]:
    path = Path(ckpt_dir) / "trainer_state.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure is a bad file, never executed code
        raise CheckpointError(f"{path}: unreadable trainer state ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
