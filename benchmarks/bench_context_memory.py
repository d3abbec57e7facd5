"""Peak memory of one training step (forward + backward) against sequence length, on CPU.

Two questions (issue 5):
  1. Chunked processing: does the peak grow with the chunk size rather than the sequence length?
     Target: T = 65,536 with chunk 2,048 uses at most 1.5x the peak of an unchunked T = 2,048 step,
     in both `bptt="full"` (exact gradients) and `bptt="truncated"`.
  2. Gradient checkpointing on a 12-layer model: peak activation memory at least 3x lower, for at most
     1.4x the step time.

Every point runs in a fresh subprocess (so one point's peak cannot hide another's). The worker builds
the model, runs a tiny warm-up step on the same code path (loads kernels, allocates the parameter
gradients, pays torch.utils.checkpoint's one-time ~70 MB of imports), records its current RSS as the
baseline, runs the measured step and reports `ru_maxrss - baseline`: the step's activations, transient
buffers and allocator overhead. Times: wall clock, and user/system CPU time of the process (one thread,
so user CPU time is the compute cost even when other jobs share the cores). The points are run twice, with glibc's default
malloc and with `MALLOC_MMAP_THRESHOLD_` pinned (which turns off glibc's dynamic mmap threshold: freed
buffers then go back to the OS at once, so the number is what the tensors need rather than what a
fragmented heap keeps).

    python benchmarks/bench_context_memory.py                    # full run, writes benchmarks/results/
    python benchmarks/bench_context_memory.py --quick            # short sequences only (smoke test)
    python benchmarks/bench_context_memory.py --skip-context --ckpt-repeats 5 --out benchmarks/results/context_ckpt_c64.json
    python benchmarks/bench_context_memory.py --skip-context --ckpt-hidden 256 --ckpt-head-size 64 --ckpt-T 1024 \
        --out benchmarks/results/context_ckpt_c256.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PINNED_MMAP_THRESHOLD = "131072"  # bytes; glibc's default initial threshold, but fixed


# ---------------------------------------------------------------------------------------------
# worker (one measurement per process)
# ---------------------------------------------------------------------------------------------

def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    from kaggletrain import ModelConfig, RWKVModel

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_layers=spec["layers"],
                      head_size=spec["head_size"], rwkv_chunk_size=spec.get("chunk", 2048),
                      rwkv_chunk_overlap=spec.get("overlap", 0))
    model = RWKVModel(cfg)
    if spec.get("grad_ckpt"):
        model.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(1)
    T, B = spec["T"], spec.get("batch", 1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    kw = dict(use_chunking=spec["chunking"], return_logits=False, bptt=spec.get("bptt", "full"))

    def step(x):
        out = model(x, labels=x, **kw)
        out.loss.backward()
        return out.loss.detach().item()

    # Warm-up on the same code path with a tiny input: the first torch.utils.checkpoint call imports
    # ~800 modules (torch._dynamo & co., about 70 MB of RSS) once per process; that is not step memory.
    # The parameter .grad buffers are allocated here and stay allocated.
    warm = torch.randint(0, cfg.vocab_size, (B, 64), generator=g)
    model.config.rwkv_chunk_size, model.config.rwkv_chunk_overlap = 32, min(spec.get("overlap", 0), 31)
    step(warm)
    model.config.rwkv_chunk_size, model.config.rwkv_chunk_overlap = spec.get("chunk", 2048), spec.get("overlap", 0)
    from torch.utils.checkpoint import checkpoint

    checkpoint(lambda t: t * 2, torch.ones(2, requires_grad=True), use_reentrant=False).sum().backward()
    gc.collect()
    base = _rss_mb()
    peak_before = _peak_mb()
    times, user, sys_ = [], [], []

    def timed():
        t0, c0 = time.perf_counter(), os.times()
        out = step(ids)
        c1 = os.times()
        times.append(time.perf_counter() - t0)
        user.append(c1.user - c0.user)
        sys_.append(c1.system - c0.system)
        return out

    loss = timed()
    peak = _peak_mb()
    for _ in range(spec.get("repeats", 0)):
        timed()
    med = lambda xs: statistics.median(xs[1:] if len(xs) > 1 else xs)  # noqa: E731
    return {
        "baseline_rss_mb": round(base, 1),
        "peak_rss_before_step_mb": round(peak_before, 1),
        "peak_rss_mb": round(peak, 1),
        "step_peak_mb": round(peak - base, 1),
        "step_s": round(med(times), 3),
        "step_times_s": [round(t, 3) for t in times],
        # One thread: user CPU time is the compute cost even when other jobs share the cores; system time
        # is mostly page faults of fresh allocations (large with the pinned mmap threshold).
        "step_user_s": round(med(user), 3),
        "step_sys_s": round(med(sys_), 3),
        "step_user_times_s": [round(t, 3) for t in user],
        "step_sys_times_s": [round(t, 3) for t in sys_],
        "loss": round(loss, 4),
        "params": model.num_parameters(),
    }


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def run_point(spec: dict, pinned: bool, timeout: float) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if pinned:
        env["MALLOC_MMAP_THRESHOLD_"] = PINNED_MMAP_THRESHOLD
    env["OMP_NUM_THREADS"] = str(spec.get("threads", 1))
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="short sequences only (smoke test)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--head-size", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--ckpt-layers", type=int, default=12)
    ap.add_argument("--ckpt-hidden", type=int, default=64)
    ap.add_argument("--ckpt-head-size", type=int, default=32)
    ap.add_argument("--ckpt-T", type=int, default=2048)
    ap.add_argument("--ckpt-repeats", type=int, default=3)
    ap.add_argument("--allocators", default="default,pinned", help="comma list of default,pinned")
    ap.add_argument("--skip-ckpt", action="store_true")
    ap.add_argument("--skip-context", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/context_memory.json)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    chunk = args.chunk
    small = dict(vocab=256, hidden=args.hidden, layers=2, head_size=args.head_size, chunk=chunk)
    lengths = [2 * chunk, 4 * chunk] if args.quick else [4 * chunk, 16 * chunk, 32 * chunk]
    context_points = [dict(small, T=chunk, chunking=False, label=f"T={chunk} unchunked")]
    context_points.append(dict(small, T=4 * chunk, chunking=False, label=f"T={4 * chunk} unchunked (reference)"))
    for bptt in ("full", "truncated"):
        for T in lengths:
            context_points.append(dict(small, T=T, chunking=True, bptt=bptt, label=f"T={T} chunk={chunk} {bptt}"))
    big = dict(vocab=256, hidden=args.ckpt_hidden, layers=args.ckpt_layers, head_size=args.ckpt_head_size,
               T=512 if args.quick else args.ckpt_T, chunking=False, repeats=args.ckpt_repeats)
    ckpt_points = [dict(big, grad_ckpt=False, label="no checkpointing"),
                   dict(big, grad_ckpt=True, label="gradient checkpointing")]

    allocs = [a for a in args.allocators.split(",") if a]
    result = {
        "benchmark": "context_memory",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": 1,
                    "loadavg_start": os.getloadavg()},
        "model_context": {k: small[k] for k in ("vocab", "hidden", "layers", "head_size")},
        "model_ckpt": {k: big[k] for k in ("vocab", "hidden", "layers", "head_size", "T")},
        "method": "fresh subprocess per point; step_peak_mb = ru_maxrss after one forward+backward "
                  "minus RSS after a 64-token warm-up step on the same code path (chunked with chunk 32 / checkpointed), "
                  "which also pays torch.utils.checkpoint's one-time import (~70 MB)",
        "context": {}, "checkpointing": {}, "summary": {},
    }
    for alloc in allocs:
        pinned = alloc == "pinned"
        if not args.skip_context:
            rows = []
            for p in context_points:
                r = run_point(p, pinned, args.timeout)
                rows.append({"label": p["label"], "T": p["T"], "chunking": p["chunking"],
                             "bptt": p.get("bptt") if p["chunking"] else None, **r})
                print(f"[{alloc}] {p['label']:<34} peak {r['step_peak_mb']:8.1f} MB   {r['step_s']:7.2f} s",
                      flush=True)
            result["context"][alloc] = rows
            ref = rows[0]["step_peak_mb"]
            for r in rows[1:]:
                r["ratio_vs_T_chunk"] = round(r["step_peak_mb"] / ref, 3)
            longest = max(lengths)
            result["summary"][f"{alloc}: T={longest}/T={chunk} peak ratio"] = {
                b: next(r["ratio_vs_T_chunk"] for r in rows if r["T"] == longest and r["bptt"] == b)
                for b in ("full", "truncated")}
        if not args.skip_ckpt:
            rows = []
            for p in ckpt_points:
                r = run_point(p, pinned, args.timeout)
                rows.append({"label": p["label"], **r})
                print(f"[{alloc}] {p['label']:<34} peak {r['step_peak_mb']:8.1f} MB   {r['step_s']:7.2f} s "
                      f"(user {r['step_user_s']:.2f} s, sys {r['step_sys_s']:.2f} s) {r['step_times_s']}", flush=True)
            result["checkpointing"][alloc] = rows
            plain, ck = rows
            result["summary"][f"{alloc}: gradient checkpointing"] = {
                "activation_memory_reduction_x": round(plain["step_peak_mb"] / max(ck["step_peak_mb"], 1e-9), 2),
                "step_time_ratio_x (wall)": round(ck["step_s"] / plain["step_s"], 3),
                "step_time_ratio_x (user cpu)": round(ck["step_user_s"] / plain["step_user_s"], 3),
                "step_time_ratio_x (user+sys cpu)": round((ck["step_user_s"] + ck["step_sys_s"])
                                                          / (plain["step_user_s"] + plain["step_sys_s"]), 3),
            }
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result["summary"], indent=2))
    out = Path(args.out) if args.out else RESULTS / ("context_memory_quick.json" if args.quick else "context_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
