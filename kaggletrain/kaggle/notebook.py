"""The generated `.ipynb`: set-up, data search and a training launch, carrying everything it needs.

Cells, in order (each short, so a failure on Kaggle points at one obvious step):
1. markdown: what this is and how it was made
2. the embedded kaggletrain bundle (base64 zip) and the resolved config
3. unpack the bundle outside /kaggle/working (so it does not become output) and load kernel_runtime
4. dependencies: pip from the internet, or wheels found under /kaggle/input when internet is off
5. data: find the config's local paths among the attached datasets
6. launch training as a subprocess (torchrun over every GPU when there are several)
7. list what was produced

The notebook never contains credentials: it needs none (datasets are mounted by Kaggle).
"""

from __future__ import annotations

import json
import pprint

from kaggletrain.kaggle.bundle import Bundle

# Import name -> requirement; mirrors pyproject's dependencies (tests/test_kaggle_notebook.py checks it).
REQUIRED = {
    "torch": "torch>=2.4",
    "typer": "typer>=0.12",
    "yaml": "pyyaml>=6",
    "rich": "rich>=13",
    "numpy": "numpy>=1.24",
    "safetensors": "safetensors>=0.4",
    "filelock": "filelock>=3.12",
    "psutil": "psutil>=5.9",
}
# Wanted but not fatal: ninja only builds the CUDA WKV kernel (there is a fallback), matplotlib the loss plot.
OPTIONAL = {"ninja": "ninja>=1.11", "matplotlib": "matplotlib>=3.7"}
# Required too when data.tokenizer is world: its vocabulary ships in this package (pyproject's `world` extra);
# Kaggle images do not have it.
WORLD = {"pyrwkv_tokenizer": "pyrwkv-tokenizer>=0.1"}


def requirements(config: dict) -> dict[str, str]:
    """What the run needs installed: REQUIRED, plus the World vocabulary's package for a world tokenizer."""
    world = (config.get("data") or {}).get("tokenizer") == "world"
    return {**REQUIRED, **(WORLD if world else {})}

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _code(source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
            "source": source.strip("\n")}


