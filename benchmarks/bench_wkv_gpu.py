"""GPU benchmark of the WKV-7 implementations at one training shape (default B=8, T=4096, H=32, N=64).

    PYTHONPATH=. python benchmarks/bench_wkv_gpu.py [--dtypes bf16,fp16,fp32] [--json out.json]

Rows: rwkv_cuda (the compiled kernel) once per backward implementation (`--bwd new,chunk,fused,scan,old`, selected through
KAGGLETRAIN_WKV_BWD, which the extension reads at each backward call) with the sequential forward, then with the
chunked forward (`--fwd chunk`, KAGGLETRAIN_WKV_FWD; sm_80+) and each backward but old, then the new backward once per row split
(`--split auto,1`, none by default: KAGGLETRAIN_WKV_SPLIT, the blocks per head of the forward and the backward's row kernel; the
name shows what auto resolved to), the PyTorch chunked fallback (kaggletrain.ops.wkv_chunked, when
present), and causal SDPA attention at the same size (q, k, v [B, H, T, N]) as a yardstick. `--also-H 12`
repeats the rwkv_cuda rows alone, bf16 only, at H=12 (the 0.1B model's heads: B*H=96 blocks without a split,
fewer than a 132-SM GPU has), right after the main shape's bf16 rows, their names ending in "H=12". The JSON is
rewritten after every row, so a run cut off by a time cap keeps what it timed. Columns:
forward (training mode, i.e. saving what the backward needs) and forward+backward (upstream gradient on y),
medians of CUDA-event timings after warm-up. Inputs are fresh random tensors with realistic ranges (never
zeros). Needs only torch (+ the repo on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from rwkv_cuda.loader import _env

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_time_ms(fn, warmup: int, iters: int, budget_s: float) -> float:
    """Median milliseconds of fn() by CUDA events; fewer iterations when one call is slow."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + budget_s
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if time.perf_counter() > t_end and len(times) >= 3:
            break
    return statistics.median(times)


def wkv_inputs(B, T, H, N, dtype, seed=0, device="cuda"):
    """r, w, k, v, a, b (leaves in `dtype`, realistic ranges) and an upstream gradient for y."""
    g = torch.Generator(device=device).manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, device=device, generator=g) for _ in range(3))
    w = torch.rand(B, T, H, N, device=device, generator=g) * 12 - 8
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, device=device, generator=g), dim=-1)
    gate = torch.rand(B, T, H, N, device=device, generator=g)
    ins = [t.to(dtype).requires_grad_() for t in (r, w, k, v, -kk, kk * gate)]
    dy = torch.randn(B, T, H, N, device=device, generator=g).to(dtype)
    return ins, dy


def bench_wkv(fn, ins, dy, warmup, iters, budget_s):
    def fwd():
        return fn(*ins)

    def fwd_bwd():
        y, _ = fn(*ins)
        y.backward(dy)

    f = cuda_time_ms(fwd, warmup, iters, budget_s)
    fb = cuda_time_ms(fwd_bwd, warmup, iters, budget_s)
    for t in ins:
        t.grad = None
    return f, fb


