"""The generated notebook, executed end to end under nbclient as Kaggle would run it (CPU, tiny config).

Temporary folders stand in for /kaggle/input (the attached dataset, in the current
input/datasets/<owner>/<slug>/ layout) and /kaggle/working (the outputs).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

from kaggletrain.cli import main

FAKE_KEY = "e2e-f4k3-k3y-77aa55cc33ee"
TINY = """\
name: tiny
model: {hidden_size: 32, num_layers: 2, head_size: 16, vocab_size: 256}
data: {source: corpus.txt, tokenizer: byte}
train: {seq_len: 32, batch_size: 4, max_steps: 3, warmup_steps: 1, eval_interval: 0, eval_batches: 1}
checkpoint: {every_steps: 0}
"""


def _corpus(path: Path) -> None:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while rain falls on green hills".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(2000)))


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", FAKE_KEY)  # present in the environment, must appear in no output
    monkeypatch.setenv("KAGGLETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "tiny.yaml").write_text(TINY)
    _corpus(tmp_path / "corpus.txt")
    return tmp_path


def _assert_no_key(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert FAKE_KEY.encode() not in p.read_bytes(), f"credential in {p}"


@pytest.mark.slow
def test_generated_notebook_trains_under_nbclient(project, monkeypatch, capsys):
    import nbformat
    from nbclient import NotebookClient

    assert main(["push", "tiny.yaml", "--dry-run", "--dataset", "alice/tiny-text", "--out", "kernel"]) == 0
    meta = json.loads((project / "kernel" / "kernel-metadata.json").read_text())
    # Kaggle's side: the dataset mounted read-only under input/, an empty working/.
    dataset = project / "input" / "datasets" / "alice" / "tiny-text"
    dataset.mkdir(parents=True)
    (dataset / "corpus.txt").write_text((project / "corpus.txt").read_text())
    working = project / "working"
    working.mkdir()
    env = dict(os.environ, KAGGLETRAIN_KAGGLE_INPUT=str(project / "input"), KAGGLETRAIN_KAGGLE_WORKING=str(working),
               KAGGLETRAIN_KAGGLE_PKG=str(project / "tmp"))
    nb = nbformat.read(project / "kernel" / meta["code_file"], as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute(env=env, cwd=str(working))

    run = working / "runs" / "tiny"
    checkpoints = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert checkpoints, "no checkpoint written"
    assert (run / "metrics.jsonl").stat().st_size > 0 and (run / "config.yaml").is_file()
    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert f"data.source: corpus.txt -> {dataset / 'corpus.txt'}" in outputs  # found by searching
    from kaggletrain.kaggle.kernel_runtime import gpu_count

    assert f"GPUs: {gpu_count()}" in outputs  # one process per GPU; 0 on a CPU machine
    assert not (working / "kaggletrain").exists()  # the package was unpacked outside the outputs
    _assert_no_key(working)
    _assert_no_key(project / "kernel")
    _pulled_run_is_a_local_run(project, working, monkeypatch, capsys)


def _pulled_run_is_a_local_run(project: Path, working: Path, monkeypatch, capsys) -> None:
    """Kaggle serves /kaggle/working; `pull` fetches it with the real client (from the fake server), and then
    the Kaggle machine is gone: the pulled run evaluates and resumes on the local data, from any directory."""
    from kaggletrain.kaggle.fake_server import FakeKaggle, FakeKernel

    files = {str(p.relative_to(working)): p.read_bytes() for p in working.rglob("*") if p.is_file()}
    for gone in ("input", "working", "tmp"):
        shutil.rmtree(project / gone)
    run = project / "kaggle-out" / "runs" / "tiny"
    with FakeKaggle() as fake:
        monkeypatch.setenv("KAGGLETRAIN_KAGGLE_ENDPOINT", fake.url)
        fake.kernels["alice/kaggletrain-tiny"] = FakeKernel(status="COMPLETE", files=files)
        capsys.readouterr()
        assert main(["pull", "alice/kaggletrain-tiny", "--out", "kaggle-out"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "evaluate: kaggletrain eval kaggle-out/runs/tiny " in out + " "
        assert "resume: kaggletrain train kaggle-out/runs/tiny/config.yaml checkpoint.resume=true" in out
        monkeypatch.chdir(project / "kernel")  # not where the run was pushed or pulled
        assert main(["eval", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["step"] == 3
        assert main(["train", str(run / "config.yaml"), "checkpoint.resume=true", "train.max_steps=4"]) == 0
        assert (run / "checkpoints" / "step-00000004").is_dir()

        # The data has moved since the push: pull and eval name the key that gives its location now.
        monkeypatch.chdir(project)
        (project / "corpus.txt").rename(project / "moved.txt")
        assert main(["pull", "alice/kaggletrain-tiny", "--out", "kaggle-out"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "data.source corpus.txt is not on this machine: add data.source=PATH" in out
        assert "evaluate: kaggletrain eval kaggle-out/runs/tiny data.source=PATH" in out
    assert main(["eval", str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "corpus.txt: file not found (data.source); " in err and f"kaggletrain eval {run} data.source=PATH" in err
    assert main(["eval", str(run), "data.source=moved.txt", "--json"]) == 0


@pytest.mark.slow
def test_push_rehearse_runs_the_notebook_locally(project, capsys):
    assert main(["push", "tiny.yaml", "--rehearse", "--rehearse-steps", "2", "--dataset", "alice/tiny-text",
                 "--out", "kernel"]) == 0
    out = capsys.readouterr().out
    assert "rehearsal passed" in out
    assert "--dry-run --steps 2" in out  # the notebook's own launch line, made a dry run
    assert "tokens/s" in out and "projected run time" in out  # the dry-run report (issue 11)
    rehearsal = project / "kernel" / "rehearsal"
    assert (rehearsal / "input" / "datasets" / "alice" / "tiny-text" / "corpus.txt").is_symlink()
    assert not list((rehearsal / "working").rglob("metrics.jsonl"))  # a dry run leaves no run behind
    assert not (project / "runs").exists()  # and the local run directory is untouched
    _assert_no_key(rehearsal / "working")


@pytest.mark.slow
def test_two_processes_go_through_torchrun(project, monkeypatch):
    """The T4 x2 launch path (torchrun, one process per GPU), exercised on CPU with two gloo processes."""
    from kaggletrain.kaggle import kernel_runtime as kr

    monkeypatch.setenv(kr.NPROC_ENV, "2")
    run = project / "working" / "runs" / "tiny"
    overrides = [f"out_dir={run}", f"data.source={project / 'corpus.txt'}", "train.device=cpu",
                 "logging.progress=false"]
    cmd = kr.launch_command(project / "tiny.yaml", overrides, kr.gpu_count())
    assert "--nproc_per_node=2" in cmd
    kr.run_training(cmd, Path(__file__).resolve().parents[1], project / "working")
    assert [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["data/pile", "corpus"])
def test_rehearsal_finds_binidx_and_folder_sources(project, source, capsys):
    """A binidx prefix (pile.bin + pile.idx) and a folder, each as a Kaggle dataset made from it holds it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import write_binidx

    (project / "data").mkdir()
    write_binidx(project / "data" / "pile", [[(7 * i + j) % 250 + 1 for j in range(600)] for i in range(4)])
    (project / "corpus").mkdir()
    (project / "corpus" / "a.txt").write_text((project / "corpus.txt").read_text())
    assert main(["push", "tiny.yaml", f"data.source={source}", "--rehearse", "--rehearse-steps", "2",
                 "--dataset", "alice/ds", "--out", "kernel"]) == 0
    assert "rehearsal passed" in capsys.readouterr().out
