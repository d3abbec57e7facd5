"""`kaggletrain push`, `status` and `pull`: train on Kaggle's GPUs and bring the run home.

The `kaggle` client is never imported here (it authenticates and prints at import); kaggletrain.kaggle.api
runs it in a worker process with a deadline. See docs/kaggle.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kaggletrain.cli import app
from kaggletrain.errors import KaggleError, KaggletrainError

_out = Console(highlight=False, soft_wrap=True)


def _owner(explicit: str | None) -> str:
    if explicit:
        return explicit
    from kaggletrain.kaggle.credentials import WHERE, find_credentials

    creds = find_credentials()
    if creds.username:
        return creds.username
    if creds.found:  # an access token alone: the server knows whose it is
        from kaggletrain.kaggle import api

        user = api.call("whoami", {}).get("username")
        if user:
            return user
    raise KaggleError(f"cannot tell your Kaggle user name: pass --owner USER, or {WHERE}")


def _kernel(ref: str) -> str:
    """Normalise REF (owner/slug[/version], a kaggle.com/code URL, or a bare slug of your own)."""
    from kaggletrain.kaggle.metadata import parse_kernel_ref

    if "/" not in ref.strip():
        ref = f"{_owner(None)}/{ref.strip()}"
    owner, slug, version = parse_kernel_ref(ref)
    return f"{owner}/{slug}" + (f"/{version}" if version else "")


@app.command()
def push(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.max_steps=2000."),
    title: Optional[str] = typer.Option(None, help="Kernel title, 5-50 characters (default: 'kaggletrain <name>')."),
    accelerator: str = typer.Option(
        "NvidiaTeslaT4", help="NvidiaTeslaT4 (T4 x2), NvidiaL4, NvidiaL4X1, NvidiaTeslaA100, NvidiaH100, "
        "NvidiaRtxPro6000 or None (CPU)."),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="Attach a dataset owner/slug (repeat)."),
    private: bool = typer.Option(True, "--private/--public", help="Kernel visibility."),
    internet: bool = typer.Option(True, "--internet/--no-internet",
                                  help="Internet in the session (off: dependencies come from a wheels dataset)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the kernel folder, push nothing."),
    out: Optional[Path] = typer.Option(None, help="Kernel folder (default: kaggle-kernels/<slug>)."),
    owner: Optional[str] = typer.Option(None, help="Kaggle user name (default: from your credentials)."),
    rehearse: bool = typer.Option(False, "--rehearse", help="Run the notebook locally as Kaggle will, as a dry "
                                  "run of a few steps (speed, memory, projected cost); push nothing."),
    rehearse_steps: int = typer.Option(10, min=2, help="Training steps of a --rehearse run."),
    timeout: Optional[float] = typer.Option(None, min=1, help="Seconds to wait for the Kaggle API (default 60)."),
) -> None:
    """Build a Kaggle notebook kernel that trains CONFIG, and push it."""
    from kaggletrain.config import load_config
    from kaggletrain.kaggle.kernel import local_paths, make_spec, write_kernel
    from kaggletrain.kaggle.metadata import slugify

    cfg = load_config(config, overrides=list(overrides or []))
    # A dry run or rehearsal needs no account; a placeholder owner keeps the id well formed.
    who = owner or (None if (dry_run or rehearse) else _owner(None))
    if who is None:
        from kaggletrain.kaggle.credentials import find_credentials

        who = find_credentials().username or "your-kaggle-username"
    spec = make_spec(cfg, owner=who, title=title, accelerator=accelerator, datasets=list(dataset or []),
                     private=private, internet=internet)
    folder = write_kernel(cfg, spec, out or Path("kaggle-kernels") / slugify(spec.title))
    size_kb = folder.notebook.stat().st_size / 1000
    _out.print(f"wrote {folder.path} ({folder.notebook.name}, {size_kb:.0f} KB; {spec.accelerator.label}, "
               f"{'private' if spec.private else 'public'}, internet {'on' if spec.internet else 'off'}"
               + (f", datasets {', '.join(spec.datasets)}" if spec.datasets else "") + ")")
    for w in folder.warnings:
        _out.print(f"[yellow]warning:[/] {w}")
    if rehearse:
        from kaggletrain.kaggle.rehearse import rehearse as run_rehearsal

        _out.print(f"rehearsing: the notebook runs locally as on Kaggle, training as a {rehearse_steps}-step dry run")
        r = run_rehearsal(folder, local_paths(cfg), folder.path / "rehearsal", rehearse_steps)
        _out.print(r.report.rstrip(), markup=False)
        _out.print(f"rehearsal passed in {r.seconds:.0f} s (executed notebook: {r.executed}); push without "
                   "--rehearse to run it on Kaggle")
        return
    if dry_run:
        _out.print(f"dry run: nothing pushed. Push later with: kaggle kernels push -p {folder.path}")
        return
    from kaggletrain.kaggle import api

    result = api.push(folder.path, spec.ref, timeout)
    version = f" version {result['version']}" if result.get("version") else ""
    _out.print(f"pushed {spec.ref}{version}: {result.get('url') or ''}")
    _out.print(f"follow: kaggletrain status {spec.ref} --wait    fetch: kaggletrain pull {spec.ref} --out .")


@app.command()
def status(
    ref: str = typer.Argument(..., help="Kernel: owner/slug (or a kaggle.com/code URL)."),
    wait: bool = typer.Option(False, "--wait", help="Poll until the run completes or fails."),
    interval: float = typer.Option(30.0, min=0.1, help="Seconds between polls with --wait."),
    timeout: Optional[float] = typer.Option(None, min=1, help="Seconds to wait for each API call (default 60)."),
) -> None:
    """Show a pushed kernel's state: queued, running, complete or error (with the failure message).
    Exits 1 when the run failed."""
    from kaggletrain.kaggle import api

    kernel = _kernel(ref)
    last = None
    while True:
        st = api.status(kernel, timeout)
        if st["status"] != last:
            line = f"{kernel}: {st['status']}"
            if st.get("failure_message"):
                line += f": {st['failure_message']}"
            _out.print(line)
            last = st["status"]
        if not wait or st["status"] in api.TERMINAL:
            break
        time.sleep(interval)
    if st["status"] in ("error", "cancel_acknowledged"):
        raise SystemExit(1)


@app.command()
def pull(
    ref: str = typer.Argument(..., help="Kernel: owner/slug (or a kaggle.com/code URL)."),
    out: Path = typer.Option(Path("."), help="Where to put the outputs (runs/<name>/ lands under it)."),
    pattern: Optional[str] = typer.Option(None, help="Only files whose name matches this regex."),
    timeout: Optional[float] = typer.Option(None, min=1, help="Seconds for the whole download (default 600)."),
) -> None:
    """Download a kernel's outputs: checkpoints, metrics, loss plot, config and log of each run."""
    from kaggletrain.kaggle import api

    kernel = _kernel(ref)
    files = api.output(kernel, out, pattern, timeout if timeout is not None else api.default_timeout(600.0))
    _out.print(f"{kernel}: {len(files)} files into {out}")
    runs = sorted({Path(f).parent for f in files if Path(f).name in ("config.yaml", "metrics.jsonl")})
    for run in runs:
        _print_local_run(run)


