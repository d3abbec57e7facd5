"""CPU benchmark: sequential vs chunk-parallel WKV-7 (float32).

    python benchmarks/bench_wkv_cpu.py [--shape 4,1024,4,64] [--shape 16,128,4,32] [--repeats 5]
        [--warmup 1] [--threads 1] [--chunk-len 16] [--output PATH]

Shapes are B,T,H,N; the default runs the issue's shape (4,1024,4,64) and the model's small CPU training
shape (16,128,4,32).

Cells: {sequential, chunked} x {forward, forward+backward}. The forward runs in training mode (inputs
require grad, so it saves what the backward needs); forward+backward backpropagates fresh random upstream
gradients on both y and the final state. Inputs are realistic random tensors (decay logits over
U(-8, 4), kk L2-normalised per head, a_in = -kk, b_in = kk * a), with a random initial state.

The machine may be shared, so every repeat times the four cells back to back (load hits all of them alike)
and the headline is the sequential/chunked ratio within each repeat; medians, min and max over repeats are
reported too. Each cell is timed as CPU time of this process (time.process_time) with torch limited to
--threads threads (default 1): on a shared machine, CPU time of one thread is far less sensitive to other
load than wall time (wall time is recorded too). Best (min) and median over repeats are reported for every
cell, and the speed-up as best/best, median/median and the median of the per-repeat ratios. Prints a table
and writes JSON (default benchmarks/results/wkv_cpu.json) with the machine (CPU model, cores, torch
version, threads, load), date, shapes, per-repeat times and the ratios.
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

from kaggletrain.bench.machine import cpu_name
from kaggletrain.ops.wkv_chunked import default_chunk_len, wkv_chunked
from kaggletrain.ops.wkv_reference import wkv_sequential

MODES = ("fwd", "fwd_bwd")


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


def run_cell(fn, inputs, state, dy, ds, mode):
    """One timed call: (CPU seconds, wall seconds). Leaves are fresh each call so no gradient accumulates."""
    leaves = [t.detach().requires_grad_() for t in (*inputs, state)]
    w0, c0 = time.perf_counter(), time.process_time()
    y, s = fn(*leaves)
    if mode == "fwd_bwd":
        torch.autograd.backward([y, s], [dy, ds])
    return time.process_time() - c0, time.perf_counter() - w0


def summarize(times):
    ms = [t[0] * 1e3 for t in times]
    wall = [t[1] * 1e3 for t in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs_ms": ms,
            "wall_median_ms": statistics.median(wall), "wall_runs_ms": wall}


def bench_shape(B, T, H, N, args):
    inputs, state, dy, ds = make_inputs(B, T, H, N, args.seed)
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
        print(f"  B={B} T={T} H={H} N={N}: repeat {rep + 1}/{args.repeats} done", flush=True)
    load_end = load_avg()

    cells = {f"{name}/{mode}": summarize(times[(name, mode)]) for name in impls for mode in MODES}
    ratios = {}
    for mode in MODES:
        per_rep = [s[0] / c[0] for s, c in zip(times[("sequential", mode)], times[("chunked", mode)])]
        seq, chk = cells[f"sequential/{mode}"], cells[f"chunked/{mode}"]
        ratios[mode] = {
            "of_best": seq["min_ms"] / chk["min_ms"],
            "of_medians": seq["median_ms"] / chk["median_ms"],
            "median_of_per_repeat": statistics.median(per_rep),
            "min": min(per_rep),
            "max": max(per_rep),
            "per_repeat": per_rep,
        }

    print()
    print(f"WKV-7 CPU, float32, B={B} T={T} H={H} N={N}, chunk_len={chunk_len}, "
          f"{torch.get_num_threads()} thread(s), CPU time, {cpu_name()}")
    print(f"{'impl':<12}{'mode':<10}{'best ms':>10}{'median ms':>12}{'max ms':>10}")
    for name in impls:
        for mode in MODES:
            c = cells[f"{name}/{mode}"]
            print(f"{name:<12}{mode:<10}{c['min_ms']:>10.1f}{c['median_ms']:>12.1f}{c['max_ms']:>10.1f}")
    for mode in MODES:
        r = ratios[mode]
        print(f"speed-up {mode:<8}: best/best {r['of_best']:.1f}x, median/median {r['of_medians']:.1f}x, "
              f"per-repeat median {r['median_of_per_repeat']:.1f}x (range {r['min']:.1f}-{r['max']:.1f}x)")
    print(f"check: y rel err {check['y_rel_err']:.2e}, state rel err {check['state_rel_err']:.2e}; "
          f"load avg start {load_start}, end {load_end}")
    print()
    return {
        "shape": {"B": B, "T": T, "H": H, "N": N, "dtype": "float32"},
        "chunk_len": chunk_len,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "cells": cells,
        "speedup": ratios,
        "check": check,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", default=None, help="B,T,H,N (repeatable)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--chunk-len", type=int, default=None, help="chunked only (default: the op's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "wkv_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split(",")) for s in (args.shape or ["4,1024,4,64", "16,128,4,32"])]

    runs = [bench_shape(*shape, args) for shape in shapes]
    result = {
        "benchmark": "wkv_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": "CPU time of the process (time.process_time), best and median over repeats",
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "warmup": args.warmup,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
