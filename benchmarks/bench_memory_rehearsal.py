"""How close the dry run's memory rehearsal (kaggletrain/train/memory_rehearsal.py) is to the step it rehearses,
and what it says about the shipped Kaggle configs.

Part 1, on the CPU: each case runs one training step for real, its storages counted by the rehearsal's own
tracker (weights and AdamW moments alive throughout, as in the rehearsal), then rehearses the same step on
fake tensors. A 3-layer 128-wide model, vocab 1024, 2 x 512 tokens, L2Wrap on. With --emulated, one more
case runs the WKV through the CUDA kernel's sources in the CPU emulator (KAGGLETRAIN_WKV_EMULATE=1) against the
rehearsal's kernel operators. On a GPU the dry run itself sets the rehearsal beside torch.cuda.max_memory_allocated
(`rehearsed_peak_memory_bytes`; scripts/gpu_check.sh prints the ratio).

Part 2: the projected T4 peak of configs/rwkv7_0.1b_t4.yaml and rwkv7_0.1b_t4x2.yaml and the rehearsal's time.

Part 3: the prediction for the GPU: the rehearsal of benchmarks/bench_train_gpu.py's default step (0.1B: 12 x 768,
vocab 50304; B=8, T=4096, bf16, the kernel's WKV, no L2Wrap), eager and with gradient checkpointing, to set beside
what that benchmark measures on the next GPU.

    python benchmarks/bench_memory_rehearsal.py [--emulated] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from kaggletrain.model.config import ModelConfig
from kaggletrain.model.model import RWKVModel
from kaggletrain.train.memory_rehearsal import real_step_peak, rehearse_step

CASES = [  # name, amp dtype, attention layers, gradient checkpointing, use_chunking, bptt
    ("fp32", None, (), False, False, "full"),
    ("fp32, gradient checkpointing", None, (), True, False, "full"),
    ("fp32, chunked training (chunks of 128)", None, (), False, True, "full"),
    ("fp32, chunked training, truncated BPTT", None, (), False, True, "truncated"),
    ("fp32, hybrid (block 1 attention)", None, (1,), False, False, "full"),
    ("fp16, hybrid", torch.float16, (1,), False, False, "full"),
    ("bf16, hybrid, gradient checkpointing", torch.bfloat16, (1,), True, False, "full"),
]


def case(name, amp, attention, ckpt, chunking, bptt, kernel=False, B=2, T=512):
    torch.manual_seed(0)
    m = RWKVModel(ModelConfig(vocab_size=1024, hidden_size=128, num_layers=3, attention_layers=list(attention),
                              rwkv_chunk_size=128))
    m.enable_mixed_precision(amp)
    m.enable_gradient_checkpointing(ckpt)
    x = torch.randint(0, 1024, (B, T))
    real = real_step_peak(m, x, l2wrap=True, use_chunking=chunking, bptt=bptt)
    t0 = time.perf_counter()
    r = rehearse_step(m, micro_batch=B, seq_len=T, amp_dtype=amp, kernel=kernel, use_chunking=chunking,
                      bptt=bptt, l2wrap=True)
    row = {"case": name, "real_bytes": real, "rehearsed_bytes": r.peak_bytes, "ratio": r.peak_bytes / real,
           "rehearsal_s": time.perf_counter() - t0}
    print(f"{name:44s} real {real / 2**20:8.2f} MiB  rehearsed {r.peak_bytes / 2**20:8.2f} MiB  "
          f"x{row['ratio']:.4f}", flush=True)
    return row


def config_projection(path: str) -> dict:
    from kaggletrain.config import load_config

    cfg = load_config(path)
    t = cfg.train
    m = RWKVModel(cfg.model_config())
    micro = t.micro_batch(2 if "t4x2" in path else 1)
    t0 = time.perf_counter()
    r = rehearse_step(m, micro_batch=micro, seq_len=t.seq_len, amp_dtype=torch.float16,
                      accum=t.batch_size // micro // (2 if "t4x2" in path else 1), l2wrap=t.l2wrap)
    row = {"config": path, "micro_batch": micro, "seq_len": t.seq_len, "projected_gb": r.peak_bytes / 1e9,
           "weights_gb": r.weight_bytes / 1e9, "gradients_gb": r.gradient_bytes / 1e9,
           "adamw_gb": r.optimizer_bytes / 1e9, "rehearsal_s": time.perf_counter() - t0, "wkv": r.wkv}
    print(f"{path}: micro {micro} x {t.seq_len}: {row['projected_gb']:.2f} GB (weights {row['weights_gb']:.2f}, "
          f"gradients {row['gradients_gb']:.2f}, AdamW {row['adamw_gb']:.2f}) in {row['rehearsal_s']:.1f} s",
          flush=True)
    return row


def gpu_step_prediction() -> list[dict]:
    """bench_train_gpu.py's default step, rehearsed as that benchmark does (see the module doc)."""
    m = RWKVModel(ModelConfig(hidden_size=768, num_layers=12, vocab_size=50304))
    rows = []
    for ckpt in (False, True):
        m.enable_gradient_checkpointing(ckpt)
        t0 = time.perf_counter()
        r = rehearse_step(m, micro_batch=8, seq_len=4096, amp_dtype=torch.bfloat16, kernel=True, l2wrap=False)
        rows.append({"gradient_checkpointing": ckpt, "rehearsed_gib": r.peak_bytes / 2**30,
                     "rehearsal_s": time.perf_counter() - t0, "wkv": r.wkv})
        print(f"bench_train_gpu step (0.1B, 8 x 4096, bf16){', gradient checkpointing' if ckpt else ''}: "
              f"{rows[-1]['rehearsed_gib']:.2f} GiB in {rows[-1]['rehearsal_s']:.1f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emulated", action="store_true", help="add the emulated-kernel case (builds the emulator)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    rows = [case(*c) for c in CASES]
    if args.emulated:
        os.environ["KAGGLETRAIN_WKV_EMULATE"] = "1"
        rows.append(case("fp16, WKV kernel (emulated) vs its operators", torch.float16, (), False, False, "full",
                         kernel=True, B=2, T=256))
        del os.environ["KAGGLETRAIN_WKV_EMULATE"]
    configs = [config_projection(p) for p in ("configs/rwkv7_0.1b_t4.yaml", "configs/rwkv7_0.1b_t4x2.yaml")]
    gpu = gpu_step_prediction()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": rows, "configs": configs,
                       "gpu_step_prediction": gpu, "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
