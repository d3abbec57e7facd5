"""Build (once) and call the CPU WKV-7 decode-step kernel (`wkv7_step_cpu.cpp`), or say why not.

The kernel is plain C++ with AVX2/FMA intrinsics and an `extern "C"` interface, so it needs no torch
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
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).resolve().with_name("wkv7_step_cpu.cpp")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
ABI = 1

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "error": None, "log": None}


class CpuKernelError(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


def cache_root() -> Path:
    env = os.environ.get("KAGGLETRAIN_CPU_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kaggletrain" / "cpu_kernels"


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
    lib_path, log_path = build_dir / "wkv7_step_cpu.so", build_dir / "build.log"
    _state["log"] = log_path
    from rwkv_cuda.loader import file_lock

    with file_lock(build_dir / "build.lock"):
        if not lib_path.exists():
            tmp = build_dir / f"wkv7_step_cpu.{os.getpid()}.tmp.so"
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
    if lib.kt_wkv7_step_abi() != ABI:
        raise CpuKernelError(f"{lib_path} reports interface {lib.kt_wkv7_step_abi()}, expected {ABI}")
    fn = lib.kt_wkv7_step
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 2
    fn.restype = None
    return lib


def step_kernel(warn: bool = True) -> Optional[ctypes.CDLL]:
    """The loaded library, building it on first call; None when disabled or unavailable (one warning)."""
    if os.environ.get("KAGGLETRAIN_DISABLE_CPU_KERNEL", "") not in ("", "0"):
        return None
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _state["lib"] = _build()
            except Exception as e:  # noqa: BLE001 - any failure means "use the PyTorch ops"
                _state["error"] = str(e) or type(e).__name__
                if warn:
                    where = f" Build log: {_state['log']}" if _state["log"] else ""
                    warnings.warn(f"kaggletrain: the CPU WKV decode kernel is unavailable ({_state['error']}); "
                                  f"decoding uses PyTorch ops instead.{where}", RuntimeWarning, stacklevel=3)
        return _state["lib"]


def supports(S: torch.Tensor) -> bool:
    """Whether the kernel can take this [BH, N, N] state (float32 on a CPU, N a multiple of 8)."""
    return S.device.type == "cpu" and S.dtype == torch.float32 and S.shape[-1] % 8 == 0


def wkv7_step(S: torch.Tensor, d: torch.Tensor, kk: torch.Tensor, b: torch.Tensor, k: torch.Tensor,
              r: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor] = None,
              lib: Optional[ctypes.CDLL] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for every head: S [BH, N, N]; d, kk, b, k, r, v [BH, N] (float32).
    Returns (y [BH, N], S' [BH, N, N]) with S' = S diag(d) - (S kk) b^T + v k^T and y = S' r.
    `out` receives S' (it may be S itself). `lib`: the loaded kernel (default: `step_kernel()`)."""
    lib = lib or step_kernel()
    if lib is None:
        raise CpuKernelError(f"the CPU WKV decode kernel is unavailable: {_state['error']}")
    BH, N, _ = S.shape
    if not supports(S) or S.shape != (BH, N, N):
        raise ValueError(f"state must be float32 [BH, N, N] on CPU with N % 8 == 0, got {S.dtype} "
                         f"{tuple(S.shape)} on {S.device}")
    vecs = [t.contiguous() for t in (d, kk, b, k, r, v)]
    for name, t in zip("d kk b k r v".split(), vecs):
        if t.shape != (BH, N) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be float32 [{BH}, {N}] on CPU, got {t.dtype} {tuple(t.shape)}")
    S = S.contiguous()
    out = torch.empty_like(S) if out is None else out
    if out.shape != S.shape or not out.is_contiguous() or out.dtype != torch.float32:
        raise ValueError("out must be a contiguous float32 tensor shaped like the state")
    y = torch.empty(BH, N)
    lib.kt_wkv7_step(S.data_ptr(), out.data_ptr(), *(t.data_ptr() for t in vecs), y.data_ptr(), BH, N)
    return y, out


def build_info() -> dict:
    """What happened on this process's build attempt (for `kaggletrain doctor`)."""
    return {"tried": _state["tried"], "loaded": _state["lib"] is not None, "error": _state["error"],
            "log": str(_state["log"]) if _state["log"] else None}
