"""One PNG per suite (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def save_chart(draw: Callable, rows: list[dict], path: Path, title: str, subtitle: str) -> Path | None:
    """Draw a suite's chart into `path`. Returns None (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = plt.figure(figsize=(12, 4.8), layout="constrained")
    fig.suptitle(f"{title}\n{subtitle}", fontsize=10)
    try:
        draw(rows, fig)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _log(ax, which: str, base: int = 10) -> None:
    """Log scale labelled with plain numbers (1024, not 2^10)."""
    from matplotlib.ticker import FuncFormatter

    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    axis = ax.xaxis if which == "x" else ax.yaxis
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    # Less than two decades: label the minor ticks too, or the axis may carry a single number.
    axis.set_minor_formatter(plain if lo > 0 and hi / lo < 100 else FuncFormatter(lambda v, _: ""))


def grouped_bars(ax, groups: list[str], values: dict[str, list], *, ylabel: str, title: str, log: bool = False,
                 baseline: float | None = None) -> None:
    """Bars per group (x) and series (colour); None values are left out."""
    n = max(1, len(values))
    width = 0.8 / n
    for i, (name, vals) in enumerate(values.items()):
        xs = [g + (i - (n - 1) / 2) * width for g, v in enumerate(vals) if v is not None]
        ys = [v for v in vals if v is not None]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        _log(ax, "y")
    if baseline is not None:
        ax.axhline(baseline, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def lines(ax, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str,
          logx: bool = False, logy: bool = False) -> None:
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logx:
        _log(ax, "x", base=2)
    if logy:
        _log(ax, "y")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
