"""Run a generated kernel notebook locally, the way Kaggle will, before spending GPU quota on it.

The very notebook that would be pushed is executed with nbclient. A scratch folder stands in for Kaggle:
`input/datasets/<owner>/<slug>/` holds links to the local data (as the attached dataset would), `working/`
is the output folder. The one change: KAGGLETRAIN_TRAIN_ARGS makes the notebook's training command a dry run
(`kaggletrain train ... --dry-run --steps N`, issue 11), so the rehearsal runs the real set-up, data search,
launch and training path for a few steps and reports speed, memory and the projected cost of the whole run,
leaving no run behind.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kaggletrain.errors import KaggleError
from kaggletrain.kaggle.kernel import KernelFolder
from kaggletrain.kaggle.kernel_runtime import INPUT_ENV, TRAIN_ARGS_ENV, WORKING_ENV

PKG_ENV = "KAGGLETRAIN_KAGGLE_PKG"


@dataclass
class Rehearsal:
    workdir: Path
    working: Path
    executed: Path  # the executed notebook, outputs included
    seconds: float
    report: str  # what the training cell printed (the dry-run report)


def stage_inputs(local: dict[str, str], dataset: str, input_root: Path) -> None:
    """Link each local path into input/datasets/<owner>/<slug>/, laid out as `kaggle datasets create` makes it:
    a file, a glob's matches and a binidx pair (.bin + .idx, from the prefix or either file) by name; a folder
    as its files at the dataset root when it is the only input (`-p FOLDER`), else by name."""
    owner, _, slug = dataset.partition("/")
    target = input_root / "datasets" / owner / slug
    target.mkdir(parents=True, exist_ok=True)
    for key, value in local.items():
        path = Path(os.path.expanduser(value.rstrip("/") or value))
        if any(c in value for c in "*?["):
            existing = [Path(m) for m in glob.glob(os.path.expanduser(value), recursive=True)]
        elif path.is_dir():
            existing = sorted(path.iterdir()) if len(local) == 1 else [path]
        elif path.suffix in (".bin", ".idx") or (not path.exists() and Path(f"{path}.bin").exists()):
            prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
            existing = [p for p in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx")) if p.exists()]
        else:
            existing = [path] if path.exists() else []
        if not existing:
            raise KaggleError(f"{key}: {value} does not exist locally, so it cannot be rehearsed")
        for m in existing:
            link = target / m.name
            if not link.exists():
                link.symlink_to(m.resolve(), target_is_directory=m.is_dir())


def rehearse(kernel: KernelFolder, local: dict[str, str], workdir: Path, steps: int,
             timeout: float = 1800) -> Rehearsal:
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError:
        raise KaggleError("--rehearse runs the notebook with nbclient: pip install nbclient ipykernel") from None

    workdir = workdir.resolve()  # the notebook runs in working/: relative roots would point elsewhere
    if workdir.exists():
        shutil.rmtree(workdir)  # a rehearsal always starts from an empty Kaggle
    input_root, working = workdir / "input", workdir / "working"
    input_root.mkdir(parents=True)
    working.mkdir()
    if local:
        stage_inputs(local, kernel.spec.datasets[0] if kernel.spec.datasets else "local/data", input_root)
    env = dict(os.environ)
    env.update({INPUT_ENV: str(input_root), WORKING_ENV: str(working), PKG_ENV: str(workdir / "pkg"),
                TRAIN_ARGS_ENV: f"--dry-run --steps {steps}"})
    nb = nbformat.read(kernel.notebook, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(working)}})
    executed = workdir / "executed.ipynb"
    started = time.monotonic()
    try:
        client.execute(env=env, cwd=str(working))
    except CellExecutionError as e:
        nbformat.write(nb, executed)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # tracebacks come colourised
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["cell failed"]
        raise KaggleError(f"rehearsal failed: {last[0]} (executed notebook: {executed})") from None
    nbformat.write(nb, executed)
    train_cell = next(c for c in nb.cells if "kr.run_training(" in c.get("source", ""))
    report = "".join(o.get("text", "") for o in train_cell.get("outputs", []) if o.get("output_type") == "stream")
    return Rehearsal(workdir, working, executed, time.monotonic() - started, report)
