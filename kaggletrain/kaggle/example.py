"""Regenerate the repository's example kernel: `kernel-metadata.json` (repo root) + `notebooks/<slug>.ipynb`.

    python -m kaggletrain.kaggle.example [REPO_ROOT]

The example trains a small byte-level RWKV-7 on the built-in corpus (no dataset needed) on T4 x2, so it can be
pushed with the plain client (`kaggle kernels push` from the repository root) after one edit: the owner in
`id` must be your Kaggle user name. The notebook embeds the kaggletrain sources of the tree it was generated
from: regenerate it after changing the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLE_CONFIG = {
    "name": "example",
    "model": {"hidden_size": 256, "num_layers": 4, "head_size": 64, "vocab_size": 256},
    "data": {"source": "builtin", "tokenizer": "byte"},
    "train": {"seq_len": 256, "batch_size": 32, "max_steps": 2000, "warmup_steps": 100, "lr": 1e-3,
              "precision": "auto", "eval_interval": 250},
    "checkpoint": {"every_steps": 500, "resume": "auto"},
}
OWNER_PLACEHOLDER = "your-kaggle-username"
TITLE = "kaggletrain example"


def generate(repo: Path) -> Path:
    import json

    from kaggletrain.config import config_from_dict
    from kaggletrain.kaggle.kernel import make_spec, write_kernel
    from kaggletrain.kaggle.metadata import METADATA_FILE, validate_folder

    cfg = config_from_dict(EXAMPLE_CONFIG, source="kaggletrain.kaggle.example")
    spec = make_spec(cfg, owner=OWNER_PLACEHOLDER, title=TITLE, accelerator="NvidiaTeslaT4", datasets=[],
                     private=True, internet=True)
    # Build in notebooks/, then move the metadata to the root and point code_file at notebooks/.
    note = (f"**Before pushing**: replace `{OWNER_PLACEHOLDER}` in `kernel-metadata.json` with your Kaggle user "
            "name, then run `kaggle kernels push` in the repository root (or use `kaggletrain push`, which fills "
            "it in).")
    folder = write_kernel(cfg, spec, repo / "notebooks", note=note)
    staged = folder.path / METADATA_FILE
    meta = json.loads(staged.read_text(encoding="utf-8"))
    meta["code_file"] = f"notebooks/{folder.notebook.name}"
    (repo / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    staged.unlink()
    validate_folder(repo)
    return folder.notebook


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
    print(f"wrote {generate(root)} and {root / 'kernel-metadata.json'}")
