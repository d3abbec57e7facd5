"""Issue 11 on a CPU: how close a dry run's projected step time comes to a real run's, pair by pair.

Each pair runs `kaggletrain train CFG --dry-run --steps 24 --json`, then the real 48-step run of the same
config (the configuration tests/test_dry_run.py uses: 2 x 32 RWKV, batch 8 x 64 tokens, characters,
OMP_NUM_THREADS=1), and reports the dry run's median step / the real run's median step (its first two
steps and evaluation steps left out) and the dry run's CPU share of a core.

    python benchmarks/bench_dry_run_cpu.py [--pairs 3] [--load] [--json OUT]

--load runs a 2-thread matmul loop beside every pair (a steady competing load: the dry run should then
warn that other processes take the CPU, and still predict the real run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LOAD = """
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a.T / 512)
"""


def write_config(tmp: Path) -> Path:
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n"
                              for i in range(3000)))
    cfg = {
        "name": "dry-vs-real", "out_dir": str(tmp / "run"),
        "model": {"hidden_size": 32, "num_layers": 2, "head_size": 16, "vocab_size": None},
        "data": {"source": str(corpus), "tokenizer": "char", "cache_dir": str(tmp / "cache")},
        "train": {"seq_len": 64, "batch_size": 8, "max_steps": 48, "lr": 3e-3, "warmup_steps": 2,
                  "eval_interval": 24, "eval_batches": 2},
        "checkpoint": {"every_steps": 4, "keep_last": 0},
        "logging": {"log_interval": 1, "progress": False},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kaggletrain", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"kaggletrain {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc


def pair(cfg: Path, run_dir: Path) -> dict:
    rep = json.loads(cli("train", cfg, "--dry-run", "--steps", "24", "--json").stdout)
    cli("train", cfg)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    real = statistics.median(r["step_s"] for r in recs[2:] if "val_loss" not in r)
    return {"dry_step_s": rep["step_time_s"], "real_step_s": real, "dry_over_real": rep["step_time_s"] / real,
            "dry_cpu_share": rep["step_cpu_time_s"] / rep["step_time_s"], "warnings": rep["warnings"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--load", action="store_true", help="a steady 2-thread matmul loop beside the runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    load = subprocess.Popen([sys.executable, "-c", LOAD]) if args.load else None
    try:
        results = []
        for i in range(args.pairs):
            with tempfile.TemporaryDirectory(prefix="kt-dry-") as tmp:
                cfg = write_config(Path(tmp))
                r = pair(cfg, Path(tmp) / "run")
            results.append(r)
            print(f"pair {i + 1}: dry {r['dry_step_s'] * 1000:.1f} ms / real {r['real_step_s'] * 1000:.1f} ms = "
                  f"{r['dry_over_real']:.2f}; dry run's CPU share {r['dry_cpu_share']:.0%}"
                  + "".join(f"; warning: {w}" for w in r["warnings"] if "competing" in w))
    finally:
        if load is not None:
            load.kill()
            load.wait()
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "load": args.load, "os_cpus": os.cpu_count(), "pairs": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
