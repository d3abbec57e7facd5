"""Build (once) and call the CPU decode kernels (`decode_cpu.cpp`: the WKV-7 step and the small-batch
linear product), or say why not.

The kernels are plain C++ with AVX2/FMA intrinsics and an `extern "C"` interface, so it needs no torch
headers: the system C++ compiler builds it in about a second into a cache directory keyed by a hash of
the source, the compiler's version and the flags, and `ctypes` loads it. It is compiled with -fopenmp and
resolves its OpenMP symbols to the libgomp that torch has already loaded (same soname), so it shares
torch's thread pool and `torch.set_num_threads`. A file lock keeps two processes from building at once;
the compiler's output goes to `build.log` there. Any failure (not x86-64 with AVX2, no compiler, a
compile error) means `step_kernel()` returns None after ONE warning naming the log, and the decode step
uses its PyTorch ops.

Environment:
  KAGGLETRAIN_CPU_KERNEL_CACHE     cache root (default: $XDG_CACHE_HOME or ~/.cache, + kaggletrain/cpu_kernels)
  KAGGLETRAIN_DISABLE_CPU_KERNEL   set to 1 to never use the kernel
  CXX                              the C++ compiler (default: the first of c++, g++, clang++ on PATH)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from rwkv_cuda import loader
from rwkv_cuda.loader import build_once, file_lock

SOURCE = Path(__file__).resolve().with_name("decode_cpu.cpp")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
ABI = 2

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "error": None, "log": None, "warned": False}


class CpuKernelError(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


def cache_root() -> Path:
    return loader.cache_root("KAGGLETRAIN_CPU_KERNEL_CACHE", "cpu_kernels")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        raise CpuKernelError("no C++ compiler found (set CXX or install g++)")
    return cxx


def _build() -> ctypes.CDLL:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise CpuKernelError(f"the kernel is x86-64 AVX2 code; this machine is {platform.machine()}")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise CpuKernelError(f"this CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})")
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CpuKernelError(f"the C++ compiler {cxx!r} does not run: {e}") from None
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update("\0".join([cxx, version, *FLAGS, platform.machine()]).encode())
    build_dir = cache_root() / h.hexdigest()[:16]
    build_dir.mkdir(parents=True, exist_ok=True)
    lib_path, log_path = build_dir / "decode_cpu.so", build_dir / "build.log"
    _state["log"] = log_path
    with file_lock(build_dir / "build.lock"):
        if not lib_path.exists():
            tmp = build_dir / f"decode_cpu.{os.getpid()}.tmp.so"
            cmd = [cxx, *FLAGS, str(SOURCE), "-o", str(tmp)]
            t0 = time.perf_counter()
            with open(log_path, "a") as log:
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n{' '.join(cmd)}\n")
                log.flush()
                try:
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=600).returncode
                except (OSError, subprocess.SubprocessError) as e:
                    log.write(f"BUILD FAILED: {e}\n")
                    raise CpuKernelError(f"running {cxx!r} failed: {e}") from None
                if rc != 0:
                    log.write(f"BUILD FAILED: exit status {rc}\n")
                    tmp.unlink(missing_ok=True)
                    raise CpuKernelError(f"{cxx} exited with status {rc}")
                log.write(f"built in {time.perf_counter() - t0:.1f} s\n")
            os.replace(tmp, lib_path)  # atomic: other processes see no library or a whole one
    lib = ctypes.CDLL(str(lib_path))
    if lib.kt_decode_abi() != ABI:
        raise CpuKernelError(f"{lib_path} reports interface {lib.kt_decode_abi()}, expected {ABI}")
    lib.kt_wkv7_step.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 2
    lib.kt_wkv7_step.restype = None
    lib.kt_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    lib.kt_linear.restype = None
    return lib


def _disabled() -> bool:
    return os.environ.get("KAGGLETRAIN_DISABLE_CPU_KERNEL", "") not in ("", "0")


def _require(lib: Optional[ctypes.CDLL]) -> ctypes.CDLL:
    """`lib`, else the loaded library, else a CpuKernelError that says why there is none."""
    lib = lib or step_kernel()
    if lib is None:
        why = "KAGGLETRAIN_DISABLE_CPU_KERNEL is set" if _disabled() else _state["error"]
        raise CpuKernelError(f"the CPU decode kernels are unavailable: {why}")
    return lib


def step_kernel(warn: bool = True) -> Optional[ctypes.CDLL]:
    """The loaded library, building it on first call; None when disabled or unavailable (then one warning
    per process, on the first call with warn=True)."""
    if _disabled():
        return None
    with _lock:
        return build_once(_state, "lib", _build, warn, "kaggletrain: the CPU decode kernels are unavailable "
                          "({error}); decoding uses PyTorch ops instead.")


def supports(S: torch.Tensor) -> bool:
    """Whether the kernel can take this [BH, N, N] state (float32 on a CPU, N a multiple of 8)."""
    return S.device.type == "cpu" and S.dtype == torch.float32 and S.shape[-1] % 8 == 0


def wkv7_step(S: torch.Tensor, d: torch.Tensor, kk: torch.Tensor, b: torch.Tensor, k: torch.Tensor,
              r: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor] = None,
              lib: Optional[ctypes.CDLL] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for every head: S [BH, N, N]; d, kk, b, k, r, v [BH, N] (float32).
    Returns (y [BH, N], S' [BH, N, N]) with S' = S diag(d) - (S kk) b^T + v k^T and y = S' r.
    `out` receives S' (it may be S itself). `lib`: the loaded kernel (default: `step_kernel()`)."""
    lib = _require(lib)
    BH, N, _ = S.shape
    if not supports(S) or S.shape != (BH, N, N):
        raise ValueError(f"state must be float32 [BH, N, N] on CPU with N % 8 == 0, got {S.dtype} "
                         f"{tuple(S.shape)} on {S.device}")
    vecs = [t.contiguous() for t in (d, kk, b, k, r, v)]
    for name, t in zip("d kk b k r v".split(), vecs):
        if t.shape != (BH, N) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be float32 [{BH}, {N}] on CPU, got {t.dtype} {tuple(t.shape)}")
    S = S.contiguous()
    if out is not None and (out.shape != S.shape or not out.is_contiguous() or out.dtype != torch.float32):
        raise ValueError("out must be a contiguous float32 tensor shaped like the state")
    return wkv7_step_unchecked(lib, S, *vecs, out=out)


