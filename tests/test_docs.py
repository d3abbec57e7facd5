"""Every command in the docs is run (doc examples must not rot).

The `kaggletrain ...` commands of the fenced ```bash blocks in README.md and docs/*.md (also
`python -m kaggletrain ...`, `torchrun ... -m kaggletrain ...`, with `VAR=value` prefixes and `&&` chains;
other programs such as pip or curl are not run) are run in document order, one fresh project directory
per file (holding a copy of configs/), on the CPU. Small overrides are injected so that each takes
seconds; what is checked is that every command exits 0 with the documented arguments:

- train (also under torchrun, with 2 CPU processes over gloo): `train.max_steps` capped at 2 (4 with
  `--resume`), `--steps 2` for dry runs, one eval batch, no progress bar, no TensorBoard, the token cache
  in a temporary directory shared by the files. Configs made for GPUs (wider than 1024 x layers, or
  `device: cuda`) run as a 2 x 64 model on 64-token windows on the CPU in fp32, in 16-token chunks when
  they chunk.
- Inputs that do not exist here (`my-corpus/train.jsonl`, `/kaggle/input/...`, official `.pth` files) are
  created: a small corpus of the same kind (.jsonl, .csv, text file, folder) and a tiny official-format
  RWKV-7 checkpoint of the shape the command's config asks for. Relative paths are created where the
  command names them, so the command runs as written; absolute ones are replaced by a local copy.
- eval: `--batches 1`. bench: `--quick --threads 1`. push `--rehearse`: `--rehearse-steps 2`.
  `--device cuda` becomes `--device cpu` without a GPU.
- push, status and pull talk to kaggletrain.kaggle.fake_server (a local stand-in for the Kaggle API that
  the real client is pointed at) as user `alice` with a fake key; `status` and `pull` find the kernel
  complete, its outputs being the runs trained earlier in the same file.

Commands that cannot run here at all would be listed in SKIPPED with the reason; there are none.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIPPED: dict[str, str] = {}  # exact command text -> why it cannot run in a test
SHRUNK = {"hidden_size": 64, "num_layers": 2, "head_size": 64}
# Every letter in both cases (a character-level vocabulary built from it covers the docs' prompts).
CORPUS = ("ROMEO: The quick brown fox jumps over the lazy dog.\nJULIET: PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS!\n"
          "User: How vexingly quick daft zebras jump?\nAssistant: Sphinx of black quartz, judge my vow; 0123456789.\n"
          ) * 500


# ---------------------------------------------------------------------------------------------------
# Extraction


@dataclass
class DocCommand:
    where: str                     # file:line
    text: str                      # the command as written
    argv: list[str]                # kaggletrain's arguments (after `kaggletrain`)
    env: dict[str, str] = field(default_factory=dict)
    torchrun: list[str] | None = None   # torchrun's own arguments when run under torchrun


OPERATORS = ("&&", "||", ";", "|", "&")


def _parse(words: list[str], where: str) -> DocCommand | None:
    part = shlex.join(words)  # the command as written, minus any comment
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not words:
        return None
    if words[0] == "kaggletrain":
        return DocCommand(where, part.strip(), words[1:], env)
    if words[:3] in (["python", "-m", "kaggletrain"], ["python3", "-m", "kaggletrain"]):
        return DocCommand(where, part.strip(), words[3:], env)
    if words[0] == "torchrun" and "-m" in words:
        i = words.index("-m")
        if words[i + 1:i + 2] == ["kaggletrain"]:
            return DocCommand(where, part.strip(), words[i + 2:], env, torchrun=words[1:i])
    return None


def extract(path: Path) -> list[DocCommand]:
    """The kaggletrain commands of a Markdown file's ```bash blocks, in order."""
    commands, in_block, pending, start = [], False, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fence = line.strip()
        if fence.startswith("```"):
            in_block = not in_block and fence[3:].strip() in ("bash", "sh", "shell", "console")
            continue
        if not in_block:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full, pending = pending + line, ""
        lexer = shlex.shlex(full, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, ""  # bash: '#' starts a comment only as a word
        tokens: list[str] = []
        for token in lexer:
            if token.startswith("#"):
                break
            tokens.append(token)
        words: list[str] = []
        for token in [*tokens, ";"]:
            if token not in OPERATORS:
                words.append(token)
                continue
            cmd = _parse(words, f"{path.relative_to(ROOT)}:{start}") if words else None
            if cmd is not None:
                commands.append(cmd)
            words = []
    return commands


def test_extraction_finds_the_readme_commands():
    texts = [c.text for c in extract(ROOT / "README.md")]
    assert "kaggletrain train configs/tiny.yaml" in texts  # the Quick start's main job, after `pip install ... &&`
    assert any(t.startswith("kaggletrain push") for t in texts)
    torchrun = [c for f in DOC_FILES for c in extract(f) if c.torchrun is not None]
    assert all(c.argv[0] == "train" for c in torchrun)


# ---------------------------------------------------------------------------------------------------
# Inputs the docs refer to


def _write_corpus(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".jsonl", ".ndjson"):
        path.write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS.splitlines()))
    elif path.suffix == ".csv":
        path.write_text("text\n" + "".join(f'"{line}"\n' for line in CORPUS.splitlines()))
    else:
        path.write_text(CORPUS)


