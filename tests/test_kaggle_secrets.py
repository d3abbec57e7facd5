"""Credentials never end up in a generated kernel folder, the notebook's embedded package, output or errors."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest

from kaggletrain.cli import main
from kaggletrain.kaggle.credentials import find_credentials, scrub
from kaggletrain.kaggle.fake_server import FakeKaggle

ENV_KEY = "envkey-5f1c0d9e8a7b6c5d"
FILE_KEY = "filekey-0a1b2c3d4e5f6a7b"
TOKEN = "KGAT_fake_token_9c8b7a6f5e4d"
TINY = """\
name: tiny
model: {hidden_size: 32, num_layers: 2, head_size: 16, vocab_size: 256}
data: {source: builtin, tokenizer: byte}
train: {seq_len: 32, batch_size: 4, max_steps: 3, warmup_steps: 1, eval_interval: 0}
"""


def _secrets() -> list[str]:
    basic = [base64.b64encode(f"alice:{k}".encode()).decode() for k in (ENV_KEY, FILE_KEY)]
    return [ENV_KEY, FILE_KEY, TOKEN, *basic]


@pytest.fixture
def creds_everywhere(tmp_path, monkeypatch):
    """Fake credentials in every place the client looks: env vars, kaggle.json and the access-token file."""
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "alice", "key": FILE_KEY}))
    (home / ".kaggle" / "access_token").write_text(TOKEN + "\n")
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", ENV_KEY)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    return cfg


def _texts_of(folder: Path):
    """Every produced file's bytes, and every member of the package zip embedded in each notebook."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        yield str(path), data
        if path.suffix == ".ipynb":
            ns: dict = {}
            exec(json.loads(data)["cells"][1]["source"], ns)
            with zipfile.ZipFile(io.BytesIO(base64.b64decode(ns["KAGGLETRAIN_BUNDLE"]))) as zf:
                for name in zf.namelist():
                    yield f"{path}!{name}", zf.read(name)


def _assert_clean(label: str, data: bytes) -> None:
    for secret in _secrets():
        assert secret.encode() not in data, f"credential found in {label}"


def test_credentials_are_found_but_only_for_scrubbing(creds_everywhere):
    creds = find_credentials()
    assert creds.found and creds.username == "alice"
    assert set(_secrets()) <= set(creds.secrets)
    text = f"Authorization: Basic {_secrets()[3]} key={ENV_KEY}"
    assert scrub(text, creds.secrets) == "Authorization: Basic *** key=***"


def test_dry_run_folder_holds_no_credentials(creds_everywhere, tmp_path, capsys):
    out = tmp_path / "kernel"
    assert main(["push", str(creds_everywhere), "--dry-run", "--out", str(out)]) == 0
    scanned = 0
    for label, data in _texts_of(out):
        _assert_clean(label, data)
        scanned += 1
    assert scanned > 20  # the folder's two files plus the embedded package's sources
    captured = capsys.readouterr()
    _assert_clean("stdout/stderr", (captured.out + captured.err).encode())


def test_push_and_errors_hold_no_credentials(creds_everywhere, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VERBOSE", "1")  # would make the client print request headers, Authorization included
    with FakeKaggle() as server:
        monkeypatch.setenv("KAGGLETRAIN_KAGGLE_ENDPOINT", server.url)
        assert main(["push", str(creds_everywhere), "--out", str(tmp_path / "kernel")]) == 0
        (save,) = server.calls("SaveKernel")
        _assert_clean("the pushed request body", json.dumps(save["body"]).encode())
        server.reject_auth = True
        assert main(["status", "alice/kaggletrain-tiny"]) == 2
        server.push_error = "rejected"
        assert main(["push", str(creds_everywhere), "--out", str(tmp_path / "kernel")]) == 2
    captured = capsys.readouterr()
    _assert_clean("stdout/stderr", (captured.out + captured.err).encode())
    for label, data in _texts_of(tmp_path / "kernel"):
        _assert_clean(label, data)