def _print_local_run(run: Path) -> None:
    """Point the pulled run's configs back at the local data, and say how to evaluate and resume it."""
    from rich.markup import escape

    from kaggletrain.kaggle.pulled import localize_run

    try:
        local = localize_run(run)
    except KaggletrainError as e:  # the download stands; only the config could not be made local
        _out.print(f"  run {run}: [yellow]warning:[/] its config was left as pulled: {escape(str(e))}")
        return
    if local is None:
        _out.print(f"  run {run}: its config.yaml was not pulled (--pattern), so it cannot be evaluated or "
                   "resumed; pull it too")
        return
    if not any((run / "checkpoints").glob("step-*")):
        _out.print(f"  run {run}: no checkpoint pulled, nothing to evaluate or resume")
        return
    for key, value in local.missing.items():
        how = ("is not on this machine" if local.recorded else
               "is the Kaggle path (the notebook predates saving the local one)")
        _out.print(f"  run {run}: {key} {escape(value)} {how}: add {key}=PATH, where that data is here, to the "
                   "commands below")
    fix = "".join(f" {key}=PATH" for key in local.missing)
    _out.print(f"  run {run}: evaluate: kaggletrain eval {run}{fix}")
    _out.print(f"  run {run}: resume:   kaggletrain train {run / 'config.yaml'} checkpoint.resume=true{fix}")
