"""Tuning sweep of the CUDA WKV kernel's compile-time knobs on a GPU (for a lent GPU; `gpu_check.sh --sweep`).

Each variant is the same source built with extra -D flags (KAGGLETRAIN_CUDA_EXTRA_FLAGS, part of the build
cache key) and one backward (KAGGLETRAIN_WKV_BWD). All variants build at once in separate processes (variants
with the same flags share one build), then each is checked against the float64 reference (that backward's
reference cases) and timed with bench_wkv_gpu.py (bf16, H=32 and H=12). Prints a table; --json writes it.

    python benchmarks/sweep_wkv_gpu.py [--variants base,chunk,chunkminb2,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name: (flags, backward)
    "base": ("", "new"),
    "chunk": ("", "chunk"),
    "fused": ("", "fused"),  # the chunk backward as one launch (row recursion and chunks overlapping)
    "chunksimt": ("-DWKV7_CHUNK_TC=0", "chunk"),  # the chunk kernel's CUDA-core body (the T4's) on this GPU
    "chunkminb2": ("-DWKV7_CHUNK_MINB=2", "chunk"),  # chunk kernel: up to 255 registers, 2 blocks per SM
    "chunkminb3": ("-DWKV7_CHUNK_MINB=3", "chunk"),  # up to 168 registers
    "minb2": ("-DWKV7_COLS_MINB=2", "new"),  # column kernel: more registers per thread, fewer blocks per SM
    "minb4": ("-DWKV7_COLS_MINB=4", "new"),  # fewer registers, more blocks per SM (may spill)
    "sub4": ("-DWKV7_SUB_NEW=4", "new"),     # exact state every 4 tokens: more recompute, fewer backsteps
    "sub16": ("-DWKV7_SUB_NEW=16", "new"),   # every 16: less recompute, up to 15 backsteps (accuracy must hold)
    "fwdrows4": ("-DWKV7_FWD_ROWS=4", "new"),
}
BUILD = "from rwkv_cuda import kernel_available, build_info; import sys; ok = kernel_available(64); " \
        "print(build_info()); sys.exit(0 if ok else 1)"


def run(cmd, env, timeout):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new variants after this")
    args = ap.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    t0 = time.perf_counter()
    envs = {}
    for n in names:
        flags, bwd = VARIANTS[n]
        envs[n] = {**os.environ, "KAGGLETRAIN_CUDA_EXTRA_FLAGS": flags, "KAGGLETRAIN_WKV_BWD": bwd, "MAX_JOBS": "2",
                   "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    flag_sets = {VARIANTS[n][0] for n in names}  # one build per set of flags
    builds = {f: subprocess.Popen([sys.executable, "-c", BUILD], cwd=ROOT,
                                  env=envs[next(n for n in names if VARIANTS[n][0] == f)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for f in flag_sets}
    outs = {f: p.communicate(timeout=600)[0] for f, p in builds.items()}
    rows = []
    for n in names:
        flags, bwd = VARIANTS[n]
        out = outs[flags]
        row = {"variant": n, "flags": flags, "bwd": bwd, "built": builds[flags].returncode == 0}
        rows.append(row)
        if not row["built"]:
            row["error"] = out.strip().splitlines()[-1:] if out.strip() else ["?"]
    print(f"built {sum(r['built'] for r in rows)}/{len(rows)} variants in {time.perf_counter() - t0:.0f} s",
          flush=True)
    for row in rows:
        if not row["built"] or time.perf_counter() - t0 > args.budget_s:
            continue
        env = envs[row["variant"]]
        p = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_kernel.py",
                 "-k", f"test_matches_float64_reference and {row['bwd']}"], env, 180)
        row["reference_tests"] = (p.stdout.strip().splitlines() or ["?"])[-1]
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "b.json"
            p = run([sys.executable, "benchmarks/bench_wkv_gpu.py", "--impls", "cuda", "--dtypes", "bf16",
                     "--bwd", row["bwd"], "--split", "", "--json", str(out)], env, 180)
            if out.exists():
                for r in json.loads(out.read_text())["results"]:
                    key = "H12" if r.get("H") == 12 else "H32"
                    row[f"{key}_fwd_ms"], row[f"{key}_fwd_bwd_ms"] = r["fwd_ms"], r["fwd_bwd_ms"]
            else:
                row["bench_error"] = p.stderr.strip().splitlines()[-1:]
        print(json.dumps(row), flush=True)
    print("\n| variant | bwd | flags | reference tests | H=32 fwd | H=32 fwd+bwd | H=12 fwd | H=12 fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        print(f"| {r['variant']} | {r['bwd']} | {r['flags'] or '-'} | {r.get('reference_tests', r.get('error', '-'))} | "
              f"{f('H32_fwd_ms')} | {f('H32_fwd_bwd_ms')} | {f('H12_fwd_ms')} | {f('H12_fwd_bwd_ms')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
