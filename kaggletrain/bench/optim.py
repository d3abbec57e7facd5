"""Suite `optim`: what each memory/speed switch costs, against the plain baseline (fp32, nothing on).

Factors: gradient checkpointing (`train.gradient_checkpointing`), precision (autocast fp16/bf16;
`train.precision`), chunking (`train.use_chunking`, chunks of rwkv_chunk_size tokens with the state
carried, full BPTT) and state compression (`model.rwkv_state_compression`, bf16: only the states carried
between chunks and returned are compressed, so alone it changes little). On a GPU the full matrix over the
natively supported precisions; on a CPU (where fp16/bf16 autocast is emulated and slow) each factor alone
plus a few combinations. Every row is one full training step of the same model and batch.
"""

from __future__ import annotations

import itertools

from kaggletrain.bench.common import Bench, Context, fmt_bytes, fmt_rate, fmt_ratio, fmt_time
from kaggletrain.bench.timing import ratio
from kaggletrain.bench.workloads import SIZES, TrainStep, build_model

TITLE = "Optimisations against the plain baseline (one training step)"
BASELINE = {"ckpt": False, "precision": "fp32", "chunking": False, "compression": False}


def _label(f: dict) -> str:
    on = [n for n, k in (("grad-ckpt", "ckpt"), ("chunking", "chunking"), ("state-compression", "compression"))
          if f[k]]
    if f["precision"] != "fp32":
        on.insert(0, f["precision"])
    return " + ".join(on) if on else "baseline (fp32)"


def _matrix(ctx: Context) -> list[dict]:
    halves = ctx.half_precisions()
    if ctx.cuda and not ctx.quick:
        combos = [dict(zip(("ckpt", "precision", "chunking", "compression"), c))
                  for c in itertools.product((False, True), ["fp32", *halves], (False, True), (False, True))]
        combos.sort(key=lambda f: f != BASELINE)
        return combos
    one_at_a_time = [{}, {"ckpt": True}, *({"precision": p} for p in halves), {"chunking": True},
                     {"compression": True}]
    combos = [{"chunking": True, "compression": True}, {"ckpt": True, "chunking": True},
              {"ckpt": True, "precision": ctx.half, "chunking": True, "compression": True}]
    if ctx.quick:
        one_at_a_time, combos = [{}, {"ckpt": True}, {"precision": ctx.half}, {"chunking": True}], combos[:1]
    return [{**BASELINE, **f} for f in one_at_a_time + combos]


def plan(ctx: Context) -> list[dict]:
    if ctx.cuda:
        size, B, T, chunk = ("0.1b", 1, 512, 128) if ctx.quick else ("0.1b", 4, 2048, 512)
    else:
        size, B, T, chunk = ("tiny", 1, 64, 16) if ctx.quick else ("small", 1, 512, 128)
    return [{"label": _label(f), **f, "size": size, **SIZES[size], "B": B, "T": T, "chunk": chunk}
            for f in _matrix(ctx)]


def build(spec: dict, ctx: Context) -> Bench:
    model = build_model(spec["size"], ctx.device, rwkv_chunk_size=spec["chunk"])
    if spec["ckpt"]:
        model.enable_gradient_checkpointing()
    if spec["compression"]:
        model.enable_state_compression("bf16")
    step = TrainStep(model, ctx.device, batch=spec["B"], seq_len=spec["T"], precision=spec["precision"],
                     chunking=spec["chunking"])
    return Bench({"step": step}, {"step": step.tokens}, final=lambda: {"loss": float(step.last_loss)}, budget_s=60.0)


def finish(rows: list[dict], ctx: Context) -> dict:
    base = next((r for r in rows if r["label"] == _label(BASELINE) and "step" in r), None)
    summary = {}
    for r in rows:
        if base is None or "step" not in r:
            continue
        r["time_vs_baseline"] = ratio(r["step"]["median_s"], base["step"]["median_s"])
        r["memory_vs_baseline"] = ratio(r["peak_memory_bytes"], base["peak_memory_bytes"])
        summary[r["label"]] = {"time_vs_baseline": r["time_vs_baseline"],
                               "memory_vs_baseline": r["memory_vs_baseline"]}
    return summary


COLUMNS = ("configuration", "step", "tok/s", "peak mem", "time vs base", "memory vs base")


def table_row(r: dict) -> list[str]:
    return [r["label"], fmt_time(r.get("step")), fmt_rate(r.get("step_tokens_per_s")),
            fmt_bytes(r.get("peak_memory_bytes")), fmt_ratio(r.get("time_vs_baseline")),
            fmt_ratio(r.get("memory_vs_baseline"))]


def plot(rows: list[dict], fig) -> None:
    from kaggletrain.bench.plots import grouped_bars

    ok = [r for r in rows if r.get("time_vs_baseline") is not None]
    ax = fig.subplots(1, 1)
    grouped_bars(ax, [r["label"] for r in ok],
                 {"step time vs baseline": [r["time_vs_baseline"] for r in ok],
                  "peak memory vs baseline": [r["memory_vs_baseline"] for r in ok]},
                 ylabel="ratio to baseline (lower is better)", title="", baseline=1.0)
