"""The CUDA WKV-7 sources, checked on machines WITHOUT a GPU.

1. nvcc compiles rwkv_cuda/wkv7.cu (device code + launchers, no torch headers) for sm_75 (Kaggle T4:
   float32 + float16 only) and sm_90 (H100/H200: + bfloat16), so a syntax or template error never reaches
   a GPU session. Skipped when nvcc is absent.
2. The same kernel source, compiled with g++ against rwkv_cuda/cuda_emu.h (threads as fibers, barriers and
   warp shuffles emulated, a shuffled schedule per barrier round), runs forward + backward and matches the
   float64 reference. Skipped when g++ is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkv_cuda
from kaggletrain.ops.wkv_reference import wkv_sequential

SRC = Path(rwkv_cuda.__file__).resolve().parent
NVCC_ARCHS = {"sm_75": [], "sm_90": ["-DWKV7_WITH_BF16=1"]}


# ----------------------------------------------------------------------------------------- nvcc
@pytest.fixture(scope="module")
def nvcc_builds(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    out = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for arch, extra in NVCC_ARCHS.items():  # the two compiles run side by side (2 cores)
        cmd = [nvcc, "-c", f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas=-v", *extra,
               str(SRC / "wkv7.cu"), "-o", str(out / f"wkv7_{arch}.o")]
        procs[arch] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for arch, p in procs.items():
        log, _ = p.communicate(timeout=600)
        results[arch] = (p.returncode, log, out / f"wkv7_{arch}.o")
    return results


@pytest.mark.parametrize("arch", sorted(NVCC_ARCHS))
def test_nvcc_compiles(nvcc_builds, arch):
    rc, log, obj = nvcc_builds[arch]
    assert rc == 0, f"nvcc -arch={arch} failed:\n{log}"
    assert obj.stat().st_size > 0
    # ptxas reports per dtype the forward and the new backward's row kernel once per row split (1, 2, 4), the
    # chunk backward's row kernel (a dS checkpoint every chunk, no split), the old one-kernel backward, the new
    # one's column kernel, the chunk kernel and the fused one: 11 kernels per dtype, 2 dtypes on sm_75; on sm_90
    # also the chunked tensor-core scans (the forward and the backward's dS recursion): 13 per dtype, 3 dtypes.
    n_kernels = log.count("Compiling entry function")
    assert n_kernels == (22 if arch == "sm_75" else 39), log
    per_kind = {}
    for name in _ptxas_kernels(log):
        kind = next(k for k in ("fwd_chunk_kernel", "bwd_scan_kernel", "fwd_kernel", "bwd_rows_kernel", "bwd_cols_kernel", "bwd_chunk_kernel",
                                "bwd_fused_kernel", "bwd_kernel") if k in name)
        per_kind[kind] = per_kind.get(kind, 0) + 1
    n_dtypes = 2 if arch == "sm_75" else 3
    want = {"fwd_kernel": 3 * n_dtypes, "bwd_rows_kernel": 4 * n_dtypes, "bwd_cols_kernel": n_dtypes,
            "bwd_chunk_kernel": n_dtypes, "bwd_fused_kernel": n_dtypes, "bwd_kernel": n_dtypes}
    if arch != "sm_75":
        want["fwd_chunk_kernel"] = want["bwd_scan_kernel"] = n_dtypes
    assert per_kind == want, per_kind


def test_bf16_only_for_sm80_plus(nvcc_builds):
    """bf16 kernels are not compiled into the sm_75 build (T4 has no bf16), and are in the sm_90 one."""
    for arch, want in (("sm_75", False), ("sm_90", True)):
        rc, log, _ = nvcc_builds[arch]
        assert rc == 0
        assert ("nv_bfloat16" in log) is want, f"{arch}: bf16 kernels present={not want}"


def _ptxas_kernels(log: str) -> dict:
    """{mangled kernel name: {"registers": n, "spill_stores": bytes}} from nvcc -Xptxas=-v output."""
    kernels, name = {}, None
    for line in log.splitlines():
        if "Compiling entry function" in line:
            name = line.split("'")[1]
            kernels[name] = {}
        elif name and "bytes spill stores" in line:
            kernels[name]["spill_stores"] = int(line.split("bytes spill stores")[0].split(",")[-1])
        elif name and "Used" in line and "registers" in line:
            kernels[name]["registers"] = int(line.split("Used")[1].split("registers")[0])
            m = re.search(r"(\d+) bytes smem", line)
            kernels[name]["smem"] = int(m.group(1)) if m else 0
    return kernels


def test_split_kernels_do_not_spill(nvcc_builds):
    """The sequential kernels run once per row split (KAGGLETRAIN_WKV_SPLIT=1|2|4): the split instantiations
    (2 and 4 blocks per head; the last template argument) of the forward and of the backward's row kernel keep
    their state tile and chunk prefetch in registers (split 1 is the old tiling: see the test below)."""
    for arch in NVCC_ARCHS:
        kernels = _ptxas_kernels(nvcc_builds[arch][1])
        split = {n: k for n, k in kernels.items() if ("fwd_kernel" in n or "bwd_rows_kernel" in n)
                 and re.search(r"Li(\d+)EEEv", n).group(1) in ("2", "4")}
        assert len(split) == (4 if arch == "sm_75" else 6) * 2, sorted(kernels)
        for name, k in split.items():
            assert k.get("spill_stores") == 0 and k.get("registers", 999) <= 255, f"{arch} {name}: {k}"


def test_chunk_kernel_fits_four_blocks_per_sm(nvcc_builds):
    """bwd_chunk_kernel (KAGGLETRAIN_WKV_BWD=chunk) is capped at 128 registers (4 blocks of 128 threads per SM),
    spills at most a few bytes, and its static shared memory stays under the 48 KB a block may have without
    opting in. The shared-memory size also shows which body was compiled: the tensor-core one on sm_90 (two
    half states of 64 x 36 floats), the CUDA-core one on sm_75 (one whole state of 64 x 68)."""
    N, L, NP = 64, 16, 68
    common = 4 * L * NP + L * N + 4 * L * L + N  # token operands, log-decay sums, pair products, psi
    want_smem = {"sm_90": 4 * (common + 2 * N * (N // 2 + 4)), "sm_75": 4 * (common + max(N * NP, 4 * L * N))}
    for arch in NVCC_ARCHS:
        kernels = _ptxas_kernels(nvcc_builds[arch][1])
        chunk = {n: k for n, k in kernels.items() if "bwd_chunk_kernel" in n}
        assert len(chunk) == (2 if arch == "sm_75" else 3), sorted(chunk)
        for name, k in chunk.items():
            assert k["registers"] <= 128 and k["spill_stores"] <= 16, f"{arch} {name}: {k}"
            assert k["smem"] == want_smem[arch] <= 48 * 1024, f"{arch} {name}: {k}"
        # The fused kernel: the same bodies, shared memory the union of both (the chunk's is larger) plus its id;
        # the float32 row recursion spills a little under the 128-register cap.
        fused = {n: k for n, k in kernels.items() if "bwd_fused_kernel" in n}
        assert len(fused) == len(chunk), sorted(fused)
        for name, k in fused.items():
            assert k["registers"] <= 128 and k["spill_stores"] <= 128, f"{arch} {name}: {k}"
            assert k["smem"] == want_smem[arch] + 4, f"{arch} {name}: {k}"


def test_scan_kernels_fit(nvcc_builds):
    """fwd_chunk_kernel (KAGGLETRAIN_WKV_FWD=chunk) and bwd_scan_kernel (KAGGLETRAIN_WKV_BWD=scan) exist on sm_90
    only (TF32 needs sm_80+), keep everything in registers, and their static shared memory (six token slots, the
    state, four pair products, e^{g_L}) stays under 48 KB; at <= 255 registers two blocks of 128 threads fit an
    SM (their launch bounds ask for two, which is what lets ptxas use more than 128 registers without spilling)."""
    N, L, NP = 64, 16, 68
    want_smem = 4 * (6 * L * NP + N * NP + 4 * L * L + N)
    assert "fwd_chunk_kernel" not in nvcc_builds["sm_75"][1] and "bwd_scan_kernel" not in nvcc_builds["sm_75"][1]
    scans = {n: k for n, k in _ptxas_kernels(nvcc_builds["sm_90"][1]).items()
             if "fwd_chunk_kernel" in n or "bwd_scan_kernel" in n}
    assert len(scans) == 6, sorted(scans)
    for name, k in scans.items():
        assert k["spill_stores"] == 0 and k["registers"] <= 255, f"{name}: {k}"
        assert k["smem"] == want_smem <= 48 * 1024, f"{name}: {k}"


def test_backward_has_no_large_spills(nvcc_builds):
    """The backward keeps its three 16-float slices in registers (a few spilled bytes outside the hot loop
    are tolerated); a large spill means the tiling no longer fits and would be slow."""
    for arch in NVCC_ARCHS:
        log = nvcc_builds[arch][1]
        spills = [int(line.split("bytes spill stores")[0].split(",")[-1]) for line in log.splitlines()
                  if "bytes spill stores" in line]
        assert spills and max(spills) <= 128, f"{arch}: spill stores {spills}"


# ----------------------------------------------------------------------------------------- emulator
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# Two emulator builds: the default one (the chunk backward's tensor-core body, as on sm_80+) and one with
# -DWKV7_CHUNK_TC=0 (its CUDA-core body, as on the T4's sm_75); both compile side by side.
EMU_BUILDS = {"emu_wkv7": [], "emu_wkv7_simt": ["-DWKV7_CHUNK_TC=0"]}


@pytest.fixture(scope="module")
def emu_exes(tmp_path_factory):
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("emu")
    procs = {name: subprocess.Popen([gxx, "-std=c++17", "-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
                                     "-DWKV7_EMU", *extra, "-x", "c++", str(SRC / "emu_main.cpp"), "-o", str(out / name)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, extra in EMU_BUILDS.items()}
    for name, p in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name}: {log}"
    return {name: out / name for name in EMU_BUILDS}


@pytest.fixture(scope="module")
def emu_exe(emu_exes):
    return emu_exes["emu_wkv7"]


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _take(buf: bytes, off: int, shape, dtype):
    n = int(np.prod(shape))
    size = n * (4 if dtype == torch.float32 else 2)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}[dtype]
    t = torch.from_numpy(np.frombuffer(buf[off:off + size], np_dtype).copy())
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(shape), off + size


def _inputs(B, T, H, N, gen):
    r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
    w = torch.rand(B, T, H, N, generator=gen) * 22 - 12  # decay logits over the whole useful range
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=gen), dim=-1)
    gate = torch.rand(B, T, H, N, generator=gen)
    return r, w, k, v, -kk, kk * gate


CASES = [  # B, T, H, dtype, w_f32, with initial state, with final-state grad
    (1, 37, 2, torch.float32, False, True, True),  # T not a multiple of 16 nor of 4
    (2, 20, 1, torch.float32, False, False, False),
    (1, 16, 1, torch.float32, False, True, True),
    (1, 3, 1, torch.float32, False, True, False),
    (1, 21, 1, torch.float16, True, True, True),
    (1, 18, 1, torch.bfloat16, False, True, True),
    (1, 150, 1, torch.float32, False, True, True),  # several segments of the new backward (64 tokens), last partial
    (1, 128, 1, torch.float32, False, False, True),  # exactly two segments
    (2, 70, 1, torch.float16, False, True, False),
]
# The backward implementations (KAGGLETRAIN_WKV_BWD): "old" one kernel, "new" rows + parallel columns kernels,
# "chunk" rows + chunk-parallel dense products; with the row split of the forward and the row kernel
# (KAGGLETRAIN_WKV_SPLIT: 1, 2 or 4 blocks per head). The old and chunk backwards only see the split through
# the forward's checkpoints and sa: split 1 and 4 are enough there.
# "chunk-simt" is the chunk backward's CUDA-core body (the sm_75 build), from the second emulator build.
# "fused" is chunk's two kernels as one launch (the same arithmetic); "scan" is chunk with the row recursion in
# chunks on tensor cores too (wkv7_scan.cuh).
VARIANTS = [("old", 1), ("old", 4), ("new", 1), ("new", 2), ("new", 4), ("chunk", 1), ("chunk", 4),
            ("chunk-simt", 1), ("fused", 1), ("scan", 1)]


def _case_inputs(B, T, H, N, dtype, w_f32, has_s0, has_dsT):
    gen = torch.Generator().manual_seed(1000 * T + 10 * B + H)
    r, w, k, v, a, b = _inputs(B, T, H, N, gen)
    ins = [t.to(dtype) for t in (r, w, k, v, a, b)]
    if w_f32:
        ins[1] = w.float()
    s0 = torch.randn(B, H, N, N, generator=gen) * 0.3 if has_s0 else None
    dy = torch.randn(B, T, H, N, generator=gen).to(dtype)
    dsT = torch.randn(B, H, N, N, generator=gen) if has_dsT else None
    header = np.array([B, T, H, N, DTYPE_CODE[dtype], int(w_f32), int(has_s0), int(has_dsT)], np.int32).tobytes()
    blob = header + b"".join(_raw(t) for t in ins) + (_raw(s0) if has_s0 else b"") + _raw(dy)
    blob += _raw(dsT) if has_dsT else b""
    return ins, s0, dy, dsT, blob


def _run_emu(emu_exe, tmp_path, blob, variant, split, fwd="seq") -> bytes:
    (tmp_path / "in.bin").write_bytes(blob)
    env = {**os.environ, "KAGGLETRAIN_WKV_BWD": variant, "KAGGLETRAIN_WKV_SPLIT": str(split),
           "KAGGLETRAIN_WKV_FWD": fwd}
    p = subprocess.run([str(emu_exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    return (tmp_path / "out.bin").read_bytes()


@pytest.mark.parametrize("variant,split", VARIANTS, ids=[f"{v}-split{s}" for v, s in VARIANTS])
@pytest.mark.parametrize("B,T,H,dtype,w_f32,has_s0,has_dsT", CASES)
def test_emulated_kernels_match_reference(emu_exes, tmp_path, B, T, H, dtype, w_f32, has_s0, has_dsT, variant, split):
    exe = emu_exes["emu_wkv7_simt" if variant == "chunk-simt" else "emu_wkv7"]
    _check_against_reference(exe, tmp_path, (B, T, H, dtype, w_f32, has_s0, has_dsT), variant.removesuffix("-simt"),
                             split)


# The chunked tensor-core forward (KAGGLETRAIN_WKV_FWD=chunk), with the backwards that read its checkpoints
# and sa: the default one and the chunk one (the one-kernel backward steps back through its states by division).
FWD_VARIANTS = [("chunk", "new"), ("chunk", "chunk"), ("chunk", "old"), ("chunk", "scan")]


@pytest.mark.parametrize("fwd,bwd", FWD_VARIANTS, ids=[f"fwd-{f}-bwd-{b}" for f, b in FWD_VARIANTS])
@pytest.mark.parametrize("B,T,H,dtype,w_f32,has_s0,has_dsT", CASES)
def test_emulated_chunk_forward_matches_reference(emu_exe, tmp_path, B, T, H, dtype, w_f32, has_s0, has_dsT, fwd, bwd):
    _check_against_reference(emu_exe, tmp_path, (B, T, H, dtype, w_f32, has_s0, has_dsT), bwd, 1, fwd)


def test_emulated_scans_run_and_fall_back_without_tensor_cores(emu_exes, tmp_path):
    """KAGGLETRAIN_WKV_FWD=chunk and KAGGLETRAIN_WKV_BWD=scan really select other kernels where they are built
    (their outputs differ from the sequential ones' in the last bits), and resolve to the sequential forward and
    the chunk backward in a build without tensor cores (WKV7_CHUNK_TC=0, as on the T4): bitwise those there."""
    blob = _case_inputs(*CASES[0][:3], 64, *CASES[0][3:])[-1]
    tc, simt = emu_exes["emu_wkv7"], emu_exes["emu_wkv7_simt"]
    assert _run_emu(tc, tmp_path, blob, "new", 1, "chunk") != _run_emu(tc, tmp_path, blob, "new", 1, "seq")
    assert _run_emu(simt, tmp_path, blob, "new", 1, "chunk") == _run_emu(simt, tmp_path, blob, "new", 1, "seq")
    assert _run_emu(tc, tmp_path, blob, "scan", 1) != _run_emu(tc, tmp_path, blob, "chunk", 1)
    assert _run_emu(simt, tmp_path, blob, "scan", 1) == _run_emu(simt, tmp_path, blob, "chunk", 1)


def _check_against_reference(exe, tmp_path, case, variant, split, fwd="seq"):
    B, T, H, dtype, w_f32, has_s0, has_dsT = case
    N = 64
    ins, s0, dy, dsT, blob = _case_inputs(B, T, H, N, dtype, w_f32, has_s0, has_dsT)
    out = _run_emu(exe, tmp_path, blob, variant, split, fwd)
    shape, sshape = (B, T, H, N), (B, H, N, N)
    off = 0
    y, off = _take(out, off, shape, dtype)
    sT, off = _take(out, off, sshape, torch.float32)
    grads = {}
    for name in "rwkvab":
        grads[name], off = _take(out, off, shape, torch.float32 if (name == "w" and w_f32) else dtype)
    ds0, off = _take(out, off, sshape, torch.float32)
    assert off == len(out)

    X = [t.double().requires_grad_() for t in ins]
    S0 = s0.double().requires_grad_() if has_s0 else None
    y_ref, sT_ref = wkv_sequential(*X, S0)
    loss = (y_ref * dy.double()).sum()
    if has_dsT:
        loss = loss + (sT_ref * dsT.double()).sum()
    loss.backward()

    tol = 1e-5 if dtype == torch.float32 else 3e-3
    got = {"y": (y, y_ref), "state": (sT, sT_ref)}
    got.update({f"d{n}": (grads[n], x.grad) for n, x in zip("rwkvab", X)})
    if has_s0:
        got["ds0"] = (ds0, S0.grad)
    for name, (have, want) in got.items():
        assert torch.isfinite(have.float()).all(), f"{name}: unwritten (NaN-poisoned) or non-finite elements"
        err = ((have.double() - want).norm() / want.norm()).item()
        assert err <= tol, f"{name}: relative L2 error {err:.2e} > {tol:.0e}"


def test_emulated_fused_backward_equals_chunk_bitwise(emu_exe, tmp_path):
    """The fused launch runs the chunk backward's arithmetic unchanged: every output is bitwise the same. (In
    the emulator each chunk block also checks that the row recursion set its flag.)"""
    for case in (CASES[0], CASES[6], CASES[8]):
        blob = _case_inputs(*case[:3], 64, *case[3:])[-1]
        assert _run_emu(emu_exe, tmp_path, blob, "fused", 1) == _run_emu(emu_exe, tmp_path, blob, "chunk", 1), case


@pytest.mark.parametrize("variant", ["chunk", "chunk-simt", "fwd-chunk", "fwd-chunk-scan"])
def test_emulated_chunk_backward_long_sequence(emu_exes, tmp_path, variant):
    """1,024 tokens (64 chunks) in float32 through both bodies of the chunk backward, the chunk forward with it,
    and both scans: the per-chunk decay-gradient recursion, the exponential factors and states carried through
    64 chunk updates keep the float32 accuracy of the short cases (measured 2.3e-7 to 6.1e-7 here; at 4,096
    tokens the same)."""
    ins, s0, dy, dsT, blob = _case_inputs(1, 1024, 1, 64, torch.float32, False, True, True)
    exe = emu_exes["emu_wkv7_simt" if variant == "chunk-simt" else "emu_wkv7"]
    out = _run_emu(exe, tmp_path, blob, "scan" if variant.endswith("scan") else "chunk", 1,
                   "chunk" if variant.startswith("fwd-chunk") else "seq")
    shape = (1, 1024, 1, 64)
    X = [t.double().requires_grad_() for t in ins]
    S0 = s0.double().requires_grad_()
    y_ref, sT_ref = wkv_sequential(*X, S0)
    ((y_ref * dy.double()).sum() + (sT_ref * dsT.double()).sum()).backward()
    y, off = _take(out, 0, shape, torch.float32)
    sT, off = _take(out, off, (1, 1, 64, 64), torch.float32)
    for name, got, want in (("y", y, y_ref), ("state", sT, sT_ref)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= 1e-5, f"{name}: relative L2 error {err:.2e}"
    for name, x in zip("rwkvab", X):
        got, off = _take(out, off, shape, torch.float32)
        err = ((got.double() - x.grad).norm() / x.grad.norm()).item()
        assert err <= 1e-5, f"d{name}: relative L2 error {err:.2e}"
    ds0, off = _take(out, off, (1, 1, 64, 64), torch.float32)
    err = ((ds0.double() - S0.grad).norm() / S0.grad.norm()).item()
    assert err <= 1e-5, f"ds0: relative L2 error {err:.2e}"


@pytest.mark.parametrize("B,T,H,dtype,w_f32,has_s0,has_dsT", [CASES[0], CASES[5], CASES[6]])
def test_emulated_splits_bitwise_equal(emu_exe, tmp_path, B, T, H, dtype, w_f32, has_s0, has_dsT):
    """Each block of a split runs the same per-row arithmetic: y, the state and every gradient are bitwise
    the same for 1, 2 and 4 blocks per head (and "auto", which is 4 for these few heads)."""
    blob = _case_inputs(B, T, H, 64, dtype, w_f32, has_s0, has_dsT)[-1]
    outs = {split: _run_emu(emu_exe, tmp_path, blob, "new", split) for split in ("1", "2", "4", "auto")}
    assert all(out == outs["1"] for out in outs.values()), {s: out == outs["1"] for s, out in outs.items()}


ALIGN_PROBE = r"""
#include "cuda_emu.h"
#include "wkv7_api.h"
#include "wkv7_kernels.cuh"
#include <cstdlib>
namespace wm = nvcuda::wmma;
alignas(32) static float buf[64 * 68 + 8];
int main(int argc, char** argv) {
  const int off = std::atoi(argv[2]);  // in floats
  float* p = buf + off;
  if (argv[1][0] == 'v') { wkv7::detail::sts4(p, make_float4(1, 2, 3, 4)); return wkv7::detail::lds4(p).w == 4 ? 0 : 3; }
  wm::fragment<wm::accumulator, 16, 16, 8, float> f;
  wm::fill_fragment(f, 1.f);
  wm::store_matrix_sync(p, f, std::atoi(argv[3]), wm::mem_row_major);
  return 0;
}
"""


def test_emulator_faults_on_misaligned_vector_and_tile_accesses(tmp_path):
    """The GPU faults on a float4 access off a 16-byte boundary and on a wmma tile off a 32-byte one (or with a
    leading dimension that is not a multiple of 4 floats); x86 does not, so the emulator checks every such
    access and aborts, naming it. Aligned accesses pass."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler")
    src, exe = tmp_path / "probe.cpp", tmp_path / "probe"
    src.write_text(ALIGN_PROBE)
    subprocess.run([gxx, "-std=c++17", "-O1", "-DWKV7_EMU", "-Wno-unknown-pragmas", "-I", str(SRC), str(src), "-o",
                    str(exe)], check=True, capture_output=True, timeout=300)

    def probe(*args):
        return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=60)

    assert probe("v", 4).returncode == 0 and probe("t", 8, 68).returncode == 0
    for args, what in ((("v", 2), "misaligned vector access"), (("t", 4, 68), "misaligned wmma tile"),
                       (("t", 8, 66), "ldm 66 is not a multiple of 4")):
        r = probe(*args)
        assert r.returncode != 0 and what in r.stderr, (args, r.returncode, r.stderr)


