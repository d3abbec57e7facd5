"""`kaggletrain bench [SUITES...]`: measure speed and memory on this machine (see kaggletrain/bench/)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import List, Optional

import typer

from kaggletrain.cli import app

SUITES = ("wkv", "train", "optim", "infer", "context")


@app.command("bench")
def bench(
    suites: Optional[List[str]] = typer.Argument(
        None, help=f"Suites to run (default: all): {', '.join(SUITES)}."),
    quick: bool = typer.Option(False, "--quick", help="Smallest sizes and few repeats: a smoke test in seconds."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto (cuda when a GPU is visible)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for bench.json and one PNG chart per suite."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON results to stdout (tables go to stderr)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="CPU threads for torch (default: torch's choice)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="Timed runs per measurement "
                                          "(default 3 on CPU, 5 on GPU)."),
    compile: bool = typer.Option(False, "--compile", help="Train suite: compile the model as train.compile does "
                                 "(CUDA only; the warm-up runs include the compilation)."),
):
    """Benchmark the WKV operator, training steps, the optimisation switches, inference and long context.

    Prints one table per suite and writes OUT/bench.json (machine, settings, every measurement) and
    OUT/<suite>.png. Exits 1 if a measurement failed."""
    from rich.console import Console

    from kaggletrain.errors import KaggletrainError

    chosen = list(dict.fromkeys(suites or SUITES))
    unknown = [s for s in chosen if s not in SUITES]
    if unknown:
        raise KaggletrainError(f"unknown suite {unknown[0]!r}; expected some of: {', '.join(SUITES)}")
    import torch

    from kaggletrain.bench.runner import failures, resolve_device, run_suites

    dev = resolve_device(device)
    if compile and dev.type != "cuda":
        raise KaggletrainError(f"--compile needs a CUDA device (got device '{dev.type}'), as train.compile does")
    if threads is not None:
        torch.set_num_threads(threads)
    from kaggletrain.bench.report import render

    command = " ".join(["kaggletrain bench", *chosen, *(["--quick"] if quick else []), "--device", device,
                        *([f"--threads {threads}"] if threads else []), *([f"--repeats {repeats}"] if repeats else []),
                        *(["--compile"] if compile else []), "--out", shlex.quote(str(out))])
    doc = run_suites(chosen, device=dev, quick=quick, out_dir=out, repeats=repeats, command=command,
                     compile=compile)
    console = Console(stderr=json_out)
    if not console.is_terminal:
        console.width = 160  # a log file: rich's default of 80 columns would wrap every table cell
    render(doc, console)
    console.print(f"wrote {out / 'bench.json'}")
    if json_out:
        typer.echo(json.dumps(doc, indent=1))
    failed = failures(doc)
    for f in failed:
        console.print(f"[red]failed:[/] {f}", highlight=False)
    if failed:
        raise typer.Exit(code=1)