def bench_sdpa(B, T, H, N, dtype, warmup, iters, budget_s):
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, T, N, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(3))
    dy = torch.randn(B, H, T, N, device="cuda", generator=g).to(dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        return sdpa(q, k, v, is_causal=True)

    def fwd_bwd():
        sdpa(q, k, v, is_causal=True).backward(dy)

    return cuda_time_ms(fwd, warmup, iters, budget_s), cuda_time_ms(fwd_bwd, warmup, iters, budget_s)


def cuda_rows(args, wkv_cuda, BH: int) -> list:
    """(name, fn, env) per rwkv_cuda row: one per backward, then the new backward once per row split."""
    from rwkv_cuda.loader import load_extension

    bwds = list(filter(None, args.bwd.split(",")))
    rows = [(f"rwkv_cuda bwd={variant}", wkv_cuda, {"KAGGLETRAIN_WKV_BWD": variant, "KAGGLETRAIN_WKV_FWD": "seq"})
            for variant in bwds]
    ext = load_extension()
    for fwd in filter(None, args.fwd.split(",")):
        with _env(KAGGLETRAIN_WKV_FWD=fwd):
            if ext.fwd_variant() != fwd:  # e.g. the chunk forward on a GPU without TF32 (the T4)
                print(f"rwkv_cuda fwd={fwd}: not built for this GPU, not timed")
                continue
        rows += [(f"rwkv_cuda fwd={fwd} bwd={variant}", wkv_cuda,
                  {"KAGGLETRAIN_WKV_BWD": variant, "KAGGLETRAIN_WKV_FWD": fwd}) for variant in bwds if variant != "old"]
    for split in filter(None, args.split.split(",")):
        label = split
        if split == "auto" and hasattr(ext, "split"):  # what auto picks for this many heads on this GPU
            with _env(KAGGLETRAIN_WKV_SPLIT="auto"):
                label = f"auto({ext.split(BH)})"
        rows.append((f"rwkv_cuda bwd=new split={label}", wkv_cuda,
                     {"KAGGLETRAIN_WKV_BWD": "new", "KAGGLETRAIN_WKV_SPLIT": split}))
    return rows


def time_rows(rows, ins, dy, dname, args, suffix=""):
    """Yields one result per row as soon as it is timed."""
    for name, fn, env in rows:
        name += suffix
        slow = name.startswith("chunked")  # the fallback can take ~a second per call: fewer repeats
        try:
            with _env(**env):  # the extension reads them at each call
                f, fb = bench_wkv(fn, ins, dy, 1 if slow else args.warmup, 5 if slow else args.iters, args.budget_s)
        except torch.cuda.OutOfMemoryError:
            print(f"{name} {dname}: out of memory")
            torch.cuda.empty_cache()
            continue
        except RuntimeError as e:  # e.g. a launch failure of one variant: report it, time the others
            print(f"{name} {dname}: failed: {e}")
            continue
        print(f"{name:26s} {dname}: fwd {f:8.2f} ms  fwd+bwd {fb:8.2f} ms", flush=True)
        yield {"impl": name, "dtype": dname, "fwd_ms": f, "fwd_bwd_ms": fb}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--impls", default="cuda,chunked,sdpa")
    p.add_argument("--bwd", default="new,chunk,fused,scan,old", help="rwkv_cuda backward implementations to time (KAGGLETRAIN_WKV_BWD)")
    p.add_argument("--fwd", default="chunk",
                   help="other rwkv_cuda forwards to time, with each backward but old (KAGGLETRAIN_WKV_FWD; the "
                        "plain rows use the sequential forward)")
    p.add_argument("--split", default="",
                   help="row splits to time the new backward with (KAGGLETRAIN_WKV_SPLIT: 1, 2, 4, auto; comma-"
                        "separated); none by default: every split measured slower on an H200")
    p.add_argument("--also-H", type=int, default=12,
                   help="also time the rwkv_cuda rows (bf16 only) at this H (0: don't)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=8.0, help="time cap per measurement")
    p.add_argument("--json", default=None, help="write results here (default: $OUT/bench_wkv_gpu.json if $OUT)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark")
        return 0

    B, T, H, N = args.B, args.T, args.H, args.N
    impls = args.impls.split(",")
    card = torch.cuda.get_device_name()
    results = []
    out = args.json or (os.path.join(os.environ["OUT"], "bench_wkv_gpu.json") if os.environ.get("OUT") else None)

    def add(row: dict) -> None:
        """Keep a row and rewrite the JSON, so a run cut off by its time cap keeps what it timed."""
        results.append(row)
        if out:
            with open(out, "w") as fh:
                json.dump({"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "shape": {"B": B, "T": T, "H": H, "N": N}, "results": results}, fh, indent=1)

    print(f"# {card}, torch {torch.__version__}, B={B} T={T} H={H} N={N}", flush=True)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
            print(f"skip {dname}: no native bf16")
            continue
        ins, dy = wkv_inputs(B, T, H, N, dtype)
        rows = []
        if "cuda" in impls:
            from rwkv_cuda import build_info, kernel_available, wkv_cuda

            if kernel_available(N):
                rows += cuda_rows(args, wkv_cuda, B * H)
            else:
                print(f"rwkv_cuda unavailable: {build_info()}")
        for row in time_rows(rows, ins, dy, dname, args):
            add({**row, "H": H})
        del ins, dy
        torch.cuda.empty_cache()
        # The 0.1B model's heads right after the main shape's bf16 rows: the end-to-end runs pick their kernels
        # from these, so they come before the slower yardsticks.
        if dname == "bf16" and args.also_H and args.also_H != H and "cuda" in impls:
            from rwkv_cuda import kernel_available, wkv_cuda

            if kernel_available(N):
                H2 = args.also_H
                print(f"# rwkv_cuda at H={H2} (B*H = {B * H2} blocks without a row split)", flush=True)
                ins, dy = wkv_inputs(B, T, H2, N, torch.bfloat16)
                for row in time_rows(cuda_rows(args, wkv_cuda, B * H2), ins, dy, "bf16", args, suffix=f" H={H2}"):
                    add({**row, "H": H2})
                del ins, dy
                torch.cuda.empty_cache()
        if "chunked" in impls:
            try:
                from kaggletrain.ops.wkv_chunked import wkv_chunked
            except ImportError as e:
                print(f"chunked fallback not importable: {e}")
            else:
                ins, dy = wkv_inputs(B, T, H, N, dtype)
                for row in time_rows([("chunked (PyTorch)", wkv_chunked, {})], ins, dy, dname, args):
                    add({**row, "H": H})
                del ins, dy
                torch.cuda.empty_cache()
        if "sdpa" in impls:
            f, fb = bench_sdpa(B, T, H, N, dtype, args.warmup, args.iters, args.budget_s)
            add({"impl": "causal SDPA", "dtype": dname, "fwd_ms": f, "fwd_bwd_ms": fb, "H": H})
            print(f"{'causal SDPA':26s} {dname}: fwd {f:8.2f} ms  fwd+bwd {fb:8.2f} ms", flush=True)
            torch.cuda.empty_cache()

    print(f"\n| implementation | dtype | fwd ms | fwd+bwd ms |  ({card}, B={B} T={T} H={H} N={N})")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['impl']} | {r['dtype']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
