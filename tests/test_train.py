"""Training path end to end through the real CLI (subprocesses), plus the loop's building blocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kaggletrain.train import checkpoint as ckpt
from kaggletrain.train.optim import lr_at, param_groups
from kaggletrain.train.precision import resolve_precision

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs.\n") * 60


def write_config(tmp_path: Path, **train) -> Path:
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    cfg = {
        "name": "t",
        "out_dir": str(tmp_path / "run"),
        "model": {"hidden_size": 32, "num_layers": 2, "head_size": 16, "vocab_size": None},
        "data": {"source": str(data), "tokenizer": "char", "cache_dir": str(tmp_path / "cache")},
        "train": {"seq_len": 32, "batch_size": 4, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2,
                  "eval_interval": 4, "eval_batches": 2, **train},
        "checkpoint": {"every_steps": 4, "keep_last": 0},
        "logging": {"log_interval": 1, "progress": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args, cwd=None, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "kaggletrain", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def load_weights(ckpt_dir: Path) -> dict:
    return ckpt.load_model_state(ckpt_dir)


@pytest.mark.slow
def test_train_resume_eval_end_to_end(tmp_path):
    cfg = write_config(tmp_path)
    run_cli("train", cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "summary.json", "checkpoints/latest"):
        assert (run / name).exists(), name
    steps = sorted(p.name for p in ckpt.list_checkpoints(run / "checkpoints"))
    assert steps == ["step-00000004", "step-00000008"]
    full = load_weights(run / "checkpoints/step-00000008")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns
    assert any("val_loss" in r for r in recs)
    # The resolved config written to the run directory is itself a valid config.
    from kaggletrain.config import load_config

    assert load_config(run / "config.yaml").train.max_steps == 8

    # Simulate an interruption after step 4: drop the last checkpoint, then resume.
    shutil.rmtree(run / "checkpoints/step-00000008")
    (run / "checkpoints/latest").write_text("step-00000004\n")
    run_cli("train", cfg, "--resume")
    resumed = load_weights(run / "checkpoints/step-00000008")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), f"{k} differs after resume"
    recs2 = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs2] == [r["loss"] for r in recs]  # identical losses, no duplicates

    # Starting again without --resume refuses instead of overwriting.
    proc = run_cli("train", cfg, check=False)
    assert proc.returncode == 2
    assert "already holds checkpoints" in proc.stderr and "Traceback" not in proc.stderr

    out = run_cli("eval", run, "--json").stdout
    res = json.loads(out)
    assert res["step"] == 8 and 0 < res["val_loss"] < 10
    assert res["perplexity"] == pytest.approx(torch.tensor(res["val_loss"]).exp().item(), rel=1e-6)
    assert 0 < res["bits_per_byte"] < 20 and res["tokens"] > 0


@pytest.mark.slow
def test_resume_refuses_data_whose_document_ends_changed(tmp_path):
    # World text data now ends every document with token 0; a run tokenised the old way (separator) cannot
    # continue its data stream on the new tokens, and says why and what to do, in one line.
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"text": f"User: question {i}?\n\nAssistant: answer {i}."}) + "\n"
                             for i in range(60)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "w", "out_dir": str(tmp_path / "run"), "model": {"hidden_size": 32, "num_layers": 1, "head_size": 16},
        "data": {"source": str(chats), "tokenizer": "world", "document_end": "separator", "val_fraction": 0,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"seq_len": 16, "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "eval_interval": 100},
        "checkpoint": {"every_steps": 2}, "logging": {"progress": False}}))
    run_cli("train", cfg)
    proc = run_cli("train", cfg, "--resume", "data.document_end=auto", "train.max_steps=4", check=False)
    ckpt_dir = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = " ".join(proc.stderr.split())  # (rich wraps long lines)
    assert (f"{ckpt_dir}: cannot continue the saved data stream: it was drawn from 779 training tokens and the "
            "data now gives 780") in line
    assert "data.document_end" in line and f"model.init_from={ckpt_dir}" in line


def test_overrides_and_bad_config_errors(tmp_path):
    cfg = write_config(tmp_path)
    proc = run_cli("train", cfg, "train.lrr=1", check=False)
    assert proc.returncode == 2 and "train.lrr" in proc.stderr and "did you mean" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("train", tmp_path / "missing.yaml", check=False)
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr


def test_param_groups_follow_official_recipe():
    from kaggletrain import ModelConfig, RWKVModel

    m = RWKVModel(ModelConfig(hidden_size=32, num_layers=2, head_size=16, vocab_size=50))
    groups = {g["name"]: g for g in param_groups(m, weight_decay=0.1)}
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert "emb.weight" in decay and "head.weight" in decay and "blocks.1.att.key.weight" in decay
    assert not any(n.endswith(("w1", "w2", "x_r", "ln1.weight", "ln_x.weight")) for n in decay)
    assert {names[id(p)] for p in groups["w0_2x"]["params"]} == {"blocks.0.att.w0", "blocks.1.att.w0"}
    assert groups["w0_2x"]["lr_scale"] == 2.0
    # The unused value-residual LoRA of the first RWKV layer is frozen and not optimised.
    optimised = {names[id(p)] for g in groups.values() for p in g["params"]}
    assert not optimised & {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    assert {"blocks.1.att.v0", "blocks.1.att.v1", "blocks.1.att.v2"} <= optimised


def test_lr_schedule_warmup_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=110, schedule="cosine")
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(50, **{**kw, "schedule": "constant"}) == 1.0


def test_precision_auto_on_cpu_is_fp32():
    p = resolve_precision("auto", torch.device("cpu"))
    assert p.name == "fp32" and p.amp_dtype is None and not p.use_scaler
    p = resolve_precision("fp16", torch.device("cpu"))
    assert p.amp_dtype == torch.float16 and p.use_scaler  # loss scaling on a CPU too, as on a T4


def test_checkpoint_pointer_falls_back_to_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    sd = {"w": torch.randn(3, 3)}
    meta = ckpt.model_meta({"hidden_size": 1}, 1)
    ckpt.save_checkpoint(root, 1, model_state=sd, meta=meta)
    ckpt.save_checkpoint(root, 2, model_state={"w": sd["w"] + 1}, meta=meta)
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    # A half-written temporary directory (crash mid-write) is never taken as a checkpoint.
    (root / ".tmp-step-00000003-999").mkdir()
    (root / ".tmp-step-00000003-999" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    # A pointer to a vanished directory falls back to the newest complete one.
    (root / "latest").write_text("step-00000009\n")
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    ckpt.save_checkpoint(root, 3, model_state=sd, meta=meta, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000003"]


def test_future_and_foreign_checkpoints_are_rejected(tmp_path):
    from kaggletrain.errors import CheckpointError

    d = tmp_path / "c"
    ckpt.save_checkpoint(d, 1, model_state={"w": torch.ones(2)}, meta=ckpt.model_meta({}, 1))
    step = d / "step-00000001"
    meta = json.loads((step / "config.json").read_text())
    (step / "config.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="newer"):
        ckpt.read_meta(step)
    (step / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ckpt.load_model_state(step)


def test_a_bad_init_from_names_the_key_and_the_file(tmp_path):
    """model.init_from pointing at nothing, or at a file that holds no weights: one line naming the key (the
    readers name only the file) and the file, before anything is written."""
    cfg = write_config(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for target in (tmp_path / "missing.pth", tmp_path / "notes.txt"):
        proc = run_cli("train", cfg, f"model.init_from={target}", check=False)
        err = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert err.startswith("error: model.init_from: ") and target.name in err, err
    assert not (tmp_path / "run").exists()


def test_compile_on_cpu_is_a_clear_error(tmp_path):
    """train.compile is a GPU feature; on CPU it is refused in one line before anything is written."""
    cfg = write_config(tmp_path, compile=True, device="cpu")
    proc = run_cli("train", cfg, check=False)
    assert proc.returncode == 2
    assert "train.compile" in proc.stderr and "CUDA" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run/checkpoints").exists()


def test_a_failing_torch_compile_falls_back_to_eager_with_one_warning(tmp_path):
    """train.compile where torch.compile cannot work (here a backend that fails the way a missing compiler or
    an unsupported GPU does): one RuntimeWarning naming the error, compiling is turned off and the step runs
    again eagerly -- the same losses as a trainer that never compiled, evaluation included."""
    from kaggletrain.config import load_config
    from kaggletrain.train.loop import Trainer

    def no_compiler(gm, example_inputs):
        raise RuntimeError("Triton needs a C compiler, none found")

    torch._dynamo.reset()
    results = []
    for broken in (False, True):
        (tmp_path / str(broken)).mkdir()
        tr = Trainer(load_config(write_config(tmp_path / str(broken), max_steps=3)), resume=False,
                     progress=False).setup()
        try:
            if broken:
                tr.model.compile_for_training(backend=no_compiler)
                with pytest.warns(RuntimeWarning, match="train.compile: torch.compile failed") as rec:
                    first = tr.train_step()
                assert len(rec) == 1 and "C compiler" in str(rec[0].message), [str(r.message) for r in rec]
                assert not tr.model.compiled
            else:
                first = tr.train_step()
            results.append((first.loss, tr.train_step().loss, tr.evaluate(max_micro_batches=1)))
        finally:
            tr.close()
    assert results[1] == results[0]


def test_out_of_memory_in_a_compiled_step_is_not_taken_for_a_compiler_failure(tmp_path):
    """An allocation that fails while a compiled step runs (here a real one: the CPU allocator refuses 2^62
    bytes) is the batch's problem, not the compiler's: compiling stays on, no fallback warning, and fit()
    stops with the one-line out-of-memory error that names the micro batch and the dry run."""
    import warnings

    from kaggletrain.config import load_config
    from kaggletrain.train.loop import Trainer, TrainingError

    def allocates_too_much(gm, example_inputs):
        def run(*args):
            torch.empty(1 << 62, dtype=torch.uint8)
            return gm(*args)
        return run

    torch._dynamo.reset()
    cfg_path = write_config(tmp_path, max_steps=3)
    tr = Trainer(load_config(cfg_path), resume=False, progress=False).setup()
    try:
        tr.model.compile_for_training(backend=allocates_too_much)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(TrainingError, match="out of memory in training step 1 on cpu") as exc:
                tr.fit()
        assert tr.model.compiled
        msg = str(exc.value)
        assert "can't allocate memory" in msg and f"kaggletrain train {cfg_path} --dry-run" in msg, msg
        assert "train.micro_batch_size=4 x train.seq_len=32" in msg, msg
    finally:
        tr.close()
        torch._dynamo.reset()


@pytest.mark.slow
def test_a_fine_tune_evaluates_and_resumes_once_its_init_from_base_is_gone(tmp_path):
    """A run started from model.init_from holds every weight in its checkpoints: `eval RUN` and `train --resume`
    (and its dry run) work once the base is gone (a fine-tune whose base came from /kaggle/input, pulled home)."""
    (tmp_path / "base").mkdir()
    run_cli("train", write_config(tmp_path / "base", max_steps=1))
    run_cli("train", write_config(tmp_path, max_steps=2, eval_interval=0), f"model.init_from={tmp_path / 'base/run'}")
    shutil.rmtree(tmp_path / "base")
    run = tmp_path / "run"
    result = json.loads(run_cli("eval", run, "--json").stdout)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["step"] == 2 and result["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    run_cli("train", run / "config.yaml", "--resume", "train.max_steps=3", "--dry-run", "--steps", "2")
    run_cli("train", run / "config.yaml", "--resume", "train.max_steps=3")
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step-00000003"
    # A fresh start still needs the base, and says so.
    proc = run_cli("train", run / "config.yaml", f"out_dir={tmp_path / 'fresh'}", check=False)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and err.startswith("error: model.init_from: ") and "base" in err, err


@pytest.mark.slow
def test_validation_covers_the_same_windows_whatever_the_micro_batch(tmp_path):
    """train.micro_batch_size only saves memory: an evaluation covers eval_batches x batch_size windows, run in
    micro-batches, so a checkpoint's val_loss, token count and bits per byte, and a run's logged val_loss, are
    those of the run without micro-batches."""
    cfg = write_config(tmp_path, max_steps=2, eval_interval=0)
    run_cli("train", cfg)
    run_cli("train", cfg, f"out_dir={tmp_path / 'micro'}", "train.micro_batch_size=1")
    whole, micro = (json.loads(run_cli("eval", tmp_path / "run", "--json", *extra).stdout)
                    for extra in ([], ["train.micro_batch_size=1"]))
    assert whole["tokens"] == micro["tokens"] == 2 * 4 * 32  # eval_batches x batch_size windows of seq_len
    assert micro["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
    assert micro["bits_per_byte"] == pytest.approx(whole["bits_per_byte"], rel=1e-6)
    logged = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
              for name in ("run", "micro")]
    assert logged[0] == pytest.approx(whole["val_loss"], rel=1e-6)
    assert logged[1] == pytest.approx(logged[0], rel=1e-4)  # (the same training, summed in another order)


STOP_IN_STEP = r"""
import os, signal, sys
from kaggletrain.model import RWKVModel
from kaggletrain.cli import main

