"""Every rwkv_cuda forward x backward on small shapes (T not a multiple of the chunk length, with and without an
initial state and a final-state gradient), for NVIDIA's compute-sanitizer; gpu_check.sh runs it when time is
left:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python scripts/sanitize_wkv.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python scripts/sanitize_wkv.py --dtypes fp32

memcheck reports out-of-bounds and misaligned global accesses; without PyTorch's caching allocator every
tensor is its own allocation, so an access past a tensor's end is one. racecheck reports shared-memory hazards
(a missing barrier). The kernels' shared-memory code is the same for every dtype, so one dtype is enough there.
Each combination also checks that its outputs and gradients are finite. With KAGGLETRAIN_WKV_EMULATE=1 it runs
on CPU tensors through the emulator (how this script is tested without a GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_wkv_gpu import DTYPES, wkv_inputs  # noqa: E402  (the benchmark's realistic inputs)

FWDS = ("seq", "chunk")
BWDS = ("new", "chunk", "fused", "scan", "old")
SHAPES = ((1, 37, 2, True), (2, 16, 1, False))  # B, T, H, with s0 and dsT


def inputs(B, T, H, dtype, device, seed):
    """The benchmark's inputs and upstream gradient, plus an initial state and a final-state gradient."""
    N = 64
    ins, dy = wkv_inputs(B, T, H, N, dtype, seed=seed, device=device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    s0 = (torch.randn(B, H, N, N, device=device, generator=g) * 0.3).requires_grad_()
    dsT = torch.randn(B, H, N, N, device=device, generator=g)
    return ins, s0, dy, dsT


def run_one(fwd: str, bwd: str, dtype, device, B, T, H, with_state) -> bool:
    from rwkv_cuda import wkv_cuda
    from rwkv_cuda.loader import _env

    ins, s0, dy, dsT = inputs(B, T, H, dtype, device, seed=T * 7 + B)
    with _env(KAGGLETRAIN_WKV_FWD=fwd, KAGGLETRAIN_WKV_BWD=bwd):  # the extension reads them at each call
        y, sT = wkv_cuda(*ins, s0 if with_state else None)
        loss = (y.float() * dy.float()).sum() + ((sT * dsT).sum() if with_state else 0.0)
        loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    outs = [y, sT] + [t.grad for t in ins] + ([s0.grad] if with_state else [])
    return all(o is not None and bool(torch.isfinite(o.float()).all()) for o in outs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--fwd", default=",".join(FWDS))
    ap.add_argument("--bwd", default=",".join(BWDS))
    args = ap.parse_args(argv)
    from rwkv_cuda import emulated

    device = "cpu" if emulated.enabled() else "cuda"
    if device == "cuda":
        from rwkv_cuda import build_info, kernel_available

        if not torch.cuda.is_available() or not kernel_available(64):
            why = build_info()["error"] if torch.cuda.is_available() else "no GPU"
            print(f"sanitize_wkv: no CUDA kernel to check ({why})")
            return 2
    bad = sweep(args, device)
    print(f"sanitize_wkv: {bad} combination(s) with non-finite outputs")
    return 1 if bad else 0


def sweep(args, device) -> int:
    """Runs the combinations; returns how many had non-finite outputs."""
    bad = 0
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        if device == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
            continue
        for fwd in args.fwd.split(","):
            for bwd in args.bwd.split(","):
                for B, T, H, with_state in SHAPES:
                    ok = run_one(fwd, bwd, dtype, device, B, T, H, with_state)
                    bad += not ok
                    print(f"{'ok ' if ok else 'NON-FINITE'} fwd={fwd} bwd={bwd} {name} B={B} T={T} H={H}"
                          f"{' s0+dsT' if with_state else ''}", flush=True)
    return bad


if __name__ == "__main__":
    sys.exit(main())
