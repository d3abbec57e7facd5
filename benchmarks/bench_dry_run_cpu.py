"""Issue 11 on a CPU: how close a dry run's projected step time comes to a real run's, pair by pair.

Sequential pairs (the default) run `kaggletrain train CFG --dry-run --steps 24 --json`, then the real 48-step
run of the same config (2 x 32 RWKV, batch 8 x 64 tokens, characters, OMP_NUM_THREADS=1), and report the dry
run's median step / the real run's median step (its first two steps and evaluation steps left out), the same
ratio for CPU time per step, and each run's CPU share of a core.

--beside pairs measure the two side by side instead (what tests/test_dry_run.py checks): a long real run
trains pinned to one core, the dry run runs pinned to the same core, and the ratio uses the real run's steps
inside the dry run's measured window (`measured_window_unix`), so both runs see the same moment's machine.

    python benchmarks/bench_dry_run_cpu.py [--pairs 3] [--beside] [--load] [--json OUT]

--load runs a 2-thread matmul loop beside every pair (a steady competing load: the dry run should then
warn that other processes take the CPU, and still predict the real run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kaggletrain.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
LOAD = """
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a.T / 512)
"""


def write_config(tmp: Path, max_steps: int = 48, eval_interval: int = 24, every_steps: int = 4) -> Path:
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n"
                              for i in range(3000)))
    cfg = {
        "name": "dry-vs-real", "out_dir": str(tmp / "run"),
        "model": {"hidden_size": 32, "num_layers": 2, "head_size": 16, "vocab_size": None},
        "data": {"source": str(corpus), "tokenizer": "char", "cache_dir": str(tmp / "cache")},
        "train": {"seq_len": 64, "batch_size": 8, "max_steps": max_steps, "lr": 3e-3,
                  "warmup_steps": 2, "eval_interval": eval_interval, "eval_batches": 2},
        "checkpoint": {"every_steps": every_steps, "keep_last": 0},
        "logging": {"log_interval": 1, "progress": False},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def on_core(cpu: int | None):
    """A preexec_fn that pins the child process to one core (None: no pinning)."""
    return None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))


def cli(*args, cpu: int | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kaggletrain", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=REPO, preexec_fn=on_core(cpu))
    if proc.returncode:
        raise SystemExit(f"kaggletrain {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc


def compare(rep: dict, steps: list[dict]) -> dict:
    real = statistics.median(r["step_s"] for r in steps)
    real_cpu = statistics.median(r["step_cpu_s"] for r in steps)
    return {"dry_step_s": rep["step_time_s"], "real_step_s": real, "dry_over_real": rep["step_time_s"] / real,
            "dry_cpu_s": rep["step_cpu_time_s"], "real_cpu_s": real_cpu,
            "dry_cpu_over_real_cpu": rep["step_cpu_time_s"] / real_cpu,
            "dry_cpu_share": rep["step_cpu_time_s"] / rep["step_time_s"], "real_cpu_share": real_cpu / real,
            "warnings": rep["warnings"]}


def sequential_pair(tmp: Path) -> dict:
    cfg = write_config(tmp)
    rep = json.loads(cli("train", cfg, "--dry-run", "--steps", "24", "--json").stdout)
    cli("train", cfg)
    recs = read_metrics(tmp / "run" / "metrics.jsonl")
    return compare(rep, [r for r in recs[2:] if "val_loss" not in r])


def beside_pair(tmp: Path, cpu: int) -> dict:
    cfg = write_config(tmp, max_steps=100_000, eval_interval=0, every_steps=0)
    metrics = tmp / "run" / "metrics.jsonl"
    real = subprocess.Popen([sys.executable, "-m", "kaggletrain", "train", str(cfg)], env=ENV, cwd=REPO,
                            preexec_fn=on_core(cpu), stdout=subprocess.DEVNULL)
    try:
        while len(read_metrics(metrics)) < 3:
            if real.poll() is not None:
                raise SystemExit("the real run stopped before logging a step")
            time.sleep(0.1)
        rep = json.loads(cli("train", cfg, "--dry-run", "--steps", "24", "--json", cpu=cpu).stdout)
    finally:
        real.send_signal(signal.SIGTERM)
        real.wait()
    start, end = rep["measured_window_unix"]
    recs = read_metrics(metrics)
    return compare(rep, [r for r in recs if start <= r["time"] - r["step_s"] and r["time"] <= end])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--beside", action="store_true", help="the real run beside the dry run on one core")
    ap.add_argument("--load", action="store_true", help="a steady 2-thread matmul loop beside the runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    load = subprocess.Popen([sys.executable, "-c", LOAD]) if args.load else None
    try:
        results = []
        for i in range(args.pairs):
            with tempfile.TemporaryDirectory(prefix="kt-dry-") as tmp:
                cpus = sorted(os.sched_getaffinity(0))
                r = beside_pair(Path(tmp), cpus[i % len(cpus)]) if args.beside else sequential_pair(Path(tmp))
            results.append(r)
            print(f"pair {i + 1}: dry {r['dry_step_s'] * 1000:.1f} ms / real {r['real_step_s'] * 1000:.1f} ms = "
                  f"{r['dry_over_real']:.2f}; CPU time {r['dry_cpu_over_real_cpu']:.2f}; CPU share dry "
                  f"{r['dry_cpu_share']:.0%}, real {r['real_cpu_share']:.0%}"
                  + "".join(f"; warning: {w}" for w in r["warnings"] if "competing" in w))
    finally:
        if load is not None:
            load.kill()
            load.wait()
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "mode": "beside" if args.beside else "sequential",
                                         "load": args.load, "os_cpus": os.cpu_count(), "pairs": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
