"""`kaggletrain export CHECKPOINT --format rwkv|safetensors --dtype bf16|fp16|fp32 --output PATH`."""

from __future__ import annotations

from pathlib import Path

import typer

from kaggletrain.cli import app


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="Official .pth, kaggletrain checkpoint/run directory, or .safetensors."),
    fmt: str = typer.Option("rwkv", "--format", "-f",
                               help="rwkv: official .pth for the rwkv package / RWKV tools; safetensors: .safetensors."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 (as official releases), fp16 or fp32."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write (.pth for rwkv, .safetensors)."),
):
    """Export a checkpoint. Learnable states, if any, go to <output name>.states.<ext> next to it (an earlier
    export's states file there is removed when the model has none)."""
    from kaggletrain.interop import export_checkpoint

    for path in export_checkpoint(checkpoint, output, format=fmt, dtype=dtype):
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
