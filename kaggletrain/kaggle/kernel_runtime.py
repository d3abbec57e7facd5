"""What a generated notebook runs on Kaggle: paths, dependencies, data search, GPU count, training launch.

Standard library only, and loaded by file path from the unpacked bundle, because it runs *before* the
dependencies are known to be installed (importing the kaggletrain package could pull in any of them).
Kept as a real module rather than strings in the notebook so it is read, linted and tested like other code.

Roots are overridable (KAGGLETRAIN_KAGGLE_INPUT, KAGGLETRAIN_KAGGLE_WORKING) so tests and
`kaggletrain push --rehearse` run the very same notebook on a laptop.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

INPUT_ENV, WORKING_ENV = "KAGGLETRAIN_KAGGLE_INPUT", "KAGGLETRAIN_KAGGLE_WORKING"
NPROC_ENV, TRAIN_ARGS_ENV = "KAGGLETRAIN_NPROC", "KAGGLETRAIN_TRAIN_ARGS"
# In each run directory: the pushed config's values that the notebook's overrides replaced (read by `pull`).
LOCAL_VALUES_FILE = "kaggle_local_values.json"


@dataclass(frozen=True)
class Paths:
    input: Path  # read-only datasets (/kaggle/input)
    working: Path  # everything here becomes the kernel's output (/kaggle/working)

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(Path(os.environ.get(INPUT_ENV) or "/kaggle/input"),
                   Path(os.environ.get(WORKING_ENV) or "/kaggle/working"))


# ---------------------------------------------------------------- dependencies

def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _satisfied(module: str, requirement: str) -> bool:
    """Importable, and at least the `>=` version in `requirement` when the distribution says its version."""
    if importlib.util.find_spec(module) is None:
        return False
    m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement)
    if not m:
        return True
    try:
        return _version_tuple(importlib.metadata.version(m.group(1))) >= _version_tuple(m.group(2))
    except importlib.metadata.PackageNotFoundError:
        return True  # importable but unregistered (vendored): trust it


def find_wheel_dirs(input_root: Path, max_depth: int = 6) -> list[Path]:
    """Directories under the input root holding .whl files (a 'wheels' dataset attached to the kernel)."""
    found = []
    root_depth = len(input_root.parts)
    for dirpath, dirnames, filenames in os.walk(input_root, followlinks=True):
        if len(Path(dirpath).parts) - root_depth >= max_depth:
            dirnames[:] = []
        if any(f.endswith(".whl") for f in filenames):
            found.append(Path(dirpath))
    return sorted(found)


def ensure_dependencies(required: dict[str, str], optional: dict[str, str], internet: bool,
                        input_root: Path) -> None:
    """Install what is missing: from PyPI with internet, else from wheels found under the input root.

    torch is never installed here: Kaggle's image brings a CUDA build matched to its driver, and a pip
    torch would replace it with one that may not be.
    """
    missing = {m: r for m, r in {**required, **optional}.items() if m != "torch" and not _satisfied(m, r)}
    if "torch" in required and importlib.util.find_spec("torch") is None:
        raise RuntimeError("PyTorch is not installed in this image; pick a Kaggle image with PyTorch")
    if missing:
        print("installing:", " ".join(missing.values()), flush=True)
        if internet:
            cmd = [sys.executable, "-m", "pip", "install", "-q", *missing.values()]
        else:
            wheel_dirs = find_wheel_dirs(input_root)
            links = [arg for d in wheel_dirs for arg in ("--find-links", str(d))]
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", *links, *missing.values()]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-2000:], sep="\n", flush=True)
        importlib.invalidate_caches()
    still = [r for m, r in required.items() if not _satisfied(m, r)]
    if still:
        how = ("pip could not install them (see above)" if internet else
               "internet is off: attach a dataset of wheels (pip download " + " ".join(still) +
               " -d wheels, then upload the folder) with --dataset, or push with --internet")
        raise RuntimeError(f"missing dependencies: {', '.join(still)}; {how}")
    for m, r in optional.items():
        if not _satisfied(m, r):
            print(f"note: optional {r} unavailable; the run goes on without it", flush=True)


# ---------------------------------------------------------------- data

def dataset_roots(datasets: list[str], input_root: Path) -> list[Path]:
    """Where each attached dataset is mounted. Current images use input/datasets/<owner>/<slug>/, older
    ones input/<slug>/; we try both and then search a few levels deep by slug rather than trust either."""
    roots: list[Path] = []
    for ref in datasets:
        owner, _, slug = ref.partition("/")
        candidates = [input_root / "datasets" / owner / slug, input_root / slug, input_root / "datasets" / slug]
        hit = next((c for c in candidates if c.is_dir()), None)
        if hit is None:
            for dirpath, dirnames, _ in os.walk(input_root, followlinks=True):
                if len(Path(dirpath).relative_to(input_root).parts) >= 3:
                    dirnames[:] = []
                if slug in dirnames:
                    hit = Path(dirpath) / slug
                    break
        if hit is None:
            print(f"warning: dataset {ref} is not mounted under {input_root}", flush=True)
        elif hit not in roots:
            roots.append(hit)
    return roots


def _listing(root: Path, depth: int = 3, limit: int = 40) -> str:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = Path(dirpath).relative_to(root)
        if len(rel.parts) >= depth:
            dirnames[:] = []
        items += [str(rel / n) for n in sorted(dirnames) + sorted(filenames)]
        if len(items) > limit:
            break
    return ", ".join(items[:limit]) or "(empty)"


def locate_data(source: str, datasets: list[str], input_root: Path, key: str = "data.source") -> str:
    """Map the config's local path `source` (file, folder, glob or binidx prefix) to the same data under the
    input root.

    The basename (or the glob's last part) is searched for inside the attached datasets, or the whole input
    root when none are listed. A binidx prefix `data/corpus` is found as corpus.bin beside corpus.idx. A folder
    (written with a trailing '/' by `kaggletrain push`) may also be a dataset itself: `kaggle datasets create
    -p corpus` puts the folder's files at the dataset's root, which is used when no folder of that name is in
    it. `builtin` needs no data. Returns the path or glob to pass as `key`.
    """
    if source == "builtin" or source.startswith("builtin:"):
        return source
    if source.startswith("/kaggle/input/"):  # already a Kaggle path: only re-root it (tests, rehearsals)
        rerooted = str(input_root / source[len("/kaggle/input/"):])
        if any(Path(p).exists() for p in _glob(rerooted)):
            return rerooted
    pattern = Path(source.rstrip("/")).name
    is_glob = any(c in source for c in "*?[")
    folder = source.endswith("/")
    dataset_dirs = dataset_roots(datasets, input_root)
    roots = dataset_dirs or [input_root]
    matches: list[Path] = []
    prefixes: list[Path] = []  # binidx: <pattern>.bin with its .idx beside it
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            names = dirnames if folder else filenames + dirnames
            matches += [Path(dirpath) / n for n in sorted(names) if fnmatch.fnmatch(n, pattern)]
            if not is_glob and f"{pattern}.bin" in filenames and f"{pattern}.idx" in filenames:
                prefixes.append(Path(dirpath) / pattern)
    if not matches and prefixes:
        matches = prefixes
    if not matches and folder:
        matches = [r for r in dataset_dirs if any(r.iterdir())][:1]
        if matches:
            print(f"note: no folder named {pattern!r} in the datasets; using the dataset {matches[0]} as the "
                  "folder (its files are what `kaggle datasets create -p FOLDER` uploaded)", flush=True)
    if not matches:
        where = "; ".join(f"{r}: {_listing(r)}" for r in roots)
        raise FileNotFoundError(f"{key} {source!r}: nothing named {pattern!r} under {where}")
    if is_glob:
        dirs = sorted({m.parent for m in matches if m.is_file()} or {matches[0].parent})
        if len(dirs) > 1:
            print(f"note: {pattern!r} matches in {len(dirs)} folders; using {dirs[0]}", flush=True)
        return str(dirs[0] / pattern)
    if len(matches) > 1:
        print(f"note: {len(matches)} entries named {pattern!r}; using {matches[0]}", flush=True)
    return str(matches[0])


def record_local_values(run_dir: Path, config: dict, overrides: list[str]) -> Path:
    """Write LOCAL_VALUES_FILE into the run directory: for each `key=value` override, the pushed config's own
    value of `key` (the local data paths, the token cache...). Written before training, so it is among the
    outputs even when the session is cut short; `kaggletrain pull` puts these values back."""
    local = {}
    for item in overrides:
        key = item.partition("=")[0]
        node = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            local[key] = node
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCAL_VALUES_FILE
    path.write_text(json.dumps(local, indent=1) + "\n", encoding="utf-8")
    return path


def _glob(pattern: str) -> list[str]:
    import glob

    return glob.glob(pattern) or [pattern]


# ---------------------------------------------------------------- launch

def gpu_count() -> int:
    """GPUs visible to a child process. Asked in a subprocess so this notebook's own process never
    initialises CUDA (the training processes own the GPUs)."""
    if os.environ.get(NPROC_ENV):
        return int(os.environ[NPROC_ENV])
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if out.returncode == 0:
            return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    if sys.platform.startswith("linux") and not os.path.exists("/dev/nvidiactl"):
        return 0  # no NVIDIA driver device: CUDA cannot see a GPU (and asking torch costs seconds)
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def launch_command(config_path: Path, overrides: list[str], nproc: int) -> list[str]:
    """`python -m kaggletrain train ...`, under torchrun when there is more than one GPU (T4 x2)."""
    extra = shlex.split(os.environ.get(TRAIN_ARGS_ENV, ""))
    train = ["-m", "kaggletrain", "train", str(config_path), *overrides, *extra]
    if nproc > 1:
        # python -m torch.distributed.run is torchrun without relying on the script being on PATH.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *train]
    return [sys.executable, *train]


def run_training(cmd: list[str], pkg_dir: Path, cwd: Path) -> None:
    """Run training as a child process and stream its output; raise (failing the Kaggle run) if it fails.

    A subprocess rather than an in-notebook call: torchrun needs its own processes, a crash in training
    cannot take the notebook kernel down with it, and GPU memory is returned when it exits.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(pkg_dir), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    cwd.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(cmd), flush=True)
    tail: list[str] = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.strip(" ^~\n"):  # keep traceback text, not its caret underlines
                tail = (tail + [line.strip()])[-60:]
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"training exited with code {code}: {failure_summary(tail)}")


# (a dry run's report ends with "the real run would stop: ..." when it exits 3: a rehearsal's failure)
_ERROR_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(error:|the real run would stop:|[\w.]*(Error|Exception)\b:?)")


def failure_summary(lines: list[str]) -> str:
    """The first error-looking line of a failed run's output (the cause, usually: under torchrun the last
    lines are the launcher's own report), else its last lines. Becomes the Kaggle run's failure message."""
    for line in lines:
        if _ERROR_LINE.match(line) and "ChildFailedError" not in line:
            return line
    return " | ".join(lines[-3:]) or "no output"


def summarize(working: Path) -> list[Path]:
    """Print and return the run directories (those holding checkpoints/ or metrics.jsonl) under working."""
    runs = sorted({p.parent for p in working.rglob("metrics.jsonl")} |
                  {p.parent for p in working.rglob("checkpoints") if p.is_dir()})
    for run in runs:
        files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
        print(f"{run}: {len(files)} files: {', '.join(files[:12])}{' ...' if len(files) > 12 else ''}")
    if not runs:
        print(f"no run directory found under {working}")
    return runs
