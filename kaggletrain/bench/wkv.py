"""Suite `wkv`: the WKV-7 operator alone, through kaggletrain.ops.wkv (sequential, chunked, CUDA kernel).

Forward in training mode (inputs require grad, so it saves what the backward needs) and forward+backward
(gradient of y with a random upstream gradient), at several B/T/H with N = 64. Float32 on CPU; on a GPU
the inputs are in the half precision the model would feed (bf16, or fp16 on a T4). Rows whose
implementation cannot run here (the kernel on a CPU, or a kernel that did not build) are skipped with
the reason; `resolved` says which implementation actually ran.
"""

from __future__ import annotations

import torch

from kaggletrain.bench.common import Bench, Context, fmt_bytes, fmt_rate, fmt_ratio, fmt_time
from kaggletrain.bench.timing import ratio
from kaggletrain.bench.workloads import HEAD_SIZE, PRECISIONS, wkv_inputs

TITLE = "WKV-7 operator: sequential / chunked / CUDA"
# The sequential reference is a Python loop over tokens (and slow on a CPU): limit the tokens it gets.
SEQUENTIAL_MAX_TOKENS = {"cpu": 1024, "cuda": 8192}


def _shapes(ctx: Context) -> list[tuple[int, int, int]]:
    if ctx.cuda:
        return [(2, 512, 12)] if ctx.quick else [(8, 1024, 12), (8, 4096, 12), (4, 4096, 32), (1, 16384, 12)]
    return [(2, 64, 4)] if ctx.quick else [(1, 256, 4), (1, 1024, 4), (4, 1024, 4), (1, 4096, 4)]


def _kernel_problem(ctx: Context) -> str | None:
    if not ctx.cuda:
        return "needs a GPU"
    from rwkv_cuda import build_info, kernel_available

    if kernel_available(HEAD_SIZE):
        return None
    return f"kernel unavailable: {build_info().get('error') or 'see kaggletrain doctor'}"


def plan(ctx: Context) -> list[dict]:
    dtype = ctx.half if ctx.cuda else "fp32"
    impls = ["sequential", "chunked"] + (["cuda"] if ctx.cuda else [])
    specs = []
    for B, T, H in _shapes(ctx):
        for impl in impls:
            spec = {"label": f"{impl} B={B} T={T} H={H}", "impl": impl, "B": B, "T": T, "H": H, "N": HEAD_SIZE,
                    "dtype": dtype}
            if impl == "sequential" and B * T > SEQUENTIAL_MAX_TOKENS[ctx.device.type]:
                spec["skip"] = (f"the sequential reference is a per-token Python loop: run up to "
                                f"B*T={SEQUENTIAL_MAX_TOKENS[ctx.device.type]} only")
            elif impl == "cuda":
                problem = _kernel_problem(ctx)
                if problem:
                    spec["skip"] = problem
            specs.append(spec)
    return specs


def build(spec: dict, ctx: Context) -> Bench:
    from kaggletrain.ops import wkv
    from kaggletrain.ops.wkv import resolve_impl

    B, T, H, N, impl = spec["B"], spec["T"], spec["H"], spec["N"], spec["impl"]
    leaves, dy = wkv_inputs(B, T, H, N, PRECISIONS[spec["dtype"]] or torch.float32, ctx.device)

    def fwd():
        return wkv(*leaves, impl=impl)[0]

    def fwd_bwd():
        torch.autograd.grad(fwd(), leaves, dy)

    return Bench({"fwd": fwd, "fwd_bwd": fwd_bwd}, {"fwd": B * T, "fwd_bwd": B * T},
                 info={"resolved": resolve_impl(impl, leaves[0])}, budget_s=2.0 if ctx.quick else 20.0)


def finish(rows: list[dict], ctx: Context) -> dict:
    """Speed-ups of each implementation over the sequential reference (and CUDA over chunked), per shape."""
    by_shape: dict[tuple, dict] = {}
    for r in rows:
        if "fwd_bwd" in r:
            by_shape.setdefault((r["B"], r["T"], r["H"]), {})[r["impl"]] = r
    summary = {}
    for (B, T, H), impls in by_shape.items():
        seq = impls.get("sequential")
        for name, r in impls.items():
            base = seq if name != "cuda" or seq else impls.get("chunked")
            if base is not None and base is not r:
                r["speedup_vs"] = base["impl"]
                r["fwd_speedup"] = ratio(base["fwd"]["median_s"], r["fwd"]["median_s"])
                r["fwd_bwd_speedup"] = ratio(base["fwd_bwd"]["median_s"], r["fwd_bwd"]["median_s"])
        if "chunked" in impls and seq:
            summary[f"chunked vs sequential, fwd+bwd, B={B} T={T} H={H}"] = impls["chunked"]["fwd_bwd_speedup"]
        if "cuda" in impls and "chunked" in impls:
            summary[f"cuda vs chunked, fwd+bwd, B={B} T={T} H={H}"] = ratio(
                impls["chunked"]["fwd_bwd"]["median_s"], impls["cuda"]["fwd_bwd"]["median_s"])
    return summary


COLUMNS = ("impl (ran)", "B×T×H", "dtype", "fwd", "fwd tok/s", "fwd+bwd", "fwd+bwd tok/s", "speed-up", "peak mem")


def table_row(r: dict) -> list[str]:
    impl = r["impl"] + (f" ({r['resolved']})" if r.get("resolved") not in (None, r["impl"]) else "")
    return [impl, f"{r['B']}×{r['T']}×{r['H']}", r["dtype"], fmt_time(r.get("fwd")),
            fmt_rate(r.get("fwd_tokens_per_s")),
            fmt_time(r.get("fwd_bwd")), fmt_rate(r.get("fwd_bwd_tokens_per_s")),
            fmt_ratio(r.get("fwd_bwd_speedup")) + (f" vs {r['speedup_vs']}" if r.get("speedup_vs") else ""),
            fmt_bytes(r.get("peak_memory_bytes"))]


def plot(rows: list[dict], fig) -> None:
    from kaggletrain.bench.plots import grouped_bars

    ok = [r for r in rows if "fwd_bwd" in r]
    shapes = sorted({(r["B"], r["T"], r["H"]) for r in ok})
    groups = [f"B={B} T={T} H={H}" for B, T, H in shapes]
    impls = [i for i in ("sequential", "chunked", "cuda") if any(r["impl"] == i for r in ok)]
    for ax, key, title in zip(fig.subplots(1, 2), ("fwd_tokens_per_s", "fwd_bwd_tokens_per_s"),
                              ("forward", "forward + backward")):
        values = {i: [next((r[key] for r in ok if r["impl"] == i and (r["B"], r["T"], r["H"]) == s), None)
                      for s in shapes] for i in impls}
        grouped_bars(ax, groups, values, ylabel="tokens/s", title=title, log=True)
