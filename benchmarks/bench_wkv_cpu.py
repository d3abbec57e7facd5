"""CPU benchmark: sequential vs chunk-parallel WKV-7 (float32, default B=4, T=1024, H=4, N=64).

    python benchmarks/bench_wkv_cpu.py [--repeats 3] [--warmup 1] [--chunk-len 16] [--output PATH]

Cells: {sequential, chunked} x {forward, forward+backward}. The forward runs in training mode (inputs
require grad, so it saves what the backward needs); forward+backward backpropagates fresh random upstream
gradients on both y and the final state. Inputs are realistic random tensors (decay logits over
U(-8, 4), kk L2-normalised per head, a_in = -kk, b_in = kk * a), with a random initial state.

The machine may be shared, so every repeat times the four cells back to back (load hits all of them alike)
and the headline is the sequential/chunked ratio within each repeat; medians, min and max over repeats are
reported too. torch's thread count is left at its default. Prints a table and writes JSON (default
benchmarks/results/wkv_cpu.json) with the machine (CPU model, cores, torch version, threads, load), date,
shape, per-repeat times and the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from kaggletrain.ops.wkv_chunked import default_chunk_len, wkv_chunked
from kaggletrain.ops.wkv_reference import wkv_sequential

MODES = ("fwd", "fwd_bwd")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_avg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def make_inputs(B, T, H, N, seed):
    """(r, w, k, v, a, b) [B, T, H, N], initial state [B, H, N, N], upstream grads (dy, dstate); float32."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    r = 0.5 * torch.randn(shape, generator=g)
    k = 0.5 * torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    w = torch.rand(shape, generator=g) * 12 - 8
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
    lr = torch.rand(shape, generator=g)
    state = 0.5 * torch.randn(B, H, N, N, generator=g)
    dy = torch.randn(shape, generator=g)
    ds = torch.randn(B, H, N, N, generator=g)
    return [r, w, k, v, -kk, kk * lr], state, dy, ds


def run_cell(fn, inputs, state, dy, ds, mode) -> float:
    """One timed call, in seconds. Leaves are fresh each call so no gradient accumulates."""
    leaves = [t.detach().requires_grad_() for t in (*inputs, state)]
    t0 = time.perf_counter()
    y, s = fn(*leaves)
    if mode == "fwd_bwd":
        torch.autograd.backward([y, s], [dy, ds])
    return time.perf_counter() - t0


def summarize(times_s):
    ms = [t * 1e3 for t in times_s]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs_ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk-len", type=int, default=None, help="chunked only (default: the op's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "wkv_cpu.json")
    args = ap.parse_args()

    inputs, state, dy, ds = make_inputs(args.B, args.T, args.H, args.N, args.seed)
    chunk_len = args.chunk_len or default_chunk_len(torch.float32)
    impls = {
        "sequential": wkv_sequential,
        "chunked": lambda *x: wkv_chunked(*x, chunk_len=chunk_len),
    }

    # Sanity: both implementations compute the same thing on these inputs.
    with torch.no_grad():
        y_s, s_s = impls["sequential"](*inputs, state)
        y_c, s_c = impls["chunked"](*inputs, state)
    check = {
        "y_rel_err": float((y_c - y_s).norm() / y_s.norm()),
        "state_rel_err": float((s_c - s_s).norm() / s_s.norm()),
    }

    load_start = load_avg()
    for _ in range(args.warmup):
        for name, fn in impls.items():
            for mode in MODES:
                run_cell(fn, inputs, state, dy, ds, mode)
    times = {(name, mode): [] for name in impls for mode in MODES}
    for rep in range(args.repeats):
        for mode in MODES:
            for name, fn in impls.items():
                times[(name, mode)].append(run_cell(fn, inputs, state, dy, ds, mode))
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    load_end = load_avg()

    cells = {f"{name}/{mode}": summarize(times[(name, mode)]) for name in impls for mode in MODES}
    ratios = {}
    for mode in MODES:
        per_rep = [s / c for s, c in zip(times[("sequential", mode)], times[("chunked", mode)])]
        ratios[mode] = {
            "median_of_per_repeat": statistics.median(per_rep),
            "min": min(per_rep),
            "max": max(per_rep),
            "per_repeat": per_rep,
            "of_medians": cells[f"sequential/{mode}"]["median_ms"] / cells[f"chunked/{mode}"]["median_ms"],
        }

    print()
    print(f"WKV-7 CPU, float32, B={args.B} T={args.T} H={args.H} N={args.N}, chunk_len={chunk_len}, "
          f"{torch.get_num_threads()} threads, {cpu_name()}")
    print(f"{'impl':<12}{'mode':<10}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for name in impls:
        for mode in MODES:
            c = cells[f"{name}/{mode}"]
            print(f"{name:<12}{mode:<10}{c['median_ms']:>12.1f}{c['min_ms']:>10.1f}{c['max_ms']:>10.1f}")
    for mode in MODES:
        r = ratios[mode]
        print(f"speed-up {mode:<8}: {r['median_of_per_repeat']:.1f}x (per-repeat median; "
              f"range {r['min']:.1f}-{r['max']:.1f}x)")
    print(f"check: y rel err {check['y_rel_err']:.2e}, state rel err {check['state_rel_err']:.2e}; "
          f"load avg start {load_start}, end {load_end}")

    result = {
        "benchmark": "wkv_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "load_avg_start": load_start,
            "load_avg_end": load_end,
        },
        "shape": {"B": args.B, "T": args.T, "H": args.H, "N": args.N, "dtype": "float32"},
        "chunk_len": chunk_len,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cells": cells,
        "speedup": ratios,
        "check": check,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
