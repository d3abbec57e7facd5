"""Peak memory of one training step (forward + backward) against sequence length, on CPU.

Two questions (issue 5):
  1. Chunked processing: does the peak grow with the chunk size rather than the sequence length?
     Target: T = 65,536 with chunk 2,048 uses at most 1.5x the peak of an unchunked T = 2,048 step,
     in both `bptt="full"` (exact gradients) and `bptt="truncated"`.
  2. Gradient checkpointing on a 12-layer model: peak activation memory at least 3x lower, for at most
     1.4x the step time.

Every memory point runs in a fresh subprocess (so one point's peak cannot hide another's). The worker
builds the model, runs a tiny warm-up step on the same code path (loads kernels, allocates the parameter
gradients, pays torch.utils.checkpoint's one-time ~70 MB of imports), resets the kernel's peak-RSS counter
(VmHWM, via /proc/self/clear_refs), records the RSS, runs the measured step and reports VmHWM - RSS
before: the step's activations, transient buffers and allocator overhead.

The product path is measured as a user gets it: kaggletrain trims glibc's heap before each chunk (and its
recomputation in the backward pass) and, with gradient checkpointing, before each checkpointed block's
forward (kaggletrain/model/cpu_memory.py). The `off` mode reruns the points with that switched off
(KAGGLETRAIN_CPU_MALLOC_TRIM=0) to show what it buys.

Step time of gradient checkpointing: one process, one model, checkpointing switched on and off for
alternate steps (same input), several repeats; medians of wall clock and of user+system CPU time (one
thread, so CPU time is the compute cost even when other jobs share the cores).

    python benchmarks/bench_context_memory.py                    # full run, writes benchmarks/results/
    python benchmarks/bench_context_memory.py --quick            # short sequences only (smoke test)
    python benchmarks/bench_context_memory.py --skip-context --ckpt-repeats 7 --out benchmarks/results/context_ckpt_c64.json
    python benchmarks/bench_context_memory.py --skip-context --ckpt-hidden 256 --ckpt-head-size 64 --ckpt-T 1024 \
        --out benchmarks/results/context_ckpt_c256.json
    python benchmarks/bench_context_memory.py --modes product,off     # also without the heap trimming
    python benchmarks/bench_context_memory.py --skip-context --ckpt-mode selective   # WKV not recomputed
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TRIM_ENV = "KAGGLETRAIN_CPU_MALLOC_TRIM"


# ---------------------------------------------------------------------------------------------
# worker (one measurement per process)
# ---------------------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # Resets VmHWM to the current RSS (Linux >= 4.0): the next VmHWM is this step's peak alone.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    from kaggletrain import ModelConfig, RWKVModel

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_layers=spec["layers"],
                      head_size=spec["head_size"], rwkv_chunk_size=spec.get("chunk", 2048),
                      rwkv_chunk_overlap=spec.get("overlap", 0))
    model = RWKVModel(cfg)
    model.enable_gradient_checkpointing(bool(spec.get("grad_ckpt")), mode=spec.get("ckpt_mode", "full"))
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
    from kaggletrain.model import cpu_memory

    trims0 = cpu_memory.calls
    gc.collect()
    if spec.get("alternate"):
        return alternate(model, step, ids, spec["repeats"])
    _reset_peak()
    base = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), os.times()
    loss = step(ids)
    c1 = os.times()
    peak = _status_mb("VmHWM")
    return {
        "baseline_rss_mb": round(base, 1),
        "peak_rss_mb": round(peak, 1),
        "step_peak_mb": round(peak - base, 1),
        "step_s": round(time.perf_counter() - t0, 3),
        "step_user_s": round(c1.user - c0.user, 3),
        "step_sys_s": round(c1.system - c0.system, 3),
        "heap_trims": cpu_memory.calls - trims0,
        "loss": round(loss, 4),
        "params": model.num_parameters(),
    }


def alternate(model, step, ids, repeats: int) -> dict:
    """Step times with checkpointing off and on, alternating (one warm-up pair not counted)."""
    times = {False: [], True: []}
    for i in range(repeats + 1):
        for on in (False, True) if i % 2 == 0 else (True, False):
            model.enable_gradient_checkpointing(on)
            model.zero_grad(set_to_none=False)
            t0, c0 = time.perf_counter(), os.times()
            step(ids)
            c1 = os.times()
            if i:
                times[on].append((time.perf_counter() - t0, c1.user - c0.user + c1.system - c0.system))
    med = statistics.median
    out = {}
    for on, name in ((False, "plain"), (True, "ckpt")):
        out[name] = {"wall_s": round(med(t for t, _ in times[on]), 3), "cpu_s": round(med(c for _, c in times[on]), 3),
                     "wall_times_s": [round(t, 3) for t, _ in times[on]],
                     "cpu_times_s": [round(c, 3) for _, c in times[on]]}
    out["ratio_wall"] = round(out["ckpt"]["wall_s"] / out["plain"]["wall_s"], 3)
    out["ratio_cpu"] = round(out["ckpt"]["cpu_s"] / out["plain"]["cpu_s"], 3)
    return out


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def run_point(spec: dict, mode: str, timeout: float) -> dict:
    """mode "product": as kaggletrain runs by default; "off": heap trimming switched off."""
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop(TRIM_ENV, None)
    if mode == "off":
        env[TRIM_ENV] = "0"
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
    ap.add_argument("--ckpt-mode", default="full", choices=("full", "selective"),
                    help="enable_gradient_checkpointing(mode=...)")
    ap.add_argument("--ckpt-repeats", type=int, default=5, help="timed step pairs (checkpointing off/on)")
    ap.add_argument("--modes", default="product", help="comma list of product (as shipped), off (no heap trim)")
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
               T=512 if args.quick else args.ckpt_T, chunking=False, repeats=args.ckpt_repeats,
               ckpt_mode=args.ckpt_mode)
    ckpt_points = [dict(big, grad_ckpt=False, label="no checkpointing"),
                   dict(big, grad_ckpt=True, label="gradient checkpointing")]

    modes = [a for a in args.modes.split(",") if a]
    result = {
        "benchmark": "context_memory",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": 1,
                    "loadavg_start": os.getloadavg()},
        "model_context": {k: small[k] for k in ("vocab", "hidden", "layers", "head_size")},
        "model_ckpt": {k: big[k] for k in ("vocab", "hidden", "layers", "head_size", "T", "ckpt_mode")},
        "method": "fresh subprocess per memory point; step_peak_mb = VmHWM during one forward+backward (reset "
                  "via /proc/self/clear_refs) minus RSS before it, after a 64-token warm-up step on the same "
                  "code path (chunked with chunk 32 / checkpointed), which also pays torch.utils.checkpoint's "
                  "one-time import (~70 MB). Checkpointing step time: one process, checkpointing toggled "
                  "on/off on alternate steps, medians",
        "modes": {"product": "as kaggletrain ships: malloc_trim before each chunk / chunk recomputation and "
                             "each checkpointed block's forward (kaggletrain/model/cpu_memory.py)",
                  "off": f"{TRIM_ENV}=0: heap trimming off (glibc defaults)"},
        "context": {}, "checkpointing": {}, "summary": {},
    }
    for mode in modes:
        if not args.skip_context:
            rows = []
            for p in context_points:
                r = run_point(p, mode, args.timeout)
                rows.append({"label": p["label"], "T": p["T"], "chunking": p["chunking"],
                             "bptt": p.get("bptt") if p["chunking"] else None, **r})
                print(f"[{mode}] {p['label']:<34} peak {r['step_peak_mb']:8.1f} MB   {r['step_s']:7.2f} s "
                      f"(user {r['step_user_s']:.2f} s, sys {r['step_sys_s']:.2f} s, {r['heap_trims']} trims)",
                      flush=True)
            result["context"][mode] = rows
            ref = rows[0]["step_peak_mb"]
            for r in rows[1:]:
                r["ratio_vs_T_chunk"] = round(r["step_peak_mb"] / ref, 3)
            longest = max(lengths)
            result["summary"][f"{mode}: T={longest}/T={chunk} peak ratio"] = {
                b: next(r["ratio_vs_T_chunk"] for r in rows if r["T"] == longest and r["bptt"] == b)
                for b in ("full", "truncated")}
        if not args.skip_ckpt:
            rows = []
            for p in ckpt_points:
                r = run_point(p, mode, args.timeout)
                rows.append({"label": p["label"], **r})
                print(f"[{mode}] {p['label']:<34} peak {r['step_peak_mb']:8.1f} MB   {r['step_s']:7.2f} s "
                      f"(user {r['step_user_s']:.2f} s, sys {r['step_sys_s']:.2f} s)", flush=True)
            timing = run_point(dict(big, alternate=True, label="alternating"), mode, args.timeout)
            print(f"[{mode}] step time, alternating: plain {timing['plain']} ckpt {timing['ckpt']}", flush=True)
            result["checkpointing"][mode] = {"memory": rows, "timing": timing}
            plain, ck = rows
            result["summary"][f"{mode}: gradient checkpointing"] = {
                "activation_memory_mb (plain, ckpt)": [plain["step_peak_mb"], ck["step_peak_mb"]],
                "activation_memory_reduction_x": round(plain["step_peak_mb"] / max(ck["step_peak_mb"], 1e-9), 2),
                "step_time_ratio_x (median user+sys cpu)": timing["ratio_cpu"],
                "step_time_ratio_x (median wall)": timing["ratio_wall"],
            }
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result["summary"], indent=2))
    out = Path(args.out) if args.out else RESULTS / ("context_memory_quick.json" if args.quick else "context_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
