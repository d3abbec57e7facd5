"""`kaggletrain eval CHECKPOINT`: validation loss, perplexity, bits per byte, tokens/s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from kaggletrain.cli import app


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="A run directory or one of its checkpoint directories."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides of the run's config, e.g. "
                                                    "data.source=other.txt train.eval_batches=50"),
    batches: Optional[int] = typer.Option(None, "--batches", min=1, help="Validation batches of train.batch_size "
                                          "windows each (default: train.eval_batches)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Evaluate a checkpoint on its run's validation split (or another source via overrides)."""
    from kaggletrain.train.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, overrides or [], batches)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval {result['checkpoint']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("step", "val_loss", "perplexity", "bits_per_byte", "tokens", "tokens_per_s"):
        v = result.get(key)
        table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
