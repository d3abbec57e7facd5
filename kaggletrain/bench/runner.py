"""Run benchmark suites: plan the points, measure each, summarise, write JSON and charts.

Every suite module (wkv, train, optim, infer, context) provides TITLE, plan(ctx) -> specs (one per point),
build(spec, ctx) -> common.Bench (the calls to time, and the tokens each processes), finish(rows, ctx) ->
summary (adding ratios to the rows), COLUMNS / table_row(row) for the table and plot(rows, fig) for the
chart. A point's row is its spec plus: peak_memory_bytes, one timing (median/min/max/quartiles/runs) and
<name>_tokens_per_s per timed call, and skip, oom or error when it did not run.
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from kaggletrain.bench.common import Context, fmt_bytes, fmt_time
from kaggletrain.bench.machine import describe, load_avg
from kaggletrain.bench.memory import PeakMemory, cpu_method, release
from kaggletrain.bench.timing import sync, time_fn
from kaggletrain.train.out_of_memory import is_out_of_memory

SUITES = ("wkv", "train", "optim", "infer", "context")
FORMAT = "kaggletrain-bench/1"


def suite_module(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(SUITES)}")
    return importlib.import_module(f"kaggletrain.bench.{name}")


def resolve_device(name: str) -> torch.device:
    from kaggletrain.errors import KaggletrainError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise KaggletrainError("--device cuda: no CUDA GPU is visible (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise KaggletrainError(f"--device {name}: expected cpu, cuda or auto")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def prime(ctx: Context) -> None:
    """Touch every code path once, untimed, so one-time costs (lazy imports: the first
    torch.utils.checkpoint call alone imports ~800 modules; autocast; kernel loading) land in no point."""
    from kaggletrain.bench.workloads import TrainStep, build_model

    for precision in ["fp32", *ctx.half_precisions()]:
        model = build_model("tiny", ctx.device, rwkv_chunk_size=16)
        model.enable_gradient_checkpointing()
        model.enable_state_compression("bf16")
        TrainStep(model, ctx.device, batch=1, seq_len=32, precision=precision, chunking=True)()
    from kaggletrain.infer import run_last

    model = build_model("tiny", ctx.device).optimize_for_inference()
    run_last(model, torch.zeros(1, 4, dtype=torch.long, device=ctx.device))
    del model
    release()
    # Everything alive now (torch, its ~10^6 Python objects) stays: exempt it from the garbage collector's
    # scans, which otherwise cost most of a second per point.
    gc.freeze()


def run_suites(suites: list[str], *, device: torch.device, quick: bool = False, out_dir: Optional[Path] = None,
               repeats: Optional[int] = None, warmup: Optional[int] = None, command: str = "",
               compile: bool = False,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Plan every suite, measure every point's peak memory, then time every point (in that order: see
    memory.py), then summarise, chart and write OUT/bench.json."""
    modules = {name: suite_module(name) for name in suites}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ctx = Context(device=device, quick=quick, device_name=name,
                  repeats=repeats or (3 if quick or device.type == "cpu" else 5),
                  warmup=warmup if warmup is not None else (1 if quick or device.type == "cpu" else 2),
                  compile=compile)
    doc = {
        "format": FORMAT,
        "command": command,
        "machine": describe(device),
        "settings": {"quick": quick, "device": str(device), "repeats": ctx.repeats, "warmup": ctx.warmup,
                     "suites": list(suites), "compile": compile},
        "method": {
            "timing": f"each timed call: {ctx.warmup} untimed warm-up run(s), then {ctx.repeats} timed runs (fewer "
                      "when runs are very slow), " + ("torch.cuda.synchronize() after each; " if device.type == "cuda"
                                                     else "") + "median, min/max and quartiles",
            "memory": ("per point, before any timing: torch.cuda.max_memory_allocated() after "
                       "reset_peak_memory_stats(), minus the memory allocated before the point; the point builds its "
                       "model and inputs and runs each timed call once" if device.type == "cuda" else cpu_method()),
            "load": "CPU load average recorded before the run and after each point (shared machines: compare "
                    "ratios within one run)",
        },
        "suites": {},
    }
    log(f"kaggletrain bench on {subtitle(doc)}; suites: {', '.join(suites)}" + (" (quick)" if quick else ""))
    t_start = time.perf_counter()
    rows = {s: [dict(spec) for spec in mod.plan(ctx)] for s, mod in modules.items()}
    try:
        prime(ctx)
        for sname, mod in modules.items():
            for row in rows[sname]:
                _memory_pass(sname, mod, row, ctx, log)
        for sname, mod in modules.items():
            t_suite = time.perf_counter()
            for row in rows[sname]:
                _timing_pass(sname, mod, row, ctx, log)
            summary = mod.finish(rows[sname], ctx)
            entry = {"title": mod.TITLE, "description": (mod.__doc__ or "").strip(), "rows": rows[sname],
                     "summary": summary, "timing_seconds": round(time.perf_counter() - t_suite, 1)}
            if out_dir is not None:
                entry["chart"] = write_chart(mod, rows[sname], doc, out_dir / f"{sname}.png")
            doc["suites"][sname] = entry
    finally:
        gc.unfreeze()
    doc["machine"]["load_avg_end"] = load_avg()
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _attempt(row: dict, fn: Callable[[], None]) -> None:
    """Run one phase of a point; a failure is recorded in the row (and the point's later phases skipped)."""
    try:
        fn()
    except Exception as e:  # one failing point must not lose the others; reported, and the exit code is 1
        if is_out_of_memory(e):
            row["oom"] = True
        else:
            row["error"] = f"{type(e).__name__}: {e}"