def _markdown(source: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": source.strip("\n")}


_UNPACK = '''
# Unpack the embedded kaggletrain sources to a temporary folder (not /kaggle/working: that is the output).
import base64, hashlib, importlib.util, io, os, sys, tempfile, zipfile
from pathlib import Path

_raw = base64.b64decode(KAGGLETRAIN_BUNDLE)
if hashlib.sha256(_raw).hexdigest() != KAGGLETRAIN_SHA256:
    raise RuntimeError("the embedded kaggletrain bundle is damaged; regenerate the notebook with kaggletrain push")
PKG_ROOT = Path(os.environ.get("KAGGLETRAIN_KAGGLE_PKG") or tempfile.gettempdir())
PKG_DIR = PKG_ROOT / f"kaggletrain-{KAGGLETRAIN_SHA256[:12]}"
with zipfile.ZipFile(io.BytesIO(_raw)) as _zf:
    _zf.extractall(PKG_DIR)
sys.path.insert(0, str(PKG_DIR))
# kernel_runtime is standard-library only; load it by path so nothing else is imported before set-up.
_spec = importlib.util.spec_from_file_location(
    "kaggletrain_kernel_runtime", PKG_DIR / "kaggletrain" / "kaggle" / "kernel_runtime.py")
kr = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(kr)
PATHS = kr.Paths.from_env()
print(f"kaggletrain {KAGGLETRAIN_VERSION} unpacked to {PKG_DIR}; input: {PATHS.input}; output: {PATHS.working}")
'''

_DEPS = '''
# Install missing dependencies (torch comes with the Kaggle image and is never replaced).
kr.ensure_dependencies(REQUIRED, OPTIONAL, internet=INTERNET, input_root=PATHS.input)
'''

_DATA = '''
import json

# Find the config's data among the attached datasets (mount points differ between images: search).
RUN_DIR = PATHS.working / "runs" / RUN_NAME
overrides = [
    f"out_dir={RUN_DIR}",
    f"data.cache_dir={PKG_DIR.parent / 'kaggletrain-tokens'}",  # token cache: not an output
    "logging.progress=false",  # plain log lines read better in the notebook's output
]
for key, local in PATH_SETTINGS.items():
    found = kr.locate_data(local, DATASETS, PATHS.input, key)
    print(f"{key}: {local} -> {found}")
    overrides.append(f"{key}={found}")
# The config's own values of what is overridden here, saved with the outputs: `kaggletrain pull` puts them back.
kr.record_local_values(RUN_DIR, CONFIG, overrides)
CONFIG_PATH = PKG_DIR / "run-config.yaml"
CONFIG_PATH.write_text(json.dumps(CONFIG, indent=1), encoding="utf-8")  # JSON is YAML too
'''

_TRAIN = '''
# Train in a subprocess; with several GPUs (T4 x2) torchrun starts one process per GPU.
# precision: auto picks fp16 with gradient scaling on a T4, bf16 on L4/A100/H100.
nproc = kr.gpu_count()
print(f"GPUs: {nproc}")
kr.run_training(kr.launch_command(CONFIG_PATH, overrides + EXTRA_OVERRIDES, nproc), PKG_DIR, PATHS.working)
'''

_SUMMARY = '''
# Outputs: everything under /kaggle/working (fetch with `kaggletrain pull OWNER/SLUG --out DIR`).
runs = kr.summarize(PATHS.working)
'''


def build_notebook(*, title: str, ref: str, bundle: Bundle, version: str, run_name: str, config: dict,
                   path_settings: dict[str, str], datasets: list[str], internet: bool, accelerator_label: str,
                   extra_overrides: list[str] | None = None, note: str = "") -> dict:
    """The notebook as an nbformat-4 dict. Everything variable is a literal in the settings cell."""
    config_text = pprint.pformat(config, sort_dicts=False, width=110)
    settings = "\n".join([
        "# Settings written by `kaggletrain push` (edit and re-run to change the run).",
        f"RUN_NAME = {run_name!r}",
        f"INTERNET = {internet!r}",
        f"DATASETS = {datasets!r}",
        f"PATH_SETTINGS = {path_settings!r}  # config keys holding local paths -> searched under the input",
        f"EXTRA_OVERRIDES = {list(extra_overrides or [])!r}",
        f"REQUIRED = {requirements(config)!r}",
        f"OPTIONAL = {OPTIONAL!r}",
        "# The resolved run config (kaggletrain train reads it as YAML; edit freely).",
        f"CONFIG = {config_text}",
        f"KAGGLETRAIN_VERSION = {version!r}",
        f"KAGGLETRAIN_SHA256 = {bundle.sha256!r}",
        f"# kaggletrain sources ({len(bundle.files)} files, zip, base64)",
        f"KAGGLETRAIN_BUNDLE = {bundle.b64!r}",
    ])
    intro = (
        f"# {title}\n\n"
        f"Trains the kaggletrain run `{run_name}` on {accelerator_label}. Generated by `kaggletrain push` "
        f"(kaggletrain {version}); the package and the resolved config are embedded below, so this notebook "
        f"needs nothing else.\n\n"
        f"Follow it with `kaggletrain status {ref}` and fetch the run with `kaggletrain pull {ref} --out .`."
        + (f"\n\n{note}" if note else "")
    )
    cells = [_markdown(intro), _code(settings), _code(_UNPACK), _code(_DEPS), _code(_DATA), _code(_TRAIN),
             _code(_SUMMARY)]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": dict(KERNELSPEC),  # papermill (which runs pushed notebooks) needs it
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def dumps(nb: dict) -> str:
    # nbformat 4.5 wants cell ids; deterministic ones keep the same config producing the same notebook.
    # indent=1 keeps it readable in a diff; the embedded bundle dominates the size either way.
    for i, cell in enumerate(nb["cells"]):
        cell.setdefault("id", f"cell-{i}")
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
