#!/usr/bin/env bash
# One command for a lent GPU: build the rwkv_cuda kernel (timed), run the CUDA tests, run the GPU
# benchmarks, print a short summary LAST. Steps, most valuable first (each capped by what is left of the
# budget, and skipped when too little is left): build; CUDA kernel tests; WKV forwards seq/chunk x backwards
# new/chunk/fused/scan/old; 0.1B end to end with per-block torch.compile, then eager + profile; the
# torch.compile tests; the dry run that runs out of memory (issue 11); compute-sanitizer memcheck and racecheck
# over every kernel combination; two more dry runs and a tuning sweep of the kernel's compile-time knobs when a
# larger budget leaves time for them.
# Needs only python3 with torch, numpy, pytest, ninja (+ nvcc); run from anywhere:
#   GPU_CHECK_BUDGET_S=340 timeout 380 scripts/gpu_check.sh   (under 6 minutes, the default budget; a lease's
#   15 minutes then leave room for the machine's start and one rerun). Logs and JSON go to $OUT when set
#   (device tool), else a temp dir.
set -uo pipefail
cd "$(dirname "$0")/.."
# The device tool brings back at most 8 files from $OUT: the logs and JSON go to a work folder, and
# gpu_check.tgz (all of them, refreshed after every step) plus summary.txt go to $OUT.
RESULTS="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
OUT=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
export OUT
save() { tar czf "$RESULTS/gpu_check.tgz" -C "$OUT" . 2>/dev/null; }
trap save EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export KAGGLETRAIN_CUDA_CACHE="${KAGGLETRAIN_CUDA_CACHE:-/tmp/kaggletrain_cuda_cache}"
export MAX_JOBS="${MAX_JOBS:-4}"
PY="${PYTHON:-python3}"
T0=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
echo "nvcc: $(command -v nvcc) $(nvcc --version 2>/dev/null | tail -1)"
echo "ninja: $(command -v ninja) $(ninja --version 2>/dev/null)"

