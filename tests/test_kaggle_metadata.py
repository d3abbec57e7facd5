"""Kernel metadata rules, checked locally: bad inputs fail with one clear line before any network call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaggletrain.cli import main
from kaggletrain.errors import KaggleError
from kaggletrain.kaggle.fake_server import FakeKaggle
from kaggletrain.kaggle.metadata import (
    ACCELERATORS,
    KernelSpec,
    metadata_problems,
    parse_kernel_ref,
    resolve_accelerator,
    slugify,
    validate_folder,
)

REPO = Path(__file__).resolve().parents[1]
TINY = """\
name: tiny
model: {hidden_size: 32, num_layers: 2, head_size: 16, vocab_size: 256}
data: {source: builtin, tokenizer: byte}
train: {seq_len: 32, batch_size: 4, max_steps: 3, warmup_steps: 1, eval_interval: 0}
"""


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


@pytest.fixture
def offline_server(tmp_path, monkeypatch):
    """A fake Kaggle API with credentials set: any request reaching it means we went to the network."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef-fake")
    with FakeKaggle() as server:
        monkeypatch.setenv("KAGGLETRAIN_KAGGLE_ENDPOINT", server.url)
        yield server


def test_slugify_matches_the_clients_slugify():
    from slugify import slugify as client_slugify  # python-slugify: what kaggle compares id and title with

    for title in ["kaggletrain tiny", "RWKV-7 on T4 x2!", "  Café  crème  ", "it's a run", "a__b--c  d",
                  "Tiny Shakespeare (byte) v2.1"]:
        assert slugify(title) == client_slugify(title), title


def test_accelerators_resolve_case_insensitively_and_reject_retired_ones():
    assert resolve_accelerator("nvidiateslat4").shape == "NvidiaTeslaT4"
    assert resolve_accelerator("NvidiaTeslaT4").gpus == 2  # NvidiaTeslaT4 *is* T4 x2
    assert resolve_accelerator("None").shape is None
    assert resolve_accelerator("cpu").shape is None
    with pytest.raises(KaggleError, match="P100 is retired"):
        resolve_accelerator("NvidiaTeslaP100")
    with pytest.raises(KaggleError, match="TPUs are not supported"):
        resolve_accelerator("TpuV5E8")
    with pytest.raises(KaggleError, match="unknown accelerator 'A6000'; choose one of: NvidiaTeslaT4"):
        resolve_accelerator("A6000")


def test_spec_metadata_is_valid_and_explicit():
    spec = KernelSpec(owner="alice", title="kaggletrain tiny", code_file="kaggletrain-tiny.ipynb",
                      datasets=["alice/tiny-text"])
    meta = spec.to_metadata()
    assert metadata_problems(meta) == []
    assert meta["id"] == "alice/kaggletrain-tiny"
    assert meta["machine_shape"] == "NvidiaTeslaT4" and meta["enable_gpu"] is True
    assert all(isinstance(meta[k], bool) for k in ("is_private", "enable_gpu", "enable_internet", "enable_tpu"))
    cpu = KernelSpec(owner="alice", title="kaggletrain tiny", code_file="k.ipynb", accelerator=ACCELERATORS["None"])
    assert cpu.to_metadata()["enable_gpu"] is False and "machine_shape" in cpu.to_metadata()
    assert metadata_problems(cpu.to_metadata()) == []


@pytest.mark.parametrize("change, message", [
    ({"title": "abc"}, "title must be 5 to 50 characters"),
    ({"title": "x" * 51}, "title must be 5 to 50 characters"),
    ({"title": "!!! ?? !!!"}, "needs at least 5 letters or digits"),
    ({"id": "alice/other-slug"}, "must equal the slugified title"),
    ({"id": "alice"}, "is not of the form owner/slug"),
    ({"is_private": "true"}, "is_private must be a JSON boolean"),
    ({"language": "r"}, "language must be 'python'"),
    ({"kernel_type": "script"}, "kernel_type must be 'notebook'"),
    ({"machine_shape": "NvidiaTeslaP100"}, "P100 is retired"),
    ({"machine_shape": "nvidiateslat4"}, "must be spelled 'NvidiaTeslaT4'"),
    ({"dataset_sources": ["tiny-text"]}, "dataset 'tiny-text' is not of the form owner/slug"),
    ({"dataset_sources": ["alice/Tiny Text"]}, "is not of the form owner/slug"),
])
def test_metadata_problems_name_the_rule(change, message):
    meta = KernelSpec(owner="alice", title="kaggletrain tiny", code_file="kaggletrain-tiny.ipynb").to_metadata()
    meta.update(change)
    assert any(message in p for p in metadata_problems(meta)), metadata_problems(meta)


def test_missing_machine_shape_is_an_error():
    meta = KernelSpec(owner="alice", title="kaggletrain tiny", code_file="k.ipynb").to_metadata()
    del meta["machine_shape"]
    assert any("machine_shape must be set explicitly" in p for p in metadata_problems(meta))


def test_validate_folder_checks_the_notebook(tmp_path):
    meta = KernelSpec(owner="alice", title="kaggletrain tiny", code_file="k.ipynb").to_metadata()
    (tmp_path / "kernel-metadata.json").write_text(json.dumps(meta))
    with pytest.raises(KaggleError, match="does not exist"):
        validate_folder(tmp_path)
    (tmp_path / "k.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4}))
    with pytest.raises(KaggleError, match="lacks metadata.kernelspec"):
        validate_folder(tmp_path)
    (tmp_path / "k.ipynb").write_text("x" * 1_000_001)
    with pytest.raises(KaggleError, match="under 1 MB"):
        validate_folder(tmp_path)


def test_kernel_refs():
    assert parse_kernel_ref("alice/kaggletrain-tiny") == ("alice", "kaggletrain-tiny", None)
    assert parse_kernel_ref("alice/kaggletrain-tiny/3") == ("alice", "kaggletrain-tiny", "3")
    assert parse_kernel_ref("https://www.kaggle.com/code/alice/kaggletrain-tiny") == ("alice", "kaggletrain-tiny", None)
    with pytest.raises(KaggleError, match="owner/slug"):
        parse_kernel_ref("alice/kaggletrain tiny")


@pytest.mark.parametrize("args, message", [
    (["--title", "abc"], "title must be 5 to 50 characters (3 characters: 'abc')"),
    (["--title", "a" * 60], "title must be 5 to 50 characters (60 characters"),
    (["--dataset", "tiny-text"], "dataset 'tiny-text' is not of the form owner/slug"),
    (["--dataset", "alice/tiny/text/x"], "is not of the form owner/slug"),
    (["--accelerator", "NvidiaK80"], "unknown accelerator 'NvidiaK80'"),
    (["--accelerator", "NvidiaTeslaP100"], "P100 is retired"),
    (["train.batch_size=3"], "cannot be split evenly over 2 processes"),
    (["data.source=corpus.txt"], "data.source is a local path (corpus.txt)"),
])
def test_bad_push_inputs_fail_before_any_network_call(tiny_config, tmp_path, offline_server, capsys, args, message):
    overrides = [a for a in args if "=" in a]
    options = [a for a in args if "=" not in a]
    rc = main(["push", str(tiny_config), *overrides, "--out", str(tmp_path / "k"), *options])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in " ".join(err.split()), err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err  # one line (rich may wrap it)
    assert offline_server.requests == []  # nothing reached the (fake) network
    assert not (tmp_path / "k").exists()  # and nothing was written


def test_repository_example_kernel_is_valid():
    meta = validate_folder(REPO)
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    assert (REPO / meta["code_file"]).parent.name == "notebooks"
