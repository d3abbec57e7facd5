"""The generated notebook and the helpers it runs on Kaggle (kernel_runtime), without executing training."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from kaggletrain.cli import main
from kaggletrain.kaggle import kernel_runtime as kr
from kaggletrain.kaggle.bundle import build_bundle
from kaggletrain.kaggle.notebook import OPTIONAL, REQUIRED, WORLD

REPO = Path(__file__).resolve().parents[1]
TINY = """\
name: tiny
model: {hidden_size: 32, num_layers: 2, head_size: 16, vocab_size: 256}
data: {source: data/*.txt, tokenizer: byte}
train: {seq_len: 32, batch_size: 4, max_steps: 3, warmup_steps: 1, eval_interval: 0}
"""


def _settings(nb: dict) -> dict:
    """Execute the notebook's settings cell (plain literals) and return its names."""
    ns: dict = {}
    exec(nb["cells"][1]["source"], ns)
    return ns


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("nb")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY)
    rc = main(["push", str(cfg), "train.lr=1e-3", "--dry-run", "--owner", "alice", "--dataset", "alice/tiny-text",
               "--no-internet", "--public", "--out", str(tmp / "kernel")])
    assert rc == 0
    meta = json.loads((tmp / "kernel" / "kernel-metadata.json").read_text())
    return tmp / "kernel", meta


def test_dry_run_writes_a_valid_kernel_folder(pushed):
    folder, meta = pushed
    assert meta["id"] == "alice/kaggletrain-tiny" and meta["title"] == "kaggletrain tiny"
    assert meta["dataset_sources"] == ["alice/tiny-text"]
    assert meta["is_private"] is False and meta["enable_internet"] is False
    assert sorted(p.name for p in folder.iterdir()) == ["kaggletrain-tiny.ipynb", "kernel-metadata.json"]


def test_notebook_carries_kernelspec_config_and_package(pushed):
    folder, meta = pushed
    raw = (folder / meta["code_file"]).read_bytes()
    assert len(raw) < 1_000_000
    nb = json.loads(raw)
    assert nb["metadata"]["kernelspec"]["name"] == "python3" and nb["nbformat"] == 4
    s = _settings(nb)
    assert s["CONFIG"]["train"]["lr"] == pytest.approx(1e-3)  # overrides are resolved into the config
    assert s["PATH_SETTINGS"] == {"data.source": "data/*.txt"}
    assert s["DATASETS"] == ["alice/tiny-text"] and s["INTERNET"] is False
    zipped = base64.b64decode(s["KAGGLETRAIN_BUNDLE"])
    assert hashlib.sha256(zipped).hexdigest() == s["KAGGLETRAIN_SHA256"]
    names = zipfile.ZipFile(io.BytesIO(zipped)).namelist()
    assert "kaggletrain/kaggle/kernel_runtime.py" in names and "kaggletrain/config.py" in names
    assert "kaggletrain/__main__.py" in names and "kaggletrain/infer/decode_cpu.cpp" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".json", ".ipynb"))]
    # Training goes through a subprocess (torchrun for several GPUs), never in the notebook's process.
    code = "\n".join(c["source"] for c in nb["cells"] if c["cell_type"] == "code")
    assert "kr.run_training(kr.launch_command(" in code and "import torch" not in code


def test_bundle_is_deterministic():
    assert build_bundle().sha256 == build_bundle().sha256


def test_required_dependencies_mirror_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in deps}
    ours = {re.split(r"[<>=]", r, maxsplit=1)[0].lower() for r in {**REQUIRED, **OPTIONAL}.values()}
    assert names <= ours, f"pyproject dependencies missing from kaggletrain/kaggle/notebook.py: {names - ours}"


def test_world_extra_mirrors_pyproject():
    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["world"]
    assert sorted(WORLD.values()) == sorted(extra)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_notebook_installs_what_the_tokenizer_needs(tmp_path, config):
    """A world tokenizer (every shipped T4/H100 config) needs pyrwkv-tokenizer's vocabulary; Kaggle images lack it."""
    from kaggletrain.config import load_config

    world = load_config(REPO / "configs" / config).data.tokenizer == "world"
    assert main(["push", str(REPO / "configs" / config), "--dry-run", "--owner", "alice", "--dataset", "alice/data",
                 "--accelerator", "None", "--out", str(tmp_path / "kernel")]) == 0
    (nb,) = (tmp_path / "kernel").glob("*.ipynb")
    required = _settings(json.loads(nb.read_text()))["REQUIRED"]
    assert required == ({**REQUIRED, **WORLD} if world else REQUIRED)


# ---------------------------------------------------------------- kernel_runtime


def _dataset(root: Path, layout: str) -> Path:
    d = root / ("datasets/alice/tiny-text" if layout == "current" else "tiny-text") / "data"
    d.mkdir(parents=True)
    (d / "a.txt").write_text("hello")
    (d / "b.txt").write_text("world")
    return d


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_locate_data_searches_the_mounted_dataset(tmp_path, layout):
    d = _dataset(tmp_path, layout)
    assert kr.locate_data("data/*.txt", ["alice/tiny-text"], tmp_path) == str(d / "*.txt")
    assert kr.locate_data("/home/me/corpus/a.txt", ["alice/tiny-text"], tmp_path) == str(d / "a.txt")
    assert kr.locate_data("data", [], tmp_path) == str(d)  # a folder, searched in the whole input
    assert kr.locate_data("builtin", [], tmp_path) == "builtin"


def test_locate_data_explains_what_it_saw(tmp_path):
    _dataset(tmp_path, "current")
    with pytest.raises(FileNotFoundError, match=r"nothing named 'corpus.txt' under .*tiny-text: data, data/a.txt"):
        kr.locate_data("corpus.txt", ["alice/tiny-text"], tmp_path)


def test_locate_data_finds_a_binidx_prefix(tmp_path):
    d = tmp_path / "datasets" / "alice" / "corpus-bi"  # kaggle datasets create -p data, data/ holding the pair
    d.mkdir(parents=True)
    (d / "corpus.bin").write_bytes(b"\0\0")
    (d / "corpus.idx").write_bytes(b"\0")
    assert kr.locate_data("data/corpus", ["alice/corpus-bi"], tmp_path) == str(d / "corpus")
    assert kr.locate_data("data/corpus.bin", ["alice/corpus-bi"], tmp_path) == str(d / "corpus.bin")
    (d / "corpus.idx").unlink()  # a prefix is a .bin and its .idx
    with pytest.raises(FileNotFoundError, match="nothing named 'corpus'"):
        kr.locate_data("data/corpus", ["alice/corpus-bi"], tmp_path)


def test_locate_data_takes_a_dataset_made_from_the_folder(tmp_path):
    """`kaggle datasets create -p corpus` puts corpus/'s files at the dataset root; push marks a folder with '/'."""
    d = tmp_path / "datasets" / "alice" / "corpus-ds"
    d.mkdir(parents=True)
    (d / "a.txt").write_text("hello")
    assert kr.locate_data("corpus/", ["alice/corpus-ds"], tmp_path) == str(d)
    (d / "corpus").mkdir()  # a folder of that name in the dataset comes first
    assert kr.locate_data("corpus/", ["alice/corpus-ds"], tmp_path) == str(d / "corpus")
    with pytest.raises(FileNotFoundError, match="data.val_source 'corpus.txt': nothing named 'corpus.txt'"):
        kr.locate_data("corpus.txt", ["alice/corpus-ds"], tmp_path, "data.val_source")  # a file: no such fallback


def test_push_marks_a_folder_source_and_stages_datasets_as_kaggle_lays_them_out(tmp_path, monkeypatch):
    from kaggletrain.kaggle.rehearse import stage_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello")
    (tmp_path / "data").mkdir()
    for name in ("pile.bin", "pile.idx", "val.txt"):
        (tmp_path / "data" / name).write_bytes(b"x")
    (tmp_path / "c.yaml").write_text(TINY.replace("data/*.txt", "corpus"))
    assert main(["push", "c.yaml", "--dry-run", "--owner", "alice", "--dataset", "alice/ds", "--out", "kernel"]) == 0
    nb = json.loads((tmp_path / "kernel" / "kaggletrain-tiny.ipynb").read_text())
    assert _settings(nb)["PATH_SETTINGS"] == {"data.source": "corpus/"}

    def staged(local: dict) -> list[str]:
        root = tmp_path / "input"
        shutil.rmtree(root, ignore_errors=True)
        stage_inputs(local, "alice/ds", root)
        return sorted(p.name for p in (root / "datasets" / "alice" / "ds").iterdir())

    assert staged({"data.source": "corpus/"}) == ["a.txt"]  # the folder's files at the root, as -p corpus makes it
    assert staged({"data.source": "corpus/", "data.val_source": "data/val.txt"}) == ["corpus", "val.txt"]
    assert staged({"data.source": "data/pile"}) == ["pile.bin", "pile.idx"]  # a binidx prefix: both files
    assert staged({"data.source": "data/pile.bin"}) == ["pile.bin", "pile.idx"]


def test_kaggle_paths_are_rerooted(tmp_path):
    d = _dataset(tmp_path, "current")
    assert kr.locate_data("/kaggle/input/datasets/alice/tiny-text/data/a.txt", [], tmp_path) == str(d / "a.txt")


def test_wheel_dirs_and_offline_install_error(tmp_path):
    wheels = tmp_path / "datasets" / "alice" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"")
    assert kr.find_wheel_dirs(tmp_path) == [wheels]
    with pytest.raises(RuntimeError, match="missing dependencies: surely-not-a-package>=1; internet is off"):
        kr.ensure_dependencies({"surely_not_a_module_kt": "surely-not-a-package>=1"}, {}, internet=False,
                               input_root=tmp_path / "empty")


def test_launch_uses_torchrun_for_several_gpus(monkeypatch):
    monkeypatch.setenv(kr.TRAIN_ARGS_ENV, "train.max_steps=5")
    one = kr.launch_command(Path("c.yaml"), ["out_dir=/w/runs/tiny"], 1)
    assert one == [sys.executable, "-m", "kaggletrain", "train", "c.yaml", "out_dir=/w/runs/tiny", "train.max_steps=5"]
    two = kr.launch_command(Path("c.yaml"), [], 2)
    assert two[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert two[5:9] == ["-m", "kaggletrain", "train", "c.yaml"]
    monkeypatch.setenv(kr.NPROC_ENV, "2")
    assert kr.gpu_count() == 2


def test_run_training_failure_fails_the_cell(tmp_path):
    cmd = [sys.executable, "-c", "print('step 1'); import sys; sys.exit('out of memory')"]
    with pytest.raises(RuntimeError, match=r"training exited with code 1: step 1 \| out of memory"):
        kr.run_training(cmd, tmp_path, tmp_path / "w")
    cmd = [sys.executable, "-c", "raise MemoryError('CUDA out of memory')"]
    with pytest.raises(RuntimeError, match="training exited with code 1: MemoryError: CUDA out of memory$"):
        kr.run_training(cmd, tmp_path, tmp_path / "w")


def test_failure_summary_finds_the_cause_under_torchrun():
    lines = ["step 1", "error: corpus.txt: file not found (data.source)",
             "[rank1]: RuntimeError: Connection closed by peer", "Traceback (most recent call last):",
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "error_file: <N/A>"]
    assert kr.failure_summary(lines) == "error: corpus.txt: file not found (data.source)"
    # A rehearsal's dry run that exits 3 ends its report with what would stop the real run: that is the cause.
    report = ["│ loss first → last │ 5.6822 → nan │", "└──────┴──────┘",
              "the real run would stop: the loss was not finite for 4 steps in a row (from dry-run step 2)"]
    assert kr.failure_summary(report) == report[-1]


REGENERATE = "python -m kaggletrain.kaggle.example"


def test_repository_example_kernel_is_current(tmp_path):
    """The example kernel embeds the package: it must be regenerated whenever kaggletrain/ changes."""
    from kaggletrain.kaggle.example import generate

    meta = json.loads((REPO / "kernel-metadata.json").read_text())
    committed = json.loads((REPO / meta["code_file"]).read_text())
    how = (f"the repository's example kernel is stale: run `{REGENERATE}` in the repository root and commit "
           f"kernel-metadata.json and {meta['code_file']}")
    assert _settings(committed)["KAGGLETRAIN_SHA256"] == build_bundle().sha256, (
        f"{how} (the kaggletrain sources it embeds differ from this tree's)")
    generate(tmp_path)  # everything else the notebook carries: cells, settings, metadata
    for name in ("kernel-metadata.json", meta["code_file"]):
        assert (tmp_path / name).read_text() == (REPO / name).read_text(), f"{how} ({name} differs)"


def test_repository_example_notebook_runs_offline_safe():
    meta = json.loads((REPO / "kernel-metadata.json").read_text())
    nb = json.loads((REPO / meta["code_file"]).read_text())
    s = _settings(nb)
    assert s["PATH_SETTINGS"] == {} and s["CONFIG"]["data"]["source"] == "builtin"  # no dataset needed