def _materialise_source(value: str, project: Path) -> str | None:
    """Create a missing data source; returns the override value to use (None: the command's own path works)."""
    if value in ("builtin", "None", "null") or any(c in value for c in "*?["):
        return None
    p = Path(value)
    if p.exists() or Path(str(p) + ".bin").exists():
        return None
    target = project / "doc-inputs" / p.name if p.is_absolute() else project / p
    if value.endswith("/") or not p.suffix:
        _write_corpus(target / "part-1.txt")
    else:
        _write_corpus(target)
    return str(target) if p.is_absolute() else None


def _write_official_pth(path: Path, vocab: int, shape: dict) -> None:
    import torch

    from kaggletrain.interop import official_state_dict
    from kaggletrain.model import ModelConfig, RWKVModel

    torch.manual_seed(0)
    model = RWKVModel(ModelConfig(vocab_size=vocab, **shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official_state_dict(model, torch.bfloat16)[0], path)


def _materialise_pth(value: str, project: Path, vocab: int, shape: dict) -> str | None:
    p = Path(value)
    if p.exists():
        return None
    target = project / "doc-inputs" / p.name if p.is_absolute() else project / p
    _write_official_pth(target, vocab, shape)
    return str(target) if p.is_absolute() else None


# ---------------------------------------------------------------------------------------------------
# Adapting each command


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if "=" in a and not a.startswith("-")]


def _adapt_train(args: list[str], project: Path) -> list[str]:
    from kaggletrain.config import load_config

    positional = [a for a in args[1:] if not a.startswith("-") and "=" not in a]
    cfg = load_config(positional[0], _overrides(args[1:]))
    t = cfg.train
    big = cfg.model.get("hidden_size", 768) * cfg.model.get("num_layers", 12) > 1024 or t.device == "cuda"
    shape = SHRUNK if big else {k: cfg.model[k] for k in ("hidden_size", "num_layers", "head_size") if k in cfg.model}
    vocab = {"world": 65536, "byte": 256}.get(cfg.data.tokenizer, 256)
    extra = []
    for key in ("source", "val_source"):
        value = getattr(cfg.data, key)
        if value is not None:
            new = _materialise_source(str(value), project)
            if new:
                extra.append(f"data.{key}={new}")
    init = cfg.model.get("init_from")
    if init:
        new = _materialise_pth(str(init), project, vocab, shape)
        if new:
            extra.append(f"model.init_from={new}")
    if big:
        extra += [f"model.{k}={v}" for k, v in SHRUNK.items()]
        extra += [f"train.seq_len={min(t.seq_len, 64)}", "train.batch_size=2", "train.micro_batch_size=1"]
        if t.use_chunking:
            extra.append("model.rwkv_chunk_size=16")
    if t.device == "cuda":
        extra.append("train.device=cpu")
    if t.device == "cuda" or t.precision == "fp16":  # (fp16 runs on a CPU too, with its loss scaler: fp32 is quicker)
        extra.append("train.precision=fp32")
    extra += ["data.cache_dir=null", "logging.tensorboard=false", "logging.progress=false", "train.eval_batches=1",
              f"train.max_steps={4 if '--resume' in args else 2}"]
    if "--dry-run" in args and "--steps" not in args:
        extra += ["--steps", "2"]
    return args + extra


def adapt(cmd: DocCommand, project: Path) -> list[str]:
    import torch

    args = list(cmd.argv)
    name = args[0] if args else ""
    if name == "train":
        return _adapt_train(args, project)
    for i, a in enumerate(args[:-1]):
        if a == "--device" and args[i + 1] == "cuda" and not torch.cuda.is_available():
            args[i + 1] = "cpu"
    if name in ("generate", "export", "eval") and len(args) > 1 and args[1].endswith(".pth"):
        new = _materialise_pth(args[1], project, 65536, SHRUNK)
        if new:
            args[1] = new
    if name == "eval" and "--batches" not in args:
        args += ["--batches", "1"]
    if name == "bench":
        args += [a for a in ("--quick",) if a not in args] + ([] if "--threads" in args else ["--threads", "1"])
    if name == "push" and "--rehearse" in args and "--rehearse-steps" not in args:
        args += ["--rehearse-steps", "2"]
    return args


