"""How close the CPU step's rehearsal (kaggletrain/train/host_memory.py) is to what the step really takes from
the machine: the process's resident memory.

Each case runs in its own process: it builds the trainer (builtin corpus, bytes), reads its resident set
(VmRSS), rehearses the step on fake tensors (the bytes it needs beyond the weights), resets the kernel's
resident high-water mark (/proc/self/clear_refs), runs two real training steps and reads the high-water
mark (VmHWM) again. The ratio is rehearsed / (VmHWM - VmRSS before the steps). Linux only.

    OMP_NUM_THREADS=2 python benchmarks/bench_host_memory.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

CASES = [  # name, model overrides, train overrides
    ("fp32, 512 x 2, 16 x 512 tokens", {}, {"micro_batch_size": 16, "batch_size": 16}),
    ("fp32, 512 x 2, 32 x 512 tokens", {}, {"micro_batch_size": 32, "batch_size": 32}),
    ("bf16, 512 x 2, 32 x 512 tokens", {}, {"micro_batch_size": 32, "batch_size": 32, "precision": "bf16"}),
    ("fp32, gradient checkpointing, 32 x 512", {}, {"micro_batch_size": 32, "batch_size": 32,
                                                    "gradient_checkpointing": True}),
    ("fp32, hybrid (block 1 attention), 16 x 512", {"attention_layers": [1]}, {"micro_batch_size": 16,
                                                                             "batch_size": 16}),
    ("fp32, 768 x 4, vocab 50304 (GPT-2 ids of bytes), 8 x 512", {"hidden_size": 768, "num_layers": 4,
                                                                   "vocab_size": 50304},
     {"micro_batch_size": 8, "batch_size": 8}),
]

CHILD = r"""
import json, sys, time
from kaggletrain.config import load_config
from kaggletrain.train import host_memory
from kaggletrain.train.loop import Trainer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

cfg = load_config(sys.argv[1])
trainer = Trainer(cfg, resume=False, progress=False).setup()
t0 = time.perf_counter()
need, act = host_memory._need(trainer, trainer.micro, trainer.accum, cfg.train.seq_len)
rehearse_s = time.perf_counter() - t0
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current resident set
t0 = time.perf_counter()
for _ in range(2):
    trainer.train_step()
steps_s = time.perf_counter() - t0
print(json.dumps({"need": need, "grown": status("VmHWM") - before, "rehearse_s": rehearse_s, "steps_s": steps_s}))
"""


def run_case(name, model, train, tmp):
    cfg = {"name": "bench", "out_dir": os.path.join(tmp, "run"),
           "model": {"hidden_size": 512, "num_layers": 2, "head_size": 64, **model},
           "data": {"source": "builtin", "tokenizer": "byte"},
           "train": {"seq_len": 512, "max_steps": 2, "device": "cpu", "precision": "fp32", "eval_interval": 0,
                     **train},
           "logging": {"progress": False}}
    path = os.path.join(tmp, "cfg.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    proc = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = out["need"] / out["grown"]
    out["name"] = name
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, train in CASES:
            r = run_case(name, model, train, tmp)
            rows.append(r)
            print(f"{name:58s} rehearsed {r['need'] / 2**30:6.2f} GiB  resident growth {r['grown'] / 2**30:6.2f} GiB"
                  f"  ratio {r['ratio']:.3f}  (rehearsal {r['rehearse_s']:.1f} s, 2 steps {r['steps_s']:.1f} s)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
