"""Suite `train`: one full optimizer step (forward, backward, clip, AdamW) for model sizes from tiny up.

The step is the training loop's (workloads.TrainStep) on random tokens, in the precision `auto` picks
(fp32 on CPU, bf16 or fp16 on a GPU); with `--compile`, on a GPU, the model compiled as `train.compile` does
(the untimed warm-up runs compile it). Peak memory covers weights, gradients, AdamW state and activations.
MFU (GPU only, known GPUs only) = 6 x matmul parameters (all but the embedding) x tokens/s / peak
fp16/bf16 FLOP/s; the WKV recurrence's own FLOPs are not counted, so it slightly understates.
A size that does not fit in GPU memory is reported as such.
"""

from __future__ import annotations

from kaggletrain.bench.common import Bench, Context, fmt_bytes, fmt_params, fmt_rate, fmt_time
from kaggletrain.bench.machine import peak_tflops
from kaggletrain.bench.workloads import SIZES, TrainStep, build_model, matmul_params

TITLE = "Training step by model size"


def plan(ctx: Context) -> list[dict]:
    if ctx.cuda:
        sizes, B, T = (["tiny", "0.1b"], 2, 256) if ctx.quick else (["0.1b", "0.4b", "1.5b"], 8, 1024)
    else:
        sizes, B, T = (["tiny"], 2, 64) if ctx.quick else (["tiny", "small", "medium"], 4, 256)
    tag = " compiled" if ctx.compile else ""
    return [{"label": f"{s} B={B} T={T}{tag}", "size": s, **SIZES[s], "B": B, "T": T, "precision": ctx.train_precision}
            for s in sizes]


def build(spec: dict, ctx: Context) -> Bench:
    model = build_model(spec["size"], ctx.device)
    if ctx.compile:
        model.compile_for_training()  # as train.compile does; the warm-up runs include the compilation
    step = TrainStep(model, ctx.device, batch=spec["B"], seq_len=spec["T"], precision=spec["precision"])
    return Bench({"step": step}, {"step": step.tokens},
                 info={"params": model.num_parameters(), "matmul_params": matmul_params(model)},
                 final=lambda: {"loss": float(step.last_loss)}, budget_s=60.0)


def finish(rows: list[dict], ctx: Context) -> dict:
    summary = {}
    for r in rows:
        if "step" not in r:
            continue
        peak = peak_tflops(ctx.device_name, r["precision"]) if ctx.cuda else None
        r["mfu"] = 6 * r["matmul_params"] * r["step_tokens_per_s"] / (peak * 1e12) if peak else None
        r["peak_tflops"] = peak
        summary[r["size"]] = {"tokens_per_s": r["step_tokens_per_s"], "peak_memory_bytes": r.get("peak_memory_bytes"),
                              "mfu": r["mfu"]}
    return summary


COLUMNS = ("size", "params", "B×T", "precision", "step", "tok/s", "peak mem", "MFU")


def table_row(r: dict) -> list[str]:
    mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "-"
    return [r["size"], fmt_params(r["params"]) if "params" in r else "-", f"{r['B']}×{r['T']}", r["precision"],
            fmt_time(r.get("step")), fmt_rate(r.get("step_tokens_per_s")), fmt_bytes(r.get("peak_memory_bytes")), mfu]


def plot(rows: list[dict], fig) -> None:
    from kaggletrain.bench.plots import grouped_bars

    ok = [r for r in rows if "step" in r]
    names = [f"{r['size']} ({fmt_params(r['params'])})" for r in ok]
    ax1, ax2 = fig.subplots(1, 2)
    grouped_bars(ax1, names, {"tokens/s": [r["step_tokens_per_s"] for r in ok]}, ylabel="tokens/s",
                 title="training throughput", log=True)
    grouped_bars(ax2, names, {"peak memory": [r["peak_memory_bytes"] / 2**20 for r in ok]}, ylabel="MiB",
                 title="peak memory (weights + grads + AdamW + activations)", log=True)