# ---------------------------------------------------------------------------------------------------
# The fake Kaggle


def _kernel_ref(ref: str) -> str:
    from kaggletrain.kaggle.metadata import parse_kernel_ref

    if "/" not in ref:
        ref = f"alice/{ref}"
    owner, slug, _ = parse_kernel_ref(ref)
    return f"{owner}/{slug}"


def _prepare_kernel(server, args: list[str], project: Path) -> None:
    """Before `status`/`pull`: the pushed kernel has finished; its outputs are this project's runs."""
    from kaggletrain.kaggle.fake_server import FakeKernel

    ref = _kernel_ref(next(a for a in args[1:] if not a.startswith("-")))
    files = {}
    runs = project / "runs"
    if runs.is_dir():
        files = {str(p.relative_to(project)): p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    if not files:
        files = {"runs/run/metrics.jsonl": b'{"step": 1, "loss": 5.0}\n', "runs/run/config.yaml": b"name: run\n"}
    server.kernels[ref] = FakeKernel(status="COMPLETE", files=files, log="training finished\n")


# ---------------------------------------------------------------------------------------------------
# Running


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory):
    """Shared by the doc files (the built-in corpus is tokenised once per test process)."""
    return tmp_path_factory.mktemp("docs-token-cache")


@pytest.fixture
def project(tmp_path, monkeypatch, token_cache):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    home = tmp_path / "home"
    home.mkdir()
    for var in ("KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME", "KAGGLE_API_ENVIRONMENT",
                "KAGGLETRAIN_KAGGLE_TIMEOUT", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "docs-test-f4k3-k3y")
    monkeypatch.setenv("KAGGLETRAIN_CACHE_DIR", str(token_cache))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_torchrun(cmd: DocCommand, args: list[str], project: Path) -> tuple[int, str]:
    env = {**os.environ, **cmd.env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd.torchrun, "-m", "kaggletrain", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    return proc.returncode, "\n".join(errors[:5]) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]


def _run_in_process(cmd: DocCommand, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from kaggletrain.cli import main

    with monkeypatch.context() as m:
        for k, v in cmd.env.items():
            m.setenv(k, v)
        code = main(args)
    out = capsys.readouterr()
    return code, out.out[-4000:] + out.err[-4000:]


def _files_with_commands() -> list[Path]:
    return [f for f in DOC_FILES if extract(f)]


@pytest.mark.slow
@pytest.mark.parametrize("doc", _files_with_commands(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_commands_run(doc, project, monkeypatch, capsys):
    commands = extract(doc)
    if any(c.argv and c.argv[0] in ("push", "status", "pull") for c in commands):
        pytest.importorskip("kaggle", reason="the Kaggle client (pip install -e '.[kaggle]')")
    from kaggletrain.kaggle.fake_server import FakeKaggle

    timings = []
    with FakeKaggle() as server:
        monkeypatch.setenv("KAGGLETRAIN_KAGGLE_ENDPOINT", server.url)
        for cmd in commands:
            if cmd.text in SKIPPED:
                timings.append((cmd.where, "skipped: " + SKIPPED[cmd.text]))
                continue
            args = adapt(cmd, project)
            if args and args[0] in ("status", "pull"):
                _prepare_kernel(server, args, project)
            t0 = time.perf_counter()
            if cmd.torchrun is not None:
                code, output = _run_torchrun(cmd, args, project)
            else:
                code, output = _run_in_process(cmd, args, monkeypatch, capsys)
            timings.append((cmd.where, f"{time.perf_counter() - t0:.1f} s  {cmd.text}"))
            assert code == 0, (f"{cmd.where}: `{cmd.text}` exited {code}\nrun as: kaggletrain {shlex.join(args)}\n"
                               f"{output}")
    with capsys.disabled():
        print("\n" + "\n".join(f"  {w}: {t}" for w, t in timings))


# ---------------------------------------------------------------------------------------------------
# Links

# Pages that are linked before they exist, with who writes them.
PENDING = {"docs/performance.md": "assembled by the lead from every engineer's measurements (issue 9)"}


def test_relative_links_resolve():
    missing = []
    for f in DOC_FILES:
        text = re.sub(r"```.*?```", "", f.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (f.parent / target.split("#")[0]).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if not path.exists() and rel not in PENDING:
                missing.append(f"{f.relative_to(ROOT)}: {target}")
    assert not missing, "broken links:\n" + "\n".join(missing)
