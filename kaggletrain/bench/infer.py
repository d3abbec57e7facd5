"""Suite `infer`: prefill and decode tokens/s at batch 1 and 8.

Uses the generation path's model calls, those `model.generate` runs, on a model prepared as `kaggletrain
generate` prepares it (`optimize_for_inference()`, fp32 weights). Prefill (`kaggletrain.infer.run_last`:
blocks over the prompt, head on the last position only): one prompt of P tokens per row from a zero
state. Decode (`kaggletrain.infer.fast.DecodeStep`, generation's one-token step): S steps of one token
per row carrying the state (greedy argmax between steps).
"""

from __future__ import annotations

import torch

from kaggletrain.bench.common import Bench, Context, fmt_bytes, fmt_params, fmt_rate, fmt_time
from kaggletrain.bench.workloads import PRECISIONS, SIZES, build_model, tokens

TITLE = "Inference: prefill P tokens, decode S steps (fp32 weights)"


def plan(ctx: Context) -> list[dict]:
    if ctx.cuda:
        sizes = [("0.1b", 128, 8)] if ctx.quick else [("0.1b", 1024, 64), ("1.5b", 1024, 64)]
    else:
        sizes = [("tiny", 16, 4)] if ctx.quick else [("small", 128, 16), ("0.1b", 64, 8)]
    dtype = "fp32"  # the fast CPU decode path (compiled kernels) is float32; bf16 weights run through F.linear
    return [{"label": f"{s} batch {B}", "size": s, **SIZES[s], "batch": B, "prompt": P, "steps": S, "dtype": dtype}
            for s, P, S in sizes for B in (1, 8)]


def build(spec: dict, ctx: Context) -> Bench:
    from kaggletrain.infer import run_last
    from kaggletrain.infer.fast import DecodeStep

    B, P, S = spec["batch"], spec["prompt"], spec["steps"]
    model = build_model(spec["size"], ctx.device)
    model.optimize_for_inference(PRECISIONS[spec["dtype"]])
    prompt = tokens(model.config.vocab_size, B, P, ctx.device)
    with torch.no_grad():
        logits, state0 = run_last(model, prompt)
    first = logits.argmax(-1)
    step = DecodeStep(model)

    @torch.no_grad()
    def prefill():
        run_last(model, prompt)

    @torch.no_grad()
    def decode():
        tok, state = first, state0
        for _ in range(S):
            out, state = step(tok, state)
            tok = out.argmax(-1)

    return Bench({"prefill": prefill, "decode": decode}, {"prefill": B * P, "decode": B * S},
                 info={"params": model.num_parameters()})


def finish(rows: list[dict], ctx: Context) -> dict:
    summary = {}
    for r in rows:
        if "decode" not in r:
            continue
        r["decode_ms_per_step"] = r["decode"]["median_s"] / r["steps"] * 1e3
        summary[r["label"]] = {"prefill_tokens_per_s": r["prefill_tokens_per_s"],
                               "decode_tokens_per_s": r["decode_tokens_per_s"]}
        one = next((o for o in rows if o["size"] == r["size"] and o["batch"] == 1 and "decode" in o), None)
        if one is not None and r["batch"] != 1:
            r["decode_speedup_vs_batch1"] = r["decode_tokens_per_s"] / one["decode_tokens_per_s"]
            summary[r["label"]]["decode_speedup_vs_batch1"] = r["decode_speedup_vs_batch1"]
    return summary


COLUMNS = ("model", "batch", "P", "prefill", "prefill tok/s", "S", "decode", "decode tok/s", "ms/step", "peak mem")


def table_row(r: dict) -> list[str]:
    ms = f"{r['decode_ms_per_step']:.1f}" if "decode_ms_per_step" in r else "-"
    return [f"{r['size']} ({fmt_params(r['params'])})" if "params" in r else r["size"], str(r["batch"]),
            str(r["prompt"]), fmt_time(r.get("prefill")), fmt_rate(r.get("prefill_tokens_per_s")), str(r["steps"]),
            fmt_time(r.get("decode")), fmt_rate(r.get("decode_tokens_per_s")), ms, fmt_bytes(r.get("peak_memory_bytes"))]


def plot(rows: list[dict], fig) -> None:
    from kaggletrain.bench.plots import grouped_bars

    ok = [r for r in rows if "decode" in r]
    sizes = list(dict.fromkeys(r["size"] for r in ok))
    batches = sorted({r["batch"] for r in ok})
    for ax, key, title in zip(fig.subplots(1, 2), ("prefill_tokens_per_s", "decode_tokens_per_s"),
                              ("prefill", "decode")):
        values = {f"batch {b}": [next((r[key] for r in ok if r["size"] == s and r["batch"] == b), None)
                                 for s in sizes] for b in batches}
        grouped_bars(ax, sizes, values, ylabel="tokens/s", title=title, log=True)