# Every step gets min(its own cap, what is left of GPU_CHECK_BUDGET_S minus a reserve for the summary):
# a step that would start with too little left is skipped and says so, so the summary always prints.
BUDGET=${GPU_CHECK_BUDGET_S:-340}
left() { echo $(( BUDGET - 15 - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
enough() { [ "$(left)" -ge "$1" ] || { echo "skipped: $(left) s of the budget left (needs $1 s)"; return 1; }; }

echo "== build"
timeout "$(cap 240)" "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/build.txt"
import time
t = time.perf_counter()
from rwkv_cuda import build_info, kernel_available
ok = kernel_available(64)
info = build_info()
print(f"BUILD ok={ok} seconds={time.perf_counter() - t:.1f} dir={info['dir']}")
if not ok:
    print("error:", info["error"])
PYEOF
# The built extension comes back too (cuda_cache.tgz): a later run can unpack it into its
# KAGGLETRAIN_CUDA_CACHE and skip the build (the cache key is the source hash, arch and torch version).
[ -d "$KAGGLETRAIN_CUDA_CACHE" ] && tar czf "$RESULTS/cuda_cache.tgz" -C "$KAGGLETRAIN_CUDA_CACHE" . 2>/dev/null
BUILD_LOG=$(sed -n 's/.*dir=\([^ ]*\).*/\1/p' "$OUT/build.txt" | tail -1)
[ -n "$BUILD_LOG" ] && [ -f "$BUILD_LOG/build.log" ] && cp "$BUILD_LOG/build.log" "$OUT/build.log" \
  && grep -E "registers|spill" "$OUT/build.log" | sed 's/^ *//' | sort | uniq -c | head -20

save
echo "== tests"
rm -f "$OUT/errors.jsonl"
# The torch.compile tests (inductor builds in 3 precisions: slower) run later, after the end-to-end numbers: the
# kernel tests' closing summary is what pick_wkv_bwd.py reads (a run cut off by its cap picks the defaults).
KAGGLETRAIN_TEST_REPORT="$OUT/errors.jsonl" timeout "$(cap 120)" "$PY" -m pytest -q -m cuda tests/test_cuda_kernel.py \
  -p no:cacheprovider -rfE 2>&1 | tee "$OUT/pytest.txt"
TEST_RC=${PIPESTATUS[0]}

save
echo "== benchmark"
BENCH_RC=1
enough 40 && { timeout "$(cap 100)" "$PY" benchmarks/bench_wkv_gpu.py --json "$OUT/bench_wkv_gpu.json" 2>&1 \
  | tee "$OUT/bench.txt"; BENCH_RC=${PIPESTATUS[0]}; }
# The end-to-end runs below use the fastest backward (bf16 fwd+bwd at the 0.1B model's H=12) and forward among
# those that failed no test; "new" and "seq", the defaults, when nothing was timed.
export KAGGLETRAIN_WKV_BWD=$("$PY" benchmarks/pick_wkv_bwd.py "$OUT/pytest.txt" "$OUT/bench_wkv_gpu.json")
export KAGGLETRAIN_WKV_FWD=$("$PY" benchmarks/pick_wkv_bwd.py --forward "$OUT/pytest.txt" "$OUT/bench_wkv_gpu.json")
echo "end-to-end runs use KAGGLETRAIN_WKV_FWD=$KAGGLETRAIN_WKV_FWD KAGGLETRAIN_WKV_BWD=$KAGGLETRAIN_WKV_BWD"

save
echo "== end-to-end training (0.1B RWKV-7, B=8, T=4096): per-block torch.compile, then eager + profile"
TRAIN_RC=1
enough 70 && timeout "$(cap 150)" "$PY" benchmarks/bench_train_gpu.py --compile --profile 10 \
    --json "$OUT/bench_train_gpu_compiled.json" 2>&1 | tee "$OUT/train_compiled.txt"
enough 40 && { timeout "$(cap 100)" "$PY" benchmarks/bench_train_gpu.py --profile 15 --json "$OUT/bench_train_gpu.json" \
  2>&1 | tee "$OUT/train.txt"; TRAIN_RC=${PIPESTATUS[0]}; }

save
echo "== torch.compile tests (the compiled end-to-end run above is trusted only if they pass)"
COMPILE_TEST_RC=1
enough 30 && { timeout "$(cap 100)" "$PY" -m pytest -q -m cuda tests/test_cuda_torch_compile.py -p no:cacheprovider \
  -rfE 2>&1 | tee "$OUT/pytest_compile.txt"; COMPILE_TEST_RC=${PIPESTATUS[0]}; }

save
echo "== dry run that runs out of memory (issue 11: the batch search on a GPU)"
DRY3_RC=1
H100CFG="configs/rwkv7_0.1b_h100.yaml data.source=builtin data.tokenizer=byte"  # byte ids < vocab 65536
# Out of memory on purpose (2M tokens per micro-batch): the dry run must answer with a batch that fits.
# (+30 s since session 14: the T4 rehearsal, its micro-batch bisection and this GPU's rehearsal, ~4 s each)
enough 40 && { timeout "$(cap 150)" "$PY" -m kaggletrain train $H100CFG train.seq_len=4096 train.batch_size=512 \
  train.micro_batch_size=512 --dry-run --steps 3 --json > "$OUT/dry_run_gpu_oom.json" 2> "$OUT/dry_run_gpu_oom.err"
  DRY3_RC=$?; }

save
echo "== compute-sanitizer on every forward x backward, small shapes (memcheck, then racecheck in fp32)"
CS=$(command -v compute-sanitizer || ls "$(dirname "$(command -v nvcc)")/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
MEMCHECK_RC=-; RACECHECK_RC=-
if [ -z "$CS" ]; then echo "compute-sanitizer not found"; else
  # Without the caching allocator every tensor is its own allocation: an access past a tensor's end is seen.
  enough 60 && { PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(cap 120)" "$CS" --tool memcheck --error-exitcode 9 \
    "$PY" scripts/sanitize_wkv.py > "$OUT/memcheck.txt" 2>&1; MEMCHECK_RC=$?; tail -3 "$OUT/memcheck.txt"; }
  # (any other memcheck status: the sanitizer could not run here, e.g. "Device not supported" under gVisor)
  { [ "$MEMCHECK_RC" = 0 ] || [ "$MEMCHECK_RC" = 9 ]; } && enough 60 && { timeout "$(cap 120)" "$CS" --tool racecheck --error-exitcode 9 "$PY" scripts/sanitize_wkv.py \
    --dtypes fp32 > "$OUT/racecheck.txt" 2>&1; RACECHECK_RC=$?; tail -3 "$OUT/racecheck.txt"; }
fi

save
echo "== dry runs: tiny config and the 0.1B H100 config (issue 11)"
DRY_RC=1; DRY2_RC=1
enough 30 && { timeout "$(cap 90)" "$PY" -m kaggletrain train configs/tiny.yaml train.device=cuda train.precision=auto \
  --dry-run --steps 6 --json > "$OUT/dry_run_gpu.json" 2> "$OUT/dry_run_gpu.err"; DRY_RC=$?; }
enough 30 && { timeout "$(cap 120)" "$PY" -m kaggletrain train $H100CFG --dry-run --steps 4 --json \
  > "$OUT/dry_run_gpu_0.1b.json" 2> "$OUT/dry_run_gpu_0.1b.err"; DRY2_RC=$?; }

save
echo "== tuning sweep of the kernel's compile-time knobs (benchmarks/sweep_wkv_gpu.py, if time is left)"
enough 120 && timeout "$(cap 400)" "$PY" benchmarks/sweep_wkv_gpu.py --budget-s $(( $(left) - 90 )) \
  --json "$OUT/sweep_wkv_gpu.json" 2>&1 | tee "$OUT/sweep.txt"

save
{
echo
echo "================ summary ($(( $(date +%s) - T0 )) s) ================"
grep -h "^BUILD" "$OUT/build.txt"
echo "pytest kernel rc=$TEST_RC: $(grep -E '(passed|failed|error|skipped)' "$OUT/pytest.txt" | tail -1)"
echo "pytest torch.compile rc=$COMPILE_TEST_RC: $(grep -E '(passed|failed|error|skipped)' "$OUT/pytest_compile.txt" 2>/dev/null | tail -1)"
"$PY" - <<'EOF'
import json, os
path = os.path.join(os.environ["OUT"], "errors.jsonl")
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
worst = {}
for r in rows:
    dt = r["case"].split()[0]
    for k, v in r.items():
        if k != "case":
            worst.setdefault(dt, {})[k] = max(v, worst.get(dt, {}).get(k, 0.0))
for dt, d in worst.items():
    print(f"max rel err {dt:9s} " + " ".join(f"{k}={v:.1e}" for k, v in d.items()))
path = os.path.join(os.environ["OUT"], "bench_wkv_gpu.json")
if os.path.exists(path):
    b = json.load(open(path))
    print(f"| impl | dtype | fwd ms | fwd+bwd ms |   {b['card']}, B,T,H,N = {tuple(b['shape'].values())}")
    for r in b["results"]:
        print(f"| {r['impl']} | {r['dtype']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |")
EOF
echo "bench rc=$BENCH_RC; end-to-end runs used KAGGLETRAIN_WKV_FWD=$KAGGLETRAIN_WKV_FWD KAGGLETRAIN_WKV_BWD=$KAGGLETRAIN_WKV_BWD"
grep -h "^TRAIN" "$OUT/train.txt" || echo "train bench rc=$TRAIN_RC"
grep -h "^TRAIN" "$OUT/train_compiled.txt" || echo "compiled train bench: no result (see train_compiled.txt)"
grep -h "^| " "$OUT/sweep.txt" 2>/dev/null || echo "sweep: not run"
echo "compute-sanitizer: memcheck rc=$MEMCHECK_RC ($(grep -c 'Invalid\|Misaligned' "$OUT/memcheck.txt" 2>/dev/null || echo 0) invalid or misaligned accesses), racecheck rc=$RACECHECK_RC ($(grep -c 'hazard' "$OUT/racecheck.txt" 2>/dev/null || echo 0) hazard lines); 0 = clean, 9 = errors, 124 = cut off, else the sanitizer did not run"
"$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"dry run OOM rc=$DRY3_RC: out_of_memory={bool(r.get('out_of_memory'))} suggestion={r.get('suggestion')}\")" "$OUT/dry_run_gpu_oom.json" 2>/dev/null || echo "dry run OOM rc=$DRY3_RC: $(tail -1 "$OUT/dry_run_gpu_oom.err")"
for f in dry_run_gpu dry_run_gpu_0.1b; do
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); g=r.get('rehearsed_peak_memory_bytes'); print(f\"dry run {sys.argv[2]}: {r['device_name']} {r['precision']} wkv={r['wkv_impl']} {r['tokens_per_s']:,.0f} tok/s, peak {r['peak_memory_bytes']/2**30:.2f} GiB, rehearsed {g/2**30 if g else float('nan'):.2f} GiB (x{g/r['peak_memory_bytes'] if g else float('nan'):.3f}), T4 {r['projected_t4_memory_gb']:.1f} GB fits={r['fits_t4']}\")" "$OUT/$f.json" "$f" 2>/dev/null || echo "dry run $f failed: $(tail -1 "$OUT/$f.err")"
done
} 2>&1 | tee "$RESULTS/summary.txt"
exit $(( TEST_RC != 0 || COMPILE_TEST_RC != 0 || BENCH_RC != 0 || TRAIN_RC != 0 || DRY_RC != 0 || DRY2_RC != 0 ))