def wkv7_step_unchecked(lib: ctypes.CDLL, S: torch.Tensor, d, kk, b, k, r, v,
                        out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`wkv7_step` without its checks, for the decode step's hot loop: every tensor must already be a
    contiguous float32 CPU tensor of the right shape (the kernel reads raw pointers)."""
    BH, N, _ = S.shape
    out = torch.empty_like(S) if out is None else out
    y = torch.empty(BH, N)
    lib.kt_wkv7_step(S.data_ptr(), out.data_ptr(), d.data_ptr(), kk.data_ptr(), b.data_ptr(), k.data_ptr(),
                     r.data_ptr(), v.data_ptr(), y.data_ptr(), BH, N)
    return y, out


def linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
           add: Optional[torch.Tensor] = None, lib: Optional[ctypes.CDLL] = None) -> torch.Tensor:
    """x [B, I] @ w [O, I]^T (+ bias [O]) (+ add [B, O]) -> [B, O], float32 on CPU, contiguous operands."""
    lib = _require(lib)
    B, I = x.shape
    O = w.shape[0]
    for name, t, shape in (("x", x, (B, I)), ("w", w, (O, I)), ("bias", bias, (O,)), ("add", add, (B, O))):
        if t is not None and (t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu"
                              or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor of shape {shape}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}" + ("" if t.is_contiguous() else " (strided)"))
    return linear_unchecked(lib, x, w, bias, add)


def linear_unchecked(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`linear` without its checks, for the decode step's hot loop: operands must already be contiguous
    float32 CPU tensors of matching shapes (the kernel reads raw pointers)."""
    B, I = x.shape
    O = w.shape[0]
    y = torch.empty(B, O)
    lib.kt_linear(w.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
                  None if add is None else add.data_ptr(), y.data_ptr(), O, I, B)
    return y


def build_info() -> dict:
    """What happened on this process's build attempt (for `kaggletrain doctor`)."""
    return {"tried": _state["tried"], "loaded": _state["lib"] is not None, "error": _state["error"],
            "log": str(_state["log"]) if _state["log"] else None}
