"""`kaggletrain train CONFIG --dry-run`: the real path for a few steps, reported, nothing left behind."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kaggletrain.train.metrics import read_metrics
from test_train import write_config

FIELDS = ("parameters", "trainable_parameters", "tokens_per_step", "step_time_s", "tokens_per_s",
          "peak_memory_bytes", "projected_run_s", "fits_kaggle_session", "projected_t4_memory_gb", "fits_t4",
          "t4_memory_method", "precision", "wkv_impl", "attention_backend", "warnings", "val_loss_one_batch",
          "measured_window_unix")


DRY_STEPS = 24


def cli(*args):
    # One thread per process: with pytest-xdist on 2 cores, 2 threads each oversubscribe the CPU and make
    # step times swing by several x between the dry run and the real run.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kaggletrain", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def tree(path: Path) -> dict:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


@pytest.mark.slow
def test_dry_run_reports_every_field_and_leaves_the_run_directory_alone(tmp_path):
    cfg = write_config(tmp_path, max_steps=48, batch_size=8, seq_len=64, eval_interval=24)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("user file")
    before = tree(run_dir)

    proc = cli("train", cfg, "--dry-run", "--steps", DRY_STEPS, "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    for key in FIELDS:
        assert key in rep, key
    assert tree(run_dir) == before  # nothing written to the run directory
    assert rep["tokens_per_step"] == 8 * 64
    assert rep["parameters"] > rep["trainable_parameters"] > 0  # the first layer's v0/v1/v2 are frozen
    assert 0 < rep["step_time_s"] < 60
    assert rep["tokens_per_s"] == pytest.approx(rep["tokens_per_step"] / rep["step_time_s"])
    assert rep["peak_memory_bytes"] > 10 * 2**20
    assert rep["measured_steps"] == DRY_STEPS - 2  # the first two steps are warm-up
    assert 0 < rep["step_cpu_time_s"] < 60
    assert rep["projected_run_s"] >= 48 * rep["step_time_s"]
    assert rep["fits_kaggle_session"] is True and rep["fits_t4"] is True
    assert 0 < rep["projected_t4_memory_gb"] < 16 and rep["t4_memory_method"].startswith("rehearsed: ")
    parts = rep["t4_memory_breakdown"]
    assert parts["weights"] > 0 and parts["adamw_moments"] == 2 * parts["gradients"] > 0
    assert sum(parts.values()) == pytest.approx(rep["projected_t4_memory_gb"] * 1e9)
    assert rep["t4_micro_batch_that_fits"] is None and rep["rehearsed_peak_memory_bytes"] is None  # (a CPU)
    assert rep["precision"] == "fp32" and rep["wkv_impl"] in ("chunked", "sequential")
    assert rep["attention_backend"].startswith("none")
    assert math.isfinite(rep["val_loss_one_batch"])
    assert not any("measured step" in w for w in rep["warnings"]), rep["warnings"]


def _on_one_core(cpu: int):
    return lambda: os.sched_setaffinity(0, {cpu})


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_dry_run_predicts_a_real_run_measured_beside_it(tmp_path):
    """The dry run's tokens/s against a real run's, measured on the same core over the same seconds.

    These VMs change speed by up to 1.4x from second to second and from core to core (a plain matmul loop
    flips between about 18 and 25 ms), so a dry run and a real run measured one after the other can be 1.5x
    apart with nothing wrong in the projection. Here the real run of the same config trains on one core while
    the dry run runs pinned to that core too: both get half of it, both see the same slowdowns, and the
    comparison uses the real run's steps that ran inside the dry run's measured window. A dry run that
    measured different work (no backward, no optimizer step, another batch) would still be far off.
    """
    cfg = write_config(tmp_path, max_steps=100_000, batch_size=8, seq_len=64, eval_interval=0)
    data = yaml.safe_load(cfg.read_text())
    data["checkpoint"]["every_steps"] = 0  # the real run only trains until it is stopped
    cfg.write_text(yaml.safe_dump(data))
    cpu = sorted(os.sched_getaffinity(0))[0]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    metrics = tmp_path / "run" / "metrics.jsonl"
    real_log = tmp_path / "real.log"  # a file, not a pipe: nothing reads it while the run goes on
    with open(real_log, "w") as log:
        real = subprocess.Popen([sys.executable, "-m", "kaggletrain", "train", str(cfg)], env=env,
                                preexec_fn=_on_one_core(cpu), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while len(read_metrics(metrics)) < 3:
            assert real.poll() is None, real_log.read_text()
            assert time.monotonic() < deadline, "the real run logged no steps in 300 s"
            time.sleep(0.1)
        dry = subprocess.run([sys.executable, "-m", "kaggletrain", "train", str(cfg), "--dry-run", "--steps",
                              str(DRY_STEPS), "--json"], capture_output=True, text=True, env=env,
                             preexec_fn=_on_one_core(cpu), timeout=600)
        assert real.poll() is None, "the real run ended before the dry run did"
    finally:
        real.send_signal(signal.SIGTERM)
        real.wait(timeout=120)
    assert dry.returncode == 0, dry.stderr
    rep = json.loads(dry.stdout)
    start, end = rep["measured_window_unix"]
    assert 0.5 * rep["measured_steps"] * rep["step_time_s"] < end - start < 600
    recs = read_metrics(metrics)
    beside = sorted(r["step_s"] for r in recs if start <= r["time"] - r["step_s"] and r["time"] <= end)
    assert len(beside) >= 5, (start, end, recs[-3:])
    real_tps = rep["tokens_per_step"] / beside[len(beside) // 2]
    assert rep["tokens_per_s"] == pytest.approx(real_tps, rel=0.30), (rep["tokens_per_s"], real_tps)
    # Each process had half the core, and the dry run said so.
    assert any("competing for the CPU" in w for w in rep["warnings"]), rep["warnings"]


def test_dry_run_table_output(tmp_path):
    cfg = write_config(tmp_path, max_steps=10)
    proc = cli("train", cfg, "--dry-run", "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    for text in ("tokens/s", "peak memory", "projected run time", "projected T4 memory", "precision / WKV"):
        assert text in proc.stdout
    assert not (tmp_path / "run").exists()
    # 3 steps, 2 of them warm-up: the projection rests on one step, and the report says so.
    out = " ".join(proc.stdout.split())
    assert "the step time and the projection rest on 1 measured step after the warm-up: --steps 5 or more" in out


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"), reason="needs taskset")
def test_dry_run_warns_when_another_process_takes_the_core(tmp_path):
    """A busy-looping process pinned to the same core takes about half of it: the report says so."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    cfg = write_config(tmp_path, max_steps=40, batch_size=8, seq_len=64)
    hog = subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-m", "kaggletrain", "train", str(cfg),
                               "--dry-run", "--steps", "12", "--json"], capture_output=True, text=True, env=env,
                              timeout=600)
    finally:
        hog.kill()
        hog.wait()
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["step_cpu_time_s"] < 0.7 * rep["step_time_s"]
    assert any("competing for the CPU" in w for w in rep["warnings"]), rep["warnings"]


