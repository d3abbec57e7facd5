"""Run-directory checkpoints: atomic, resumable, never executing code on load.

Layout of `<out_dir>/checkpoints/`:
    step-00000100/   model.safetensors  config.json  trainer_state.pt  run_config.yaml  tokenizer.json
    latest           text file naming the newest complete checkpoint directory

A checkpoint is written into a hidden temporary directory, flushed to disk, then renamed into place,
and only then does `latest` move (itself via a temporary file + os.replace). A crash at any moment
leaves the previous checkpoint and pointer intact; a write that fails (disk full, read-only) raises OSError,
one that runs out of memory MemoryError, and both leave them intact too. Temporaries left by a killed writer
are removed by the next save, and pruned checkpoints are first renamed out of sight, so a half-deleted
directory is never taken for a checkpoint.
Loading uses `torch.load(weights_only=True)`: a trainer_state.pt that holds pickled code is refused, never
run. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
# Imported with this module, not at the first save: loading its compiled library maps memory, which a run
# that is short of memory by then could not do (an ImportError mid-run instead of the out-of-memory error).
import safetensors.torch
from safetensors import SafetensorError

from kaggletrain.errors import CheckpointError
from kaggletrain.train.out_of_memory import describe, is_out_of_memory, reading

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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _write_failure(path: Path, e: BaseException) -> Exception:
    """safetensors (SafetensorError) and torch.save (RuntimeError) do not raise OSError when a write fails
    (disk full, file size limit, I/O error): turn those into an OSError naming the file, errno included
    where the message carries one ("... (os error 28)"). Out of memory stays an out-of-memory error."""
    if is_out_of_memory(e):
        return MemoryError(f"out of memory writing {path}: {describe(e)}")
    if isinstance(e, OSError):
        return e
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    m = re.search(r"os error (\d+)", msg)
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    return OSError(errno.EIO, f"could not write {path.name} ({msg}): out of disk space or a file size limit?",
                   str(path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _remove_stale_temporaries(ckpt_root: Path) -> None:
    """Remove `.tmp-*` / `.old-*` directories that writers killed mid-save left behind (a partial checkpoint
    of a large model takes as much disk as a complete one). Never a complete checkpoint: those are `step-*`."""
    for p in ckpt_root.iterdir():
        m = re.fullmatch(r"\.(tmp|old)-step-\d+-(\d+)", p.name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
        elif re.fullmatch(r"\.(tmp|old)-step-\d+-(\d+)-pruned", p.name):
            shutil.rmtree(p, ignore_errors=True)
        else:
            m = re.fullmatch(rf"\.{POINTER}\.tmp-(\d+)", p.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    p.unlink()


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
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(ckpt_root)
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        try:
            safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        except Exception as e:
            raise _write_failure(tmp / "model.safetensors", e) from None
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if trainer_state is not None:
            try:
                torch.save(trainer_state, tmp / "trainer_state.pt")
            except Exception as e:
                raise _write_failure(tmp / "trainer_state.pt", e) from None
        if run_config_yaml is not None:
            (tmp / "run_config.yaml").write_text(run_config_yaml)
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(json.dumps(tokenizer))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): swap
            # `latest` never names this step here (a resumed run saves only steps after the one it loaded),
            # so the moment between the two renames leaves the pointer's checkpoint untouched.
            old = ckpt_root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
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
            if old != final:
                _remove_checkpoint(old)
    return final


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory so that no crash leaves a half-deleted `step-*` directory behind:
    rename it out of sight first (one atomic step), then delete."""
    doomed = path.with_name(f".old-{path.name}-{os.getpid()}-pruned")
    try:
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are ignored)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-")
            and (p / "model.safetensors").exists() and (p / "config.json").exists()]
    return sorted(dirs, key=lambda p: p.name)


def _read_pointer(ckpt_root: Path) -> Optional[str]:
    """The checkpoint name in `latest`, or None when the pointer is missing, unreadable or not a name."""
    try:
        name = (ckpt_root / POINTER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return name if re.fullmatch(r"step-\d+", name) else None


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The pointer's target if it is complete, else the newest complete directory."""
    ckpt_root = Path(ckpt_root)
    name = _read_pointer(ckpt_root)
    if name is not None:
        target = ckpt_root / name
        if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
            return target
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def quarantine_from(ckpt_root: Path, step: int) -> Optional[Path]:
    """Set aside every checkpoint of step >= `step` (renamed to `.nonfinite-step-*`: kept for inspection,
    never resumed from) and point `latest` at the newest remaining one, which is returned (None if none).

    For the trainer after a non-finite loss: the weights saved at step s produced the loss of step s + 1,
    so when step f is the first non-finite one, checkpoints from step f - 1 on are suspect."""
    ckpt_root = Path(ckpt_root)
    keep = None
    for p in list_checkpoints(ckpt_root):
        if int(p.name.split("-", 1)[1]) >= step:
            target = p.with_name(f".nonfinite-{p.name}")
            with contextlib.suppress(OSError):
                if target.exists():  # an older set-aside copy of the same step
                    shutil.rmtree(target)
                os.rename(p, target)
        else:
            keep = p
    if keep is not None:  # the pointer names it even if a suspect directory could not be moved
        atomic_write_text(ckpt_root / POINTER, keep.name + "\n")
    else:
        with contextlib.suppress(OSError):
            (ckpt_root / POINTER).unlink()
    return keep


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
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing weights file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):  # mmap or a copy failed: the file is not to blame
            raise reading(path, e) from None
        raise CheckpointError(f"{path}: truncated or corrupted weights ({str(e).splitlines()[0]})") from None


def load_trainer_state(ckpt_dir: Path) -> Optional[dict]:
    """trainer_state.pt through `torch.load(weights_only=True)`: tensors and plain containers only, so a
    file holding pickled code is refused before anything in it runs."""
    path = Path(ckpt_dir) / "trainer_state.pt"
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure is a bad file, never executed code
        if is_out_of_memory(e):
            raise reading(path, e) from None
        msg = str(e).strip()
        if "Weights only load failed" in msg:  # torch's boilerplate, then the actual reason in its own paragraph
            paras = [p.strip() for p in msg.split("\n\n") if p.strip()]
            msg = next((p for p in paras[1:] if not p.startswith("Check the documentation")), paras[0])
        found = re.search(r"unsupported (?:global:?\s*(?:GLOBAL\s+)?([\w.]+)|operand)", msg, re.IGNORECASE)
        if found and found.group(1):
            raise CheckpointError(
                f"{path}: refusing to load: the file holds pickled Python objects, not just tensors (it asks "
                f"for {found.group(1)}); nothing in it was run. Delete this checkpoint if you did not write it"
            ) from None
        if found:
            raise CheckpointError(
                f"{path}: refusing to load: corrupted, or pickled code (an opcode that torch.load(weights_only=True) "
                f"does not allow); nothing in it was run") from None
        first = msg.splitlines()[0].split(". ")[0][:160] if msg else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupted trainer state ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a kaggletrain trainer state (a {type(state).__name__}, expected a dict)")
    return state
