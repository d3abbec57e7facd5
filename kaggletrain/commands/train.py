"""`kaggletrain train CONFIG [section.key=value ...]`: the main job."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from kaggletrain.cli import app

DRY_RUN_WOULD_STOP = 3  # exit status of a dry run whose report says the real run would stop


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Path = typer.Argument(..., help="YAML run config (see configs/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.lr=3e-4"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                          help="Continue the run in out_dir from its latest checkpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Run a few real steps in a temporary directory and "
                                 "report speed, memory and projected cost; leaves the run directory untouched."),
    steps: Optional[int] = typer.Option(None, "--steps", min=2, help="Steps of a dry run (default 10)."),
    json_out: bool = typer.Option(False, "--json", help="Print the dry-run report as JSON."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Live progress bar."),
):
    """Train a model from a YAML config. A dry run exits with 3 when its steps met what would stop the real run
    (out of memory, a non-finite loss), so that `--dry-run && kaggletrain push` stops too."""
    from kaggletrain.config import load_config
    from kaggletrain.errors import ConfigError

    if not dry_run and (steps is not None or json_out):
        raise ConfigError(f"{'--steps' if steps is not None else '--json'} goes with --dry-run: without it, "
                          "`kaggletrain train` starts the real run")
    cfg = load_config(config, overrides or [])
    if dry_run:
        from kaggletrain.train.dry_run import dry_run as run_dry, render_report

        report = run_dry(cfg, steps=10 if steps is None else steps, resume=resume)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
            render_report(report, as_json=json_out)
        if report["real_run_would_stop"]:
            raise typer.Exit(code=DRY_RUN_WOULD_STOP)
        return
    from rich.console import Console

    from kaggletrain.process import hold_until_exit
    from kaggletrain.train.distributed import barrier
    from kaggletrain.train.loop import Trainer

    console = Console()
    trainer = Trainer(cfg, resume=resume, progress=progress)
    if trainer.dist.enabled:
        hold_until_exit(trainer)
    try:
        trainer.setup()
        if trainer.dist.is_main:
            m = trainer.model
            console.print(f"[bold]{cfg.name}[/]: {m.num_parameters():,} parameters "
                          f"({m.num_parameters(trainable_only=True):,} trainable), device {trainer.device}, "
                          f"precision {trainer.precision.name}, world size {trainer.dist.world_size}, "
                          f"batch {cfg.train.batch_size}x{cfg.train.seq_len} (accumulation {trainer.accum})"
                          + (f", resumed at step {trainer.step}" if trainer.step else ""))
        summary = trainer.fit()
        if trainer.dist.is_main:
            val = f"{summary.val_loss:.4f}" if summary.val_loss is not None else "n/a"
            tl = f"{summary.train_loss:.4f}" if summary.train_loss is not None else "n/a"
            console.print(f"[green]done[/]: step {summary.steps}, train loss {tl}, val loss {val}, "
                          f"{summary.tokens_per_s:,.0f} tok/s, {summary.elapsed_s:.1f} s; checkpoint "
                          f"{summary.checkpoint}")
        # No rank exits before rank 0 has written and printed everything: torchrun stops the other workers as
        # soon as one exits with a non-zero status (as all do after a signal).
        barrier(trainer.dist)
    finally:
        trainer.close()
    if summary.stopped_by_signal:  # every rank, with the signal the ranks agreed on: SIGTERM 143, SIGINT 130
        raise typer.Exit(code=128 + int(trainer.stop_signal_agreed or 2))