def test_out_of_memory_search_halves_the_micro_batch_without_nesting(tmp_path, monkeypatch):
    """A CUDA out-of-memory error cannot be produced on this CPU machine, so the step raises it above a
    micro batch of 2 (what a too-small GPU does; the CPU allocator's own failure is real in the test below).
    The dry run reports it and answers with the largest micro batch that fits, found by probes that run steps
    only and never search again themselves."""
    import torch

    from kaggletrain.config import load_config
    from kaggletrain.train import dry_run as dr
    from kaggletrain.train.loop import Trainer

    real_step, probes = Trainer.train_step, []

    def step(self):
        if self.micro > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_step(self)

    real_dry_run = dr.dry_run

    def counting_dry_run(cfg, steps=10, _trial=False):
        probes.append((cfg.train.micro_batch_size, cfg.train.gradient_checkpointing, _trial))
        return real_dry_run(cfg, steps, _trial)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(dr, "dry_run", counting_dry_run)
    cfg = load_config(write_config(tmp_path, batch_size=8, micro_batch_size=8, max_steps=20, seq_len=32))
    rep = real_dry_run(cfg, steps=3)
    assert rep["out_of_memory"].startswith("CUDA out of memory")
    assert rep["suggestion"]["micro_batch_size"] == 2 and rep["suggestion"]["gradient_checkpointing"] is False
    assert [t["micro_batch_size"] for t in rep["suggestion"]["tried"]] == [4, 2]
    assert probes == [(4, False, True), (2, False, True)]  # steps-only probes, no nested searches
    assert math.isfinite(rep["val_loss_one_batch"])  # the evaluation batch does not run the failing step