def _memory_pass(sname: str, mod, row: dict, ctx: Context, log) -> None:
    if "skip" in row:
        log(f"[{sname}] {row['label']}: skipped ({row['skip']})")
        return

    def run():
        with PeakMemory(ctx.device) as pm:
            bench = mod.build(row, ctx)
            for fn in bench.fns.values():
                fn()
            sync(ctx.device)
        row.update(bench.info)
        row["peak_memory_bytes"] = pm.peak_bytes

    t0 = time.perf_counter()
    _attempt(row, run)
    status = "out of memory" if row.get("oom") else row.get("error") or fmt_bytes(row["peak_memory_bytes"])
    log(f"[{sname}] {row['label']}: peak memory {status} ({time.perf_counter() - t0:.1f} s)")


def _timing_pass(sname: str, mod, row: dict, ctx: Context, log) -> None:
    if not measured(row):
        return

    def run():
        release()
        bench = mod.build(row, ctx)
        for name, fn in bench.fns.items():
            t = time_fn(fn, ctx.device, warmup=ctx.warmup, repeats=ctx.repeats, budget_s=bench.budget_s)
            row[name] = t
            row[f"{name}_tokens_per_s"] = bench.tokens[name] / t["median_s"]
        if bench.final is not None:
            row.update(bench.final())

    t0 = time.perf_counter()
    _attempt(row, run)
    row["load_avg"] = load_avg()
    times = ", ".join(f"{k} {fmt_time(v)}" for k, v in row.items() if isinstance(v, dict) and "median_s" in v)
    status = "out of memory" if row.get("oom") else row.get("error") or times
    log(f"[{sname}] {row['label']}: {status} ({time.perf_counter() - t0:.1f} s)")


def subtitle(doc: dict) -> str:
    m = doc["machine"]
    n = m["torch_threads"]
    where = m["gpu"]["name"] if m.get("gpu") else f"{m['cpu']}, {n} thread{'s' if n != 1 else ''}"
    return f"{where}; torch {m['torch']}; {m['date'][:10]}"


def write_chart(mod, rows: list[dict], doc: dict, path: Path) -> Optional[str]:
    from kaggletrain.bench.plots import save_chart

    path.parent.mkdir(parents=True, exist_ok=True)
    if not any(measured(r) for r in rows):
        return None
    written = save_chart(mod.plot, rows, path, mod.TITLE, subtitle(doc))
    return path.name if written else None


def measured(row: dict) -> bool:
    return not ({"skip", "error", "oom"} & row.keys())


def failures(doc: dict) -> list[str]:
    """Points that raised (not skips, not out-of-memory on a GPU)."""
    return [f"{s}: {r['label']}: {r['error']}" for s, e in doc["suites"].items() for r in e["rows"] if "error" in r]
