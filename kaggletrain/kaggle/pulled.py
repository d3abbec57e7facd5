"""Make a run pulled from Kaggle a local run again, so `eval` and a resume read your data, not Kaggle's.

On Kaggle the notebook trains with overrides (data paths under /kaggle/input, the token cache under /tmp,
out_dir under /kaggle/working), so the run's config.yaml and each checkpoint's run_config.yaml hold those.
The notebook also saves the pushed config's own values of the overridden keys
(kernel_runtime.LOCAL_VALUES_FILE); `pull` writes them back, with a relative data path made absolute when it
exists from the current directory (so the config works from anywhere), and out_dir set to where the run landed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kaggletrain.kaggle.kernel_runtime import LOCAL_VALUES_FILE

PATH_KEYS = ("data.source", "data.val_source", "model.init_from")


def path_exists(key: str, value: str) -> bool:
    """Whether the data (file, folder, glob, binidx prefix: as the data pipeline resolves it) or checkpoint
    that `key` names is on this machine."""
    from kaggletrain.data.sources import resolve_source
    from kaggletrain.errors import DataError

    if not key.startswith("data."):
        return os.path.exists(os.path.expanduser(value))
    try:
        resolve_source(value, key=key)
    except DataError:
        return False
    return True


def _is_path(value) -> bool:
    return isinstance(value, str) and value.strip().lower() != "builtin"


@dataclass
class LocalRun:
    run: Path
    restored: dict = field(default_factory=dict)  # key -> value written into the run's configs
    missing: dict = field(default_factory=dict)  # path key -> its value, which does not exist here
    recorded: bool = True  # False: an older notebook saved no local values (only out_dir is fixed)


def _rewrite(path: Path, values: dict) -> None:
    from kaggletrain.config import config_from_dict, load_config, save_config
    from kaggletrain.train.checkpoint import atomic_write_text

    data = load_config(path).to_dict()
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        (data.setdefault(section, {}) if section else data)[name] = value
    cfg = config_from_dict(data, source=str(path))
    if path.name == "config.yaml":
        save_config(cfg, path)
    else:  # a checkpoint's run_config.yaml, written as the trainer writes it (atomically: a checkpoint's file)
        atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def localize_run(run: Path) -> LocalRun | None:
    """Rewrite a pulled run's configs for this machine; None when its config.yaml was not pulled."""
    config = run / "config.yaml"
    if not config.is_file():
        return None
    record = run / LOCAL_VALUES_FILE
    values = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    for key in PATH_KEYS:
        v = values.get(key)
        if _is_path(v) and not os.path.isabs(os.path.expanduser(v)) and path_exists(key, v):
            values[key] = os.path.abspath(v)
    values["out_dir"] = str(run.absolute())
    for path in [config, *sorted(run.glob("checkpoints/*/run_config.yaml"))]:
        _rewrite(path, values)

    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    missing = {}
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        v = (data.get(section) or {}).get(name)
        if _is_path(v) and not path_exists(key, v):
            missing[key] = v
    return LocalRun(run, values, missing, record.is_file())