# Runs the CLI in a process whose address space is capped (RLIMIT_AS) `budget` bytes above what python, torch
# and kaggletrain take once imported: the CPU allocator then fails as a GPU's does when a batch does not fit.
# With $PEAK_FILE set, the run's address-space peak above the imports is written there at exit.
LIMITED_CLI = r"""
import atexit, os, sys
import torch
import kaggletrain.cli, kaggletrain.train.dry_run, kaggletrain.train.loop, kaggletrain.commands.train
from memory_caps import cap_above_now, vm_peak, vm_size  # tests/memory_caps.py

base = vm_size()
cap_above_now(int(sys.argv[1]))

def write_peak():
    with open(os.environ["PEAK_FILE"], "w") as f:
        f.write(str(vm_peak() - base))

if os.environ.get("PEAK_FILE"):
    atexit.register(write_peak)
sys.exit(kaggletrain.cli.main(sys.argv[2:]))
"""
TESTS = Path(__file__).resolve().parent


def run_script(script: str, *args, **env) -> subprocess.CompletedProcess:
    """`python -c script args...` with one thread and tests/ on the path (for memory_caps)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def limited_cli(budget: int, *args, **env):
    # glibc's dynamic mmap threshold let freed tensors stay mapped in the heap, and the peaks of identical runs
    # varied by up to 300 MiB; with a fixed threshold they repeat to the MiB (and agree across torch builds).
    return run_script(LIMITED_CLI, budget, *args, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="131072",
                      PYTHONHASHSEED="0", **env)


def oom_config(tmp_path: Path) -> Path:
    """2 x 64 RWKV, micro batches of 8 x 2048 characters: the activations dominate what a step maps."""
    import random

    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(rng.choice("abcdefghij klmnop\n") for _ in range(200_000)))
    cfg = {"name": "oom", "out_dir": str(tmp_path / "run"),
           "model": {"hidden_size": 64, "num_layers": 2, "head_size": 16, "vocab_size": None},
           "data": {"source": str(corpus), "tokenizer": "char", "cache_dir": str(tmp_path / "cache")},
           "train": {"seq_len": 2048, "batch_size": 8, "micro_batch_size": 8, "max_steps": 2, "eval_interval": 0},
           "logging": {"progress": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_real_out_of_memory_is_answered_with_a_batch_that_fits(tmp_path):
    """No simulated error: the run's address space is capped halfway between what real runs at micro batches 4
    and 8 map above the imports (measured first, uncapped, with the token cache already built), so micro batches
    of 8 x 2048 tokens really fail to allocate and 4 fit. The dry run reports the failure and answers with 4,
    found by a probe; the real run at 8 stops with one line that says what ran out and how to find what fits;
    the answer (4) then trains under the same cap. Measured peaks: 309 and 590 MiB, the same to 2 MiB with torch
    2.13 CPU on Python 3.11 and torch 2.11+cu130 on 3.12. (The fixed 700 MiB cap this test had before left 4 no
    room under 2.11, whose peaks, with glibc's default allocator settings, were 672 and 862 MiB.)"""
    from kaggletrain.config import load_config
    from kaggletrain.data import prepare_data

    path = oom_config(tmp_path)
    cfg = load_config(path)
    prepare_data(cfg.data, seq_len=cfg.train.seq_len)  # the token cache: so that no run below maps its building
    peaks = {}
    for micro in (4, 8):
        peak_file = tmp_path / f"peak{micro}"
        proc = limited_cli(64 * 2**30, "train", path, f"train.micro_batch_size={micro}",
                           f"out_dir={tmp_path / f'uncapped{micro}'}", PEAK_FILE=str(peak_file))
        assert proc.returncode == 0, proc.stderr
        peaks[micro] = int(peak_file.read_text())
    assert peaks[8] - peaks[4] > 128 * 2**20, peaks  # else the micro batch would not decide what fits
    budget = (peaks[4] + peaks[8]) // 2

    def limited(*args):
        return limited_cli(budget, *args)

    proc = limited("train", path, "--dry-run", "--steps", "2", "--json")
    assert proc.returncode == 3, proc.stderr  # the report says the real run would stop
    rep = json.loads(proc.stdout)
    assert "can't allocate memory" in rep["out_of_memory"], rep["out_of_memory"]
    assert rep["real_run_would_stop"] == [rep["out_of_memory"]]
    assert rep["suggestion"] == {"micro_batch_size": 4, "gradient_checkpointing": False,
                                 "tried": [{"micro_batch_size": 4, "gradient_checkpointing": False, "fits": True}]}
    # No step finished: nothing to project from, and the JSON says so with nulls (it used to print NaN).
    assert rep["step_time_s"] is None and rep["projected_run_s"] is None and rep["fits_kaggle_session"] is None
    assert rep["first_loss"] is None
    # The T4 projection is rehearsed on fake tensors, not taken from the measured peak: it stands.
    assert rep["t4_memory_method"].startswith("rehearsed") and rep["fits_t4"] is True
    assert 0 < rep["projected_t4_memory_gb"] < 1
    assert not (tmp_path / "run").exists()

    proc = limited("train", path, "--dry-run", "--steps", "2")  # the table, from the same report
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "n/a → n/a" in out and "suggestion: train.micro_batch_size=4 fits (tried micro batches 4: fits)" in out, out
    # A rehearsal names the first "would stop" line as the cause: it must be one line, with the error in it.
    from kaggletrain.kaggle.kernel_runtime import failure_summary

    cause = failure_summary(proc.stdout.splitlines())
    assert cause.startswith("the real run would stop: ") and "can't allocate memory" in cause, cause

    proc = limited("train", path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = " ".join(proc.stderr.split())
    assert "Traceback" not in err and err.startswith("error: out of memory in training step 1 on cpu"), err
    assert "train.micro_batch_size=8 x train.seq_len=2048" in err and f"kaggletrain train {path} --dry-run" in err

    proc = limited("train", path, "train.micro_batch_size=4")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


CAPPED_READS_CLI = r"""
import sys
import kaggletrain.cli
from memory_caps import cap_checkpoint_reads  # tests/memory_caps.py

cap_checkpoint_reads(64 * 1024)
sys.exit(kaggletrain.cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_out_of_memory_in_the_checkpoint_round_trip_is_reported_without_a_batch_search(tmp_path):
    """The steps fit, the checkpoint reload does not: while the weights file is opened the address space may grow
    by only 64 KiB, so mapping the ~180 KB file really fails. The report says where memory ran out (it used to
    stop with the file called truncated or corrupted, or a traceback), warns that a real run's saves meet the
    same, still measures the evaluation batch, and searches no smaller batch: the steps' activations are freed
    by then, so a smaller micro batch would not help."""
    path = write_config(tmp_path, batch_size=4, max_steps=20)
    proc = run_script(CAPPED_READS_CLI, "train", path, "--dry-run", "--steps", "3", "--json")
    assert proc.returncode == 3, proc.stderr
    rep = json.loads(proc.stdout)
    oom = rep["out_of_memory"]
    assert rep["real_run_would_stop"] == [oom] and rep["fits_t4"] is True  # the steps and evaluation fit
    assert oom.startswith("out of memory in the checkpoint save and reload: out of memory reading "), oom
    assert "model.safetensors" in oom and "Cannot allocate memory" in oom, oom
    assert "suggestion" not in rep
    assert any("checkpoint.save_optimizer=false" in w for w in rep["warnings"]), rep["warnings"]
    assert rep["tokens_per_s"] > 0 and math.isfinite(rep["val_loss_one_batch"])
    assert not (tmp_path / "run").exists()


def test_events_count_the_runs_evaluations_and_saves():
    """Every `every` steps and always at the last one (Trainer.fit), over the steps a run still has to do."""
    from kaggletrain.train.dry_run import events

    assert events(0, 20, 0) == 1  # 0: only at the end
    assert events(0, 20, 20) == 1 and events(0, 20, 15) == 2 and events(0, 20, 7) == 3
    assert events(0, 48, 3) == 16 and events(6, 150, 50) == 3 and events(5, 150, 50) == 3
    assert events(20, 20, 5) == 0 and events(25, 20, 5) == 0  # nothing left to run


def test_dry_run_meets_the_run_directory_as_the_real_run_would(tmp_path):
    """The dry run reads the configured run directory, never writes it, and warns of what would stop the real
    run at its start there (a warning: a Kaggle push starts from an empty directory, so `--dry-run && push`
    goes on); a run it would resume, it resumes too and projects only the remaining steps."""
    from kaggletrain.train.dry_run import events

    cfg = write_config(tmp_path, max_steps=6, eval_interval=3)
    run_dir = tmp_path / "run"
    assert cli("train", cfg).returncode == 0  # a real run: checkpoints at steps 4 and 6
    before = tree(run_dir)

    def stops_at_start(rep):
        return [w for w in rep["warnings"] if w.startswith("the real run would stop at its start here: ")]

    proc = cli("train", cfg, "--dry-run", "--steps", 2, "--json")  # checkpoints, and no --resume
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert len(stops_at_start(rep)) == 1 and "already holds checkpoints (step-00000006); pass --resume" \
        in stops_at_start(rep)[0], rep["warnings"]
    assert rep["real_run_would_stop"] == [] and rep["resumes_from"] is None and rep["tokens_per_s"] > 0

    proc = cli("train", cfg, "train.max_steps=20", "--resume", "--dry-run", "--steps", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["resumes_from"] == str(run_dir / "checkpoints" / "step-00000006") and rep["start_step"] == 6
    assert stops_at_start(rep) == []
    assert rep["projected_evaluations"] == events(6, 20, 3) == 5 and rep["projected_checkpoints"] == events(6, 20, 4)
    assert rep["projected_run_s"] >= 14 * rep["step_time_s"]
    resumed_loss = rep["first_loss"]
    fresh = json.loads(cli("train", cfg, f"out_dir={tmp_path / 'fresh'}", "--dry-run", "--steps", 2, "--json").stdout)
    assert resumed_loss < fresh["first_loss"] - 0.1, (resumed_loss, fresh["first_loss"])  # trained weights
    # A resume the real run refuses (the batch changed): a warning, and the steps start from fresh weights at
    # step 0, not from the checkpoint's weights, which used to be loaded before its data stream was refused.
    proc = cli("train", cfg, "train.max_steps=20", "train.batch_size=2", "--resume", "--dry-run", "--steps", 2,
               "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert len(stops_at_start(rep)) == 1 and "train.batch_size was 4 and is now 2" in stops_at_start(rep)[0]
    assert rep["start_step"] == 0 and rep["resumes_from"] is None
    assert rep["first_loss"] > resumed_loss + 0.1, (rep["first_loss"], resumed_loss)

    proc = cli("train", cfg, "model.hidden_size=64", "checkpoint.resume=auto", "--dry-run", "--steps", 2)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "the real run would stop at its start here:" in out and "does not match this config's model" in out, out

    proc = cli("train", cfg, f"out_dir={tmp_path / 'none'}", "--resume", "--dry-run", "--steps", 2, "--json")
    assert proc.returncode == 0 and "--resume: no checkpoint found under" in proc.stdout, proc.stdout
    (tmp_path / "a_file").write_text("")
    proc = cli("train", cfg, f"out_dir={tmp_path / 'a_file'}", "--dry-run", "--steps", 2, "--json")
    assert proc.returncode == 0 and "cannot write the run directory (File exists)" in proc.stdout, proc.stdout
    proc = cli("train", cfg, f"out_dir={tmp_path / 'a_file' / 'run'}", "--dry-run", "--steps", 2, "--json")
    assert proc.returncode == 0 and "cannot write the run directory (Not a directory: " in proc.stdout, proc.stdout

    # Optimizer state saved with other parameter groups (weight decay on): the real run stops with one line
    # (it used to stop with a ValueError traceback), and the dry run warns of it.
    real = cli("train", cfg, "train.max_steps=20", "train.weight_decay=0", "--resume")
    assert real.returncode == 2 and "Traceback" not in real.stderr, real.stderr
    assert "its optimizer state does not fit this run's trainable parameters (3 parameter groups saved, 2 in " \
        "this run)" in " ".join(real.stderr.split()), real.stderr
    proc = cli("train", cfg, "train.max_steps=20", "train.weight_decay=0", "--resume", "--dry-run", "--steps", 2,
               "--json")
    assert proc.returncode == 0 and "its optimizer state does not fit" in proc.stdout, (proc.stdout, proc.stderr)
    assert tree(run_dir) == before and not (tmp_path / "none").exists() and not (tmp_path / "fresh").exists()


def test_a_dry_run_whose_fp16_loss_scale_falls_below_1_says_the_real_run_would_stop(tmp_path):
    """The dry run resumes as the real run would: from a checkpoint whose fp16 loss scale had fallen to 1, the
    NaN steps after a 1e30 update halve it below 1, where a real run stops (the real run's side:
    test_reliability.py::test_fp16_loss_scale_floor_stops_the_run)."""
    cfg = write_config(tmp_path, max_steps=2, precision="fp16", device="cpu", eval_interval=0)
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    state_file = tmp_path / "run/checkpoints/step-00000002/trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["scaler"]["scale"] = 1.0
    torch.save(state, state_file)
    proc = cli("train", cfg, "train.lr=1e30", "train.warmup_steps=0", "train.max_steps=20", "--resume", "--dry-run",
               "--steps", 3, "--json")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    rep = json.loads(proc.stdout)
    assert rep["precision"] == "fp16" and rep["start_step"] == 2, rep
    assert any(p.startswith("fp16's loss scale fell to 0.25, below 1") and "a real run stops there" in p
               for p in rep["real_run_would_stop"]), rep["real_run_would_stop"]


def test_a_diverging_dry_run_prints_strict_json_and_says_the_real_run_would_stop(tmp_path):
    cfg = write_config(tmp_path, max_steps=20, lr=1e8, warmup_steps=0, grad_clip=0.0)
    proc = cli("train", cfg, "--dry-run", "--steps", 6, "--json")
    assert proc.returncode == 3, proc.stderr

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    rep = json.loads(proc.stdout, parse_constant=no_constants)
    assert rep["last_loss"] is None  # NaN
    assert any("not finite for" in p and "a real run stops after 3" in p for p in rep["real_run_would_stop"]), rep


def test_steps_and_json_go_with_dry_run(tmp_path):
    cfg = write_config(tmp_path)
    for flags in (["--json"], ["--steps", "3"]):
        proc = cli("train", cfg, *flags)
        assert proc.returncode == 2 and "goes with --dry-run" in proc.stderr, (flags, proc.stderr)
    assert not (tmp_path / "run").exists()


def test_sigterm_ends_a_dry_run_without_leaving_its_temporary_directory(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cfg = write_config(tmp_path, max_steps=100_000)
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kaggletrain", "train", str(cfg), "--dry-run", "--steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(scratch.glob("kaggletrain-dry-*/run/config.yaml")):  # the trainer has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # into the steps
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert list(scratch.iterdir()) == []


def test_a_config_too_big_for_a_t4_gets_the_micro_batch_that_fits(tmp_path):
    """The T4 projection is rehearsed (train/memory_rehearsal.py) at the configured micro batch; when it does not
    fit, the largest micro batch that does is found the same way, without running a step at either size."""
    from kaggletrain.config import load_config
    from kaggletrain.train.memory_rehearsal import rehearse_trainer_step
    from kaggletrain.train import dry_run as dr
    from kaggletrain.train.loop import Trainer

    path = write_config(tmp_path, seq_len=4096, batch_size=128, micro_batch_size=128)
    raw = yaml.safe_load(path.read_text())
    raw["model"].update(hidden_size=256, head_size=64)
    path.write_text(yaml.safe_dump(raw))
    (tmp_path / "corpus.txt").write_text("abcdefghij klmnopqrstuvwxyz.\n" * 20000)  # longer than one window
    cfg = load_config(path)
    trainer = Trainer(cfg, resume=False, progress=False)
    try:
        trainer.setup()
        warnings = []
        t4 = dr.t4_projection(cfg, trainer, 0, 0, None, warnings)
        fit = t4["fit"]
        assert not dr.fits_t4(t4["bytes"]) and fit["gradient_checkpointing"] is False
        # valid on one GPU and as the pushed notebook runs it on Kaggle's T4 x2 (2 processes)
        assert 128 % (2 * fit["micro_batch_size"]) == 0 and 1 <= fit["micro_batch_size"] < 128
        assert dr.fits_t4(fit["projected_gb"] * 1e9)
        bigger = rehearse_trainer_step(trainer, 2 * fit["micro_batch_size"], 1, torch.float16).peak_bytes
        assert not dr.fits_t4(bigger)  # the largest that fits
        assert warnings == [f"projected T4 memory {t4['bytes'] / 1e9:.1f} GB does not fit a 16 GB T4: "
                            f"train.micro_batch_size={fit['micro_batch_size']} would ({fit['projected_gb']:.1f} GB)"]
    finally:
        trainer.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case of a machine without a GPU")
def test_a_gpu_config_dry_runs_on_a_machine_without_one(tmp_path):
    """A Kaggle config (train.device=cuda) rehearsed on a laptop before `push`: the dry run used to stop at once
    ("no CUDA GPU is visible"), and so did `push --rehearse` of the shipped T4 configs. Now the steps run on the
    CPU, one sequence each, the T4 memory is rehearsed at the configured micro batch, no run time is projected
    from the CPU, and a real run still stops."""
    path = write_config(tmp_path, device="cuda", precision="fp16", batch_size=8, micro_batch_size=4, seq_len=64,
                        max_steps=20, compile=True)  # (torch.compile needs the GPU: the stand-in runs eager)
    proc = cli("train", path, "--dry-run", "--steps", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["warnings"][0].startswith("train.device=cuda, but no CUDA GPU is visible here: the steps ran on the "
                                         "CPU, one sequence of 64 tokens each, in fp16"), rep["warnings"]
    assert not any("emulated" in w for w in rep["warnings"]), rep["warnings"]  # (the GPU's precision, on purpose)
    # fp16 as configured, with its loss scaler, as on a T4 (before session 16: fp32 without one)
    assert rep["device"] == "cpu" and rep["precision"] == "fp16" and rep["tokens_per_step"] == 64
    assert rep["tokens_per_s"] > 0 and math.isfinite(rep["val_loss_one_batch"])
    assert rep["projected_run_s"] is None and rep["fits_kaggle_session"] is None
    assert rep["t4_memory_method"].startswith("rehearsed") and rep["fits_t4"] is True
    assert not (tmp_path / "run").exists()

    # The same config on the CPU as configured (4 sequences per micro-step; bf16, as many bytes as fp16)
    # rehearses the same T4 step.
    proc = cli("train", path, "train.device=cpu", "train.precision=bf16", "train.compile=false", "--dry-run",
               "--steps", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["projected_t4_memory_gb"] == rep["projected_t4_memory_gb"]

    proc = cli("train", path)
    assert proc.returncode == 2 and "no CUDA GPU is visible" in proc.stderr, proc.stderr

    # A run directory with a checkpoint (written by a CPU run of the same config): the dry run resumes from it
    # as the real run would, its saved data stream checked against the configured batch of 8, not the
    # stand-in's one sequence.
    proc = cli("train", path, "train.device=cpu", "train.precision=fp32", "train.compile=false",
               "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr
    proc = cli("train", path, "--resume", "--dry-run", "--steps", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["start_step"] == 4 and rep["resumes_from"].endswith("step-00000004"), rep
    assert not any(w.startswith("the real run would stop at its start") for w in rep["warnings"]), rep["warnings"]


@pytest.mark.skipif(torch.cuda.is_available() or not sys.platform.startswith("linux"),
                    reason="a machine without a GPU; reads /proc/self/status")
def test_the_cpu_stand_in_running_out_of_memory_is_not_the_gpu_running_out(tmp_path):
    """The one-sequence CPU steps of a GPU config can exhaust a small laptop (here: an address space capped 300
    MiB above the imports, one sequence of 65536 characters). That is this machine's limit, not the GPU's: a
    warning, no "the real run would stop", exit 0, and the T4 projection (rehearsed, not measured) stands."""
    path = oom_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["train"].update(device="cuda", precision="fp16", seq_len=65536, batch_size=2, micro_batch_size=2)
    raw["data"]["val_fraction"] = 0.0
    path.write_text(yaml.safe_dump(raw))
    proc = limited_cli(300 * 2**20, "train", path, "--dry-run", "--steps", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["real_run_would_stop"] == [] and rep["step_time_s"] is None
    assert any(w.startswith("the CPU stand-in ran out of this machine's memory (") and "can't allocate memory" in w
               for w in rep["warnings"]), rep["warnings"]
    assert rep["t4_memory_method"].startswith("rehearsed") and 1 < rep["projected_t4_memory_gb"] < 14.72


@pytest.mark.skipif(torch.cuda.is_available() or not sys.platform.startswith("linux"),
                    reason="a machine without a GPU; reads /proc/self/status")
def test_the_cpu_stand_in_running_out_of_memory_in_the_checkpoint_round_trip(tmp_path):
    """As above, with the checkpoint reload capped (64 KiB of address space while the weights file is read): one
    warning, about this machine, and none that tells the user a real run's saves would fail too."""
    path = write_config(tmp_path, batch_size=4, max_steps=20, device="cuda", precision="fp16")
    proc = run_script(CAPPED_READS_CLI, "train", path, "--dry-run", "--steps", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["real_run_would_stop"] == [] and "suggestion" not in rep
    assert any(w.startswith("the CPU stand-in ran out of this machine's memory (out of memory in the checkpoint "
                            "save and reload") for w in rep["warnings"]), rep["warnings"]
    assert not any("a real run's saves would too" in w for w in rep["warnings"]), rep["warnings"]
