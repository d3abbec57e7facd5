"""Evaluate a saved checkpoint: loss, perplexity and bits per byte on validation windows."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from kaggletrain.errors import CheckpointError
from kaggletrain.train import checkpoint as ckpt


def resolve_checkpoint_dir(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    for root in (path / "checkpoints", path):
        found = ckpt.latest_checkpoint(root)
        if found is not None:
            return found
    if (path / "model.safetensors").exists():
        return path
    raise CheckpointError(f"{path}: no kaggletrain checkpoint found (expected model.safetensors + config.json)")


def _check_data_paths(cfg, path: Path) -> None:
    """The run's data paths are those of the machine it trained on (a run pulled from Kaggle, a moved
    project): when one is not here, say which override gives its location now."""
    from kaggletrain.data.sources import resolve_source
    from kaggletrain.errors import DataError

    for key, value in (("data.source", cfg.data.source), ("data.val_source", cfg.data.val_source)):
        if value is None:
            continue
        try:
            resolve_source(value, cfg.data.format, key)
        except DataError as e:
            raise DataError(f"{e}; the run's config names it: give the data's location here with "
                            f"kaggletrain eval {path} {key}=PATH") from None


def evaluate_checkpoint(path: Path, overrides: list[str], batches: Optional[int] = None) -> dict:
    from kaggletrain.config import load_config
    from kaggletrain.train.loop import Trainer

    ckpt_dir = resolve_checkpoint_dir(path)
    meta = ckpt.read_meta(ckpt_dir)
    run_yaml = ckpt_dir / "run_config.yaml"
    if not run_yaml.exists():
        raise CheckpointError(f"{ckpt_dir}: no run_config.yaml; eval needs a checkpoint written by `kaggletrain train`")
    cfg = load_config(run_yaml, overrides)
    _check_data_paths(cfg, path)
    trainer = Trainer(cfg, resume=True, progress=False)
    trainer.setup(out_dir_writable=False, checkpoint_follows=True)  # (model.init_from is not needed)
    trainer.load(ckpt_dir)
    t = cfg.train
    batches_xy = trainer.eval_windows(batches)  # what trainer.evaluate(batches) evaluates
    if batches_xy is None:
        raise CheckpointError(f"{cfg.data.source}: validation split shorter than one sequence of {t.seq_len} tokens")
    t0 = time.perf_counter()
    loss = trainer.evaluate(batches)
    seconds = time.perf_counter() - t0
    n_tokens = sum(int(y.numel()) for _, y in batches_xy)
    # Bits per byte: total nats over the UTF-8 bytes the target tokens decode to.
    tok = trainer.tokenizer
    lengths = torch.as_tensor(tok.token_byte_lengths(), dtype=torch.long)
    n_bytes = sum(int(lengths[y].sum()) for _, y in batches_xy)
    bpb = loss * n_tokens / math.log(2) / max(n_bytes, 1)
    return {"checkpoint": str(ckpt_dir), "step": meta.get("step"), "val_loss": loss,
            "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": bpb, "tokens": n_tokens,
            "tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0}
