"""push / status / pull with the real `kaggle` client against a local fake Kaggle API (no internet).

The client runs unmodified in kaggletrain's worker process; KAGGLETRAIN_KAGGLE_ENDPOINT routes it to
FakeKaggle on 127.0.0.1, which records exactly what it sent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaggletrain.cli import main
from kaggletrain.config import load_config
from kaggletrain.kaggle.fake_server import FakeKaggle, FakeKernel

FAKE_KEY = "f4k3-k3y-0123456789abcdef"
TINY = """\
name: tiny
model: {hidden_size: 32, num_layers: 2, head_size: 16, vocab_size: 256}
data: {source: data/*.txt, tokenizer: byte}
train: {seq_len: 32, batch_size: 4, max_steps: 3, warmup_steps: 1, eval_interval: 0}
"""


def _isolate(monkeypatch, home: Path) -> None:
    """No real credentials or proxies can leak in from the machine running the tests."""
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "XDG_CONFIG_HOME",
                "KAGGLE_API_ENVIRONMENT", "KAGGLETRAIN_KAGGLE_TIMEOUT", "http_proxy", "HTTP_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", FAKE_KEY)
    with FakeKaggle() as fake:
        monkeypatch.setenv("KAGGLETRAIN_KAGGLE_ENDPOINT", fake.url)
        yield fake


@pytest.fixture
def config(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


def _push(config: Path, tmp_path: Path, *extra: str) -> int:
    return main(["push", str(config), "--out", str(tmp_path / "kernel"), "--dataset", "alice/tiny-text", *extra])


def test_push_sends_the_kernel(server, config, tmp_path, capsys):
    assert _push(config, tmp_path, "--title", "Tiny RWKV on T4", "--public", "--no-internet",
                 "--dataset", "bob/more-text") == 0
    out = capsys.readouterr().out
    assert "pushed alice/tiny-rwkv-on-t4 version 1: https://www.kaggle.com/code/alice/tiny-rwkv-on-t4" in out
    (call,) = server.calls("SaveKernel")
    body = call["body"]
    assert call["user"] == "alice"  # authenticated with the fake credentials
    assert body["slug"] == "alice/tiny-rwkv-on-t4" and body["newTitle"] == "Tiny RWKV on T4"
    assert body["machineShape"] == "NvidiaTeslaT4" and body["enableGpu"] is True
    assert body["datasetDataSources"] == ["alice/tiny-text", "bob/more-text"]
    assert body["isPrivate"] is False and body["enableInternet"] is False
    assert body["language"] == "python" and body["kernelType"] == "notebook"
    nb = json.loads(body["text"])  # the notebook itself, as the client uploads it
    local = json.loads((tmp_path / "kernel" / "tiny-rwkv-on-t4.ipynb").read_text())
    assert nb["metadata"]["kernelspec"] == local["metadata"]["kernelspec"]
    assert [c["source"] for c in nb["cells"]] == [c["source"] for c in local["cells"]]


def test_cpu_push_and_privacy_default(server, config, tmp_path):
    assert _push(config, tmp_path, "--accelerator", "None") == 0
    body = server.calls("SaveKernel")[0]["body"]
    assert body["isPrivate"] is True and body.get("enableGpu", False) is False and "machineShape" not in body


def test_server_side_rejection_is_an_error(server, config, tmp_path, capsys):
    server.push_error = "Notebook exceeds the maximum size"
    assert _push(config, tmp_path) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: Kaggle rejected the push of alice/kaggletrain-tiny: Notebook exceeds the maximum size" in err


def test_unattached_dataset_is_an_error(server, config, tmp_path, capsys):
    server.known_datasets = {"bob/other"}
    assert _push(config, tmp_path) == 2
    assert "did not attach the datasets alice/tiny-text" in " ".join(capsys.readouterr().err.split())


def test_refused_credentials(server, config, tmp_path, capsys):
    server.reject_auth = True
    assert main(["status", "alice/kaggletrain-tiny"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Kaggle refused the credentials (HTTP 401)" in err and FAKE_KEY not in err


def test_no_credentials_says_where_to_put_them(server, config, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.delenv("KAGGLE_USERNAME")
    assert _push(config, tmp_path) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "~/.kaggle/kaggle.json" in err and "KAGGLE_USERNAME and KAGGLE_KEY" in err
    assert server.requests == []


def test_hanging_api_times_out(server, config, tmp_path, capsys):
    server.hang.set()
    assert main(["status", "alice/kaggletrain-tiny", "--timeout", "4"]) == 2
    assert "did not answer within 4 s (status)" in " ".join(capsys.readouterr().err.split())


def test_status_follows_the_run(server, capsys):
    server.kernels["alice/kaggletrain-tiny"] = FakeKernel(upcoming=["RUNNING", "RUNNING", "COMPLETE"])
    assert main(["status", "alice/kaggletrain-tiny", "--wait", "--interval", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "alice/kaggletrain-tiny: running\nalice/kaggletrain-tiny: complete" in out
    assert len(server.calls("GetKernelSessionStatus")) == 3


def test_status_reports_failure(server, capsys):
    server.kernels["alice/kaggletrain-tiny"] = FakeKernel(status="ERROR", failure_message="CUDA out of memory")
    assert main(["status", "https://www.kaggle.com/code/alice/kaggletrain-tiny"]) == 1
    assert "alice/kaggletrain-tiny: error: CUDA out of memory" in capsys.readouterr().out
    body = server.calls("GetKernelSessionStatus")[0]["body"]
    assert body == {"userName": "alice", "kernelSlug": "kaggletrain-tiny"}


def test_unknown_kernel(server, capsys):
    assert main(["status", "kaggletrain-nope"]) == 2  # a bare slug means one of your own kernels
    assert "kernel alice/kaggletrain-nope not found" in " ".join(capsys.readouterr().err.split())


def test_pull_downloads_outputs(server, tmp_path, capsys):
    files = {"runs/tiny/checkpoints/step-00000003/model.safetensors": b"\x00weights",
             "runs/tiny/metrics.jsonl": b'{"step": 3, "loss": 4.2}\n', "runs/tiny/loss.png": b"\x89PNG",
             "runs/tiny/config.yaml": b"name: tiny\n", "runs/tiny/train.log": b"done\n"}
    server.kernels["alice/kaggletrain-tiny"] = FakeKernel(status="COMPLETE", files=files, log="notebook log")
    out = tmp_path / "pulled"
    assert main(["pull", "alice/kaggletrain-tiny", "--out", str(out)]) == 0
    for name, data in files.items():
        if not name.endswith("config.yaml"):  # the config is pointed at this machine (test_kaggle_e2e.py)
            assert (out / name).read_bytes() == data
    assert load_config(out / "runs/tiny/config.yaml").out_dir == str(out / "runs/tiny")
    assert (out / "kaggletrain-tiny.log").read_text() == "notebook log"
    text = " ".join(capsys.readouterr().out.split())
    assert "6 files" in text and f"resume: kaggletrain train {out}/runs/tiny/config.yaml checkpoint.resume=true" in text
    assert server.calls("ListKernelSessionOutput")[0]["body"]["kernelSlug"] == "kaggletrain-tiny"


def test_pull_with_a_pattern_names_no_missing_config(server, tmp_path, capsys):
    files = {"runs/tiny/metrics.jsonl": b'{"step": 3, "loss": 4.2}\n', "runs/tiny/config.yaml": b"name: tiny\n"}
    server.kernels["alice/kaggletrain-tiny"] = FakeKernel(status="COMPLETE", files=files)
    out = tmp_path / "pulled"
    assert main(["pull", "alice/kaggletrain-tiny", "--out", str(out), "--pattern", "metrics"]) == 0
    assert not (out / "runs/tiny/config.yaml").exists()
    text = " ".join(capsys.readouterr().out.split())
    assert "config.yaml" not in text.replace("its config.yaml was not pulled", "")
    assert f"run {out}/runs/tiny: its config.yaml was not pulled (--pattern)" in text


def test_pull_says_what_it_could_not_make_local(server, tmp_path, capsys):
    """Three pulled runs that `pull` cannot point at this machine, each answered in its own line, the files kept:
    a config that does not validate (left as pulled), one from a notebook that saved no local values (its
    data.source is the Kaggle path), and a run without a checkpoint (nothing to evaluate or resume)."""
    ckpt = "checkpoints/step-00000003/model.safetensors"
    kaggle_cfg = b"name: old\ndata: {source: /kaggle/input/corpus/corpus.txt, tokenizer: byte}\n"
    files = {"runs/bad/config.yaml": b"train: {lr: fast}\n", f"runs/bad/{ckpt}": b"w",
             "runs/old/config.yaml": kaggle_cfg, f"runs/old/{ckpt}": b"w",
             "runs/none/config.yaml": b"name: none\n", "runs/none/metrics.jsonl": b'{"step": 1, "loss": 4.2}\n'}
    server.kernels["alice/kaggletrain-tiny"] = FakeKernel(status="COMPLETE", files=files)
    out = tmp_path / "pulled"
    assert main(["pull", "alice/kaggletrain-tiny", "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"run {out}/runs/bad: warning: its config was left as pulled: " in text and "train.lr" in text, text
    assert (out / "runs/bad/config.yaml").read_bytes() == files["runs/bad/config.yaml"]
    assert (f"run {out}/runs/old: data.source /kaggle/input/corpus/corpus.txt is the Kaggle path (the notebook "
            "predates saving the local one): add data.source=PATH") in text, text
    assert f"evaluate: kaggletrain eval {out}/runs/old data.source=PATH" in text, text
    assert f"run {out}/runs/none: no checkpoint pulled, nothing to evaluate or resume" in text, text
    assert f"kaggletrain train {out}/runs/none/config.yaml" not in text and f"eval {out}/runs/none" not in text


def test_access_token_alone(server, config, tmp_path, monkeypatch):
    """Token credentials: the owner comes from the server (token introspection), requests carry a Bearer."""
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_test_token_abc123")
    server.tokens["KGAT_test_token_abc123"] = "carol"
    assert _push(config, tmp_path) == 0
    (save,) = server.calls("SaveKernel")
    assert save["body"]["slug"] == "carol/kaggletrain-tiny" and save["user"] == "bearer"
