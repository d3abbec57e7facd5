"""Suite `context`: peak memory and tokens/s of a training step against the sequence length.

Three ways to train on one long sequence: unchunked (all T tokens' activations at once), chunked with full
BPTT (`train.use_chunking`, `train.bptt: full`: chunks of rwkv_chunk_size tokens, exact gradients through
the carried state, each chunk recomputed in the backward pass) and chunked with truncated BPTT
(`train.bptt: truncated`: the state is detached at chunk boundaries). With chunking, peak memory should
grow with the chunk size rather than with T.
"""

from __future__ import annotations

from kaggletrain.bench.common import Bench, Context, fmt_bytes, fmt_rate, fmt_ratio, fmt_time
from kaggletrain.bench.timing import ratio
from kaggletrain.bench.workloads import SIZES, TrainStep, build_model

TITLE = "Long context: peak memory and speed against sequence length"
MODES = {"unchunked": (False, "full"), "chunked, full BPTT": (True, "full"),
         "chunked, truncated BPTT": (True, "truncated")}


def plan(ctx: Context) -> list[dict]:
    if ctx.cuda:
        size, chunk, lengths = ("0.1b", 512, [512, 2048]) if ctx.quick else ("0.1b", 2048, [2048, 8192, 32768, 65536])
    else:
        size, chunk, lengths = ("tiny", 32, [32, 128]) if ctx.quick else ("tiny", 256, [256, 1024, 4096])
    return [{"label": f"{mode} T={T}", "mode": mode, "T": T, "chunk": chunk, "size": size, **SIZES[size], "B": 1,
             "precision": ctx.train_precision} for mode in MODES for T in lengths]


def build(spec: dict, ctx: Context) -> Bench:
    chunking, bptt = MODES[spec["mode"]]
    model = build_model(spec["size"], ctx.device, rwkv_chunk_size=spec["chunk"])
    step = TrainStep(model, ctx.device, batch=spec["B"], seq_len=spec["T"], precision=spec["precision"],
                     chunking=chunking, bptt=bptt)
    return Bench({"step": step}, {"step": step.tokens})


def finish(rows: list[dict], ctx: Context) -> dict:
    """Peak memory relative to the unchunked step at the shortest length (one chunk)."""
    ok = [r for r in rows if "step" in r]
    ref = min((r for r in ok if r["mode"] == "unchunked"), key=lambda r: r["T"], default=None)
    summary = {}
    for r in ok:
        if ref is not None:
            r["memory_vs_one_chunk"] = ratio(r["peak_memory_bytes"], ref["peak_memory_bytes"])
        summary.setdefault(r["mode"], {})[f"T={r['T']}"] = {
            "peak_memory_bytes": r["peak_memory_bytes"], "tokens_per_s": r["step_tokens_per_s"],
            "memory_vs_one_chunk": r.get("memory_vs_one_chunk")}
    return summary


COLUMNS = ("mode", "T", "chunk", "step", "tok/s", "peak mem", "memory vs T=chunk unchunked")


def table_row(r: dict) -> list[str]:
    return [r["mode"], str(r["T"]), str(r["chunk"]) if MODES[r["mode"]][0] else "-", fmt_time(r.get("step")),
            fmt_rate(r.get("step_tokens_per_s")), fmt_bytes(r.get("peak_memory_bytes")),
            fmt_ratio(r.get("memory_vs_one_chunk"))]


def plot(rows: list[dict], fig) -> None:
    from kaggletrain.bench.plots import lines

    ok = [r for r in rows if "step" in r]
    ax1, ax2 = fig.subplots(1, 2)
    series_mem, series_tps = {}, {}
    for mode in MODES:
        rs = sorted((r for r in ok if r["mode"] == mode), key=lambda r: r["T"])
        series_mem[mode] = ([r["T"] for r in rs], [r["peak_memory_bytes"] / 2**20 for r in rs])
        series_tps[mode] = ([r["T"] for r in rs], [r["step_tokens_per_s"] for r in rs])
    lines(ax1, series_mem, xlabel="sequence length T", ylabel="peak memory (MiB)", title="peak memory",
          logx=True, logy=True)
    lines(ax2, series_tps, xlabel="sequence length T", ylabel="tokens/s", title="throughput", logx=True)
