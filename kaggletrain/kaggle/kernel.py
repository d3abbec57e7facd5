"""Build a kernel folder (`kernel-metadata.json` + the notebook) from a run config.

Order matters: everything that can be wrong with the inputs (accelerator, title, datasets, batch split over
the GPUs, local data without a dataset) is checked before anything is written, and the written folder is
validated again exactly as `kaggle kernels push` will read it, before any network call.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import kaggletrain
from kaggletrain.errors import KaggleError
from kaggletrain.kaggle.bundle import build_bundle
from kaggletrain.kaggle.metadata import (
    METADATA_FILE,
    KernelSpec,
    check_ref,
    metadata_problems,
    resolve_accelerator,
    slugify,
    validate_folder,
)
from kaggletrain.kaggle.notebook import build_notebook, dumps


@dataclass
class KernelFolder:
    path: Path
    spec: KernelSpec
    notebook: Path
    warnings: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return self.spec.ref


def default_title(run_name: str) -> str:
    return f"kaggletrain {run_name}"[:50].strip()


def local_paths(cfg) -> dict[str, str]:
    """Config keys whose values are local files that must come from datasets on Kaggle. A folder gets a
    trailing '/': the notebook's data search then also accepts a dataset made from the folder itself."""
    found = {}
    if cfg.data.source and cfg.data.source != "builtin":
        found["data.source"] = cfg.data.source
    if cfg.data.val_source:
        found["data.val_source"] = cfg.data.val_source
    init_from = cfg.model.get("init_from") if hasattr(cfg.model, "get") else None
    if init_from:
        found["model.init_from"] = str(init_from)
    return {k: v.rstrip("/") + "/" if os.path.isdir(os.path.expanduser(v)) else v for k, v in found.items()}


def _warnings(cfg, spec: KernelSpec) -> list[str]:
    out = []
    if spec.accelerator.shape == "NvidiaTeslaT4" and cfg.train.precision == "bf16":
        out.append("train.precision is bf16 but a T4 has no bf16 tensor cores; precision auto uses fp16 with "
                   "gradient scaling there")
    if not spec.internet and not spec.datasets:
        out.append("internet is off and no dataset is attached: missing dependencies cannot be installed")
    if spec.accelerator.note and "competition" in spec.accelerator.note:
        out.append(f"{spec.accelerator.shape} is {spec.accelerator.note}")
    return out


def make_spec(cfg, *, owner: str, title: str | None, accelerator: str | None, datasets: list[str],
              private: bool, internet: bool) -> KernelSpec:
    """Validate the user's choices and return the kernel spec (raises KaggleError/ConfigError)."""
    acc = resolve_accelerator(accelerator)
    for d in datasets:
        check_ref(d, "dataset")
    title = (title if title is not None else default_title(cfg.name)).strip()
    spec = KernelSpec(owner=owner, title=title, code_file="", accelerator=acc, datasets=list(dict.fromkeys(datasets)),
                      private=private, internet=internet)
    spec.code_file = f"{slugify(title) or 'kernel'}.ipynb"
    problems = metadata_problems(spec.to_metadata())
    if problems:
        raise KaggleError("; ".join(problems))
    # Under torchrun each GPU is one process: the batch must split evenly before we spend GPU quota.
    cfg.validate_for_world_size(max(1, acc.gpus))
    paths = local_paths(cfg)
    if paths and not spec.datasets:
        first = next(iter(paths.items()))
        raise KaggleError(
            f"{first[0]} is a local path ({first[1]}); Kaggle cannot see your files: upload them as a Kaggle "
            "dataset (kaggle datasets create) and attach it with --dataset owner/slug"
        )
    return spec


def write_kernel(cfg, spec: KernelSpec, out_dir: Path, extra_overrides: list[str] | None = None,
                 note: str = "") -> KernelFolder:
    """Write kernel-metadata.json and the notebook into out_dir, then validate the folder as pushed."""
    paths = local_paths(cfg)
    nb = build_notebook(
        title=spec.title, ref=spec.ref, bundle=build_bundle(), version=kaggletrain.__version__, run_name=cfg.name,
        config=cfg.to_dict(), path_settings=paths, datasets=spec.datasets, internet=spec.internet,
        accelerator_label=spec.accelerator.label, extra_overrides=extra_overrides, note=note,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    nb_path = out_dir / spec.code_file
    nb_path.write_text(dumps(nb), encoding="utf-8")
    (out_dir / METADATA_FILE).write_text(json.dumps(spec.to_metadata(), indent=2) + "\n", encoding="utf-8")
    validate_folder(out_dir)
    return KernelFolder(out_dir, spec, nb_path, _warnings(cfg, spec))