def test_emulator_keeps_sources_in_package():
    """The loader builds from these files; they must ship with the package (pyproject package-data)."""
    for name in ("wkv7.cu", "wkv7_torch.cpp", "wkv7_api.h", "wkv7_kernels.cuh", "wkv7_chunk.cuh",
                 "wkv7_scan.cuh", "cuda_emu.h", "emu_main.cpp"):
        assert (SRC / name).is_file(), name
    assert os.path.basename(rwkv_cuda.loader.SRC_DIR) == "rwkv_cuda"


def test_extra_flags_get_their_own_cached_build(monkeypatch):
    """KAGGLETRAIN_CUDA_EXTRA_FLAGS (tuning sweeps) changes the build-cache key, so variants never share a build."""
    from rwkv_cuda.loader import build_key

    monkeypatch.delenv("KAGGLETRAIN_CUDA_EXTRA_FLAGS", raising=False)
    base = build_key((9, 0))
    monkeypatch.setenv("KAGGLETRAIN_CUDA_EXTRA_FLAGS", "-DWKV7_COLS_MINB=4")
    variant = build_key((9, 0))
    monkeypatch.setenv("KAGGLETRAIN_CUDA_EXTRA_FLAGS", "-DWKV7_COLS_MINB=2")
    assert len({base, variant, build_key((9, 0))}) == 3
    monkeypatch.delenv("KAGGLETRAIN_CUDA_EXTRA_FLAGS")
    assert build_key((9, 0)) == base


def test_build_key_covers_every_kernel_source():
    """The loader's cache key hashes SOURCES + HEADERS: every file the build compiles or includes must be in it,
    or an edited header would reuse a stale build (the emulator's own files are not part of a GPU build). The
    emulated torch module's key (rwkv_cuda/emulated.py) hashes those and the emulator's files."""
    from rwkv_cuda.emulated import EMU_SOURCES
    from rwkv_cuda.loader import HEADERS, SOURCES

    on_disk = {p.name for p in SRC.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")}
    assert on_disk - {"cuda_emu.h", "emu_main.cpp", "wkv7_emu_torch.cpp"} == set(SOURCES) | set(HEADERS)
    assert set(EMU_SOURCES) == {"cuda_emu.h", "wkv7_emu_torch.cpp"}
