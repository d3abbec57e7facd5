"""Metrics: a JSON-lines file, optional TensorBoard, and the loss-curve PNG at the end of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


class MetricsWriter:
    def __init__(self, path: Path, tensorboard_dir: Optional[Path] = None, resume_from_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is not None and self.path.exists():
            # Keep only records up to the resumed step, so a resumed run's file reads like an uninterrupted one.
            # A line cut short (killed or disk full mid-write) is dropped. The rewrite is atomic: a kill
            # during it leaves the old file, never a truncated one.
            _rewrite(self.path, [ln for ln, rec in _parse_lines(self.path) if rec.get("step", 0) <= resume_from_step])
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                self._tb = None

    def log(self, record: dict) -> None:
        self._f.write(_dumps(record) + "\n")
        self._f.flush()
        self._to_tensorboard(record)

    def add_to_step(self, record: dict) -> None:
        """Add `record`'s fields to the last record logged for its step (a resumed run's evaluation of the step
        it resumed at: the file then reads as an uninterrupted run's); a record of its own if there is none."""
        recs = _parse_lines(self.path)
        mine = [i for i, (_, rec) in enumerate(recs) if rec.get("step", 0) == record.get("step", 0)]
        if not mine:
            self.log(record)
            return
        lines = [ln for ln, _ in recs]
        lines[mine[-1]] = _dumps({**recs[mine[-1]][1], **record})
        self._f.close()
        _rewrite(self.path, lines)
        self._f = open(self.path, "a", encoding="utf-8")
        self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict) -> None:
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace the file with these record lines, atomically: a kill during it leaves the old file."""
    from kaggletrain.train.checkpoint import atomic_write_text

    atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def _dumps(record: dict) -> str:
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()})


def _parse_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every complete record; damaged lines (cut short, binary) are skipped."""
    out = []
    for ln in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step", 0), int):
            out.append((ln, rec))
    return out


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [rec for _, rec in _parse_lines(path)]


def plot_loss(metrics_path: Path, out_png: Path) -> Optional[Path]:
    """Train and validation loss against step. Returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
    va = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