forward, calls = RWKVModel.forward, []

def forward_sending_sigterm(self, *a, **k):  # a real SIGTERM, as Kaggle's, inside the training step's forward
    calls.append(self.training)
    if self.training and calls.count(True) == int(os.environ["STOP_IN_STEP"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return forward(self, *a, **k)

RWKVModel.forward = forward_sending_sigterm
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [3, 6])
def test_a_run_stopped_at_an_evaluation_step_evaluates_it_when_resumed(tmp_path, stop_at):
    """A SIGTERM during an evaluation step (3 of 6; 6: the last) stops after the checkpoint without evaluating;
    the checkpoint records that, so `--resume` evaluates that step first: metrics.jsonl then reads as the
    uninterrupted run's, one record per step with its val_loss."""
    cfg = write_config(tmp_path, max_steps=6, eval_interval=3)
    run_cli("train", cfg)
    env = {**os.environ, "STOP_IN_STEP": str(stop_at)}
    stopped = subprocess.run([sys.executable, "-c", STOP_IN_STEP, "train", cfg, f"out_dir={tmp_path / 'split'}"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert stopped.returncode == 143 and f"checkpoint saved at step {stop_at}" in stopped.stdout, stopped.stderr
    assert ckpt.read_meta(tmp_path / f"split/checkpoints/step-{stop_at:08d}")["eval_pending"] is True
    run_cli("train", cfg, f"out_dir={tmp_path / 'split'}", "--resume")
    full, split = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                   for name in ("run", "split"))
    assert [r["step"] for r in split] == [r["step"] for r in full] == list(range(1, 7))
    for a, b in zip(full, split):
        assert b["loss"] == a["loss"] and ("val_loss" in b) == ("val_loss" in a), (a, b)
        if "val_loss" in a:  # (newer pytest refuses approx(None))
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6), (a, b)
    assert json.loads((tmp_path / "split/summary.json").read_text())["val_loss"] == pytest.approx(full[-1]["val_loss"])
