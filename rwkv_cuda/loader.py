"""Build (once) and load the WKV-7 CUDA extension, or explain why not.

The extension is compiled on first use with `torch.utils.cpp_extension.load` (ninja), for the current
GPU's architecture only, into a cache directory keyed by a hash of the sources, the architecture, the
torch/CUDA versions and the flags, so later processes and runs load it in about a second. A finished build
(marked by `built.ok`) is imported directly: no nvcc, no ninja, no lock and nothing written, so a cache copied
from another machine with the same GPU and versions also works from a read-only folder (a Kaggle dataset). A
file lock keeps two processes from building at once; the compiler's output goes to `build.log` in that
directory. Any
failure (no GPU, no nvcc, no ninja, a compile error...) is caught: `kernel_available` then returns False
after ONE warning naming the log, and the caller uses the PyTorch chunked WKV.

Environment:
  KAGGLETRAIN_CUDA_CACHE          cache root (default: $XDG_CACHE_HOME or ~/.cache, + kaggletrain/rwkv_cuda)
  KAGGLETRAIN_DISABLE_CUDA_KERNEL  set to 1 to never use the kernel
  KAGGLETRAIN_WKV_FWD / _BWD      seq|chunk / new|chunk|fused|scan|old: which forward / backward runs (read per call)
  KAGGLETRAIN_WKV_EMULATE         set to 1 to run the kernels' sources on CPU tensors (emulated.py; tests only)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import threading
import time
import warnings
from pathlib import Path

SRC_DIR = Path(__file__).resolve().parent
SOURCES = ("wkv7.cu", "wkv7_torch.cpp")
HEADERS = ("wkv7_api.h", "wkv7_kernels.cuh", "wkv7_chunk.cuh", "wkv7_scan.cuh")
HEAD_SIZES = (64,)
CUDA_FLAGS = ("-O3", "-Xptxas=-v", "-lineinfo")
CXX_FLAGS = ("-O3",)
LOCK_TIMEOUT_S = 1800  # another process may be mid-build (a couple of minutes on 2 cores)
BUILT_MARK = "built.ok"  # written once a build has loaded: the folder then holds a complete, working module


class BuildError(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None, "log": None, "seconds": None, "dir": None}
_warned_heads: set[int] = set()


def cache_root(env_var: str = "KAGGLETRAIN_CUDA_CACHE", folder: str = "rwkv_cuda") -> Path:
    """$env_var when set, else $XDG_CACHE_HOME (or ~/.cache) / kaggletrain / folder."""
    env = os.environ.get(env_var)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kaggletrain" / folder


def _arch() -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(torch.cuda.current_device())


def _flags(arch: tuple[int, int]) -> list[str]:
    # bf16 kernels exist only for sm_80+: on a T4 (sm_75) they are not compiled at all.
    # KAGGLETRAIN_CUDA_EXTRA_FLAGS (developers' tuning sweeps, e.g. "-DWKV7_COLS_MINB=4") is part of the
    # cache key like every other flag, so each variant gets its own build.
    extra = os.environ.get("KAGGLETRAIN_CUDA_EXTRA_FLAGS", "").split()
    return [*CUDA_FLAGS, f"-DWKV7_WITH_BF16={1 if arch[0] >= 8 else 0}", *extra]


def build_key(arch: tuple[int, int]) -> str:
    import torch

    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((SRC_DIR / name).read_bytes())
    meta = [f"sm_{arch[0]}{arch[1]}", torch.__version__, str(torch.version.cuda), sys.version.split()[0],
            *_flags(arch), *CXX_FLAGS]
    h.update("\0".join(meta).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: Path):
    """Cross-process lock: `filelock` when installed, else fcntl (POSIX)."""
    try:
        from filelock import FileLock
    except ImportError:
        import fcntl

        with open(path, "a+") as fh:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BuildError(f"timed out waiting for the build lock {path}") from None
                    time.sleep(0.5)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    with FileLock(str(path), timeout=LOCK_TIMEOUT_S):
        yield


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send everything written to fds 1 and 2 (ninja, nvcc, the host compiler) to the log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def nvcc_in(cuda_home: str | None) -> Path:
    """The nvcc the build will run: CUDA_HOME/bin/nvcc (torch's CUDA_HOME: $CUDA_HOME, else the folder of PATH's
    nvcc, else /usr/local/cuda). BuildError when there is none, so a stale CUDA_HOME is named as such."""
    if cuda_home is None:
        raise BuildError("no CUDA toolkit found (nvcc); install it or set CUDA_HOME")
    nvcc = Path(cuda_home) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    if not nvcc.is_file():
        raise BuildError(f"no nvcc at {nvcc}: CUDA_HOME={cuda_home} is not a CUDA toolkit's folder")
    return nvcc


def _check_toolchain() -> None:
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise BuildError("this torch build has no CUDA support")

    nvcc_in(cpp_extension.CUDA_HOME)
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise BuildError("ninja not found (pip install ninja)") from None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_finished(build_dir: Path, name: str):
    """The module of a finished build in `build_dir` (see BUILT_MARK), imported as torch's loader would import
    it but without ninja, the toolchain, the lock or any write; None when the folder holds no finished build.
    The mark records the library's SHA-256: a library changed since (truncated, say) is not imported -- a
    damaged ELF can crash the process inside dlopen, beyond any except -- and is unmarked and removed where the
    folder is writable, so that the caller's build links it again."""
    library, mark = build_dir / f"{name}.so", build_dir / BUILT_MARK
    if not (mark.is_file() and library.is_file()):
        return None
    try:
        recorded = mark.read_text().split()
        intact = len(recorded) == 2 and recorded[1] == _digest(library)
    except OSError:
        intact = False
    if intact:
        try:
            spec = importlib.util.spec_from_file_location(name, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except Exception:  # noqa: BLE001 - intact but not loadable here (e.g. a missing runtime library)
            pass
    with contextlib.suppress(OSError):
        mark.unlink()
        library.unlink()
    return None


def mark_finished(build_dir: Path, key: str, name: str) -> None:
    """Record that `build_dir` holds a complete module, with its library's digest (atomically: a reader sees the
    mark whole or not at all)."""
    tmp = build_dir / f"{BUILT_MARK}.{os.getpid()}.tmp"
    tmp.write_text(f"{key} {_digest(build_dir / f'{name}.so')}\n")
    os.replace(tmp, build_dir / BUILT_MARK)


def build_failed(log_path: Path, e: BaseException, what: str = "") -> BuildError:
    """Append the failure to the build log; the BuildError to raise: what failed and the error's last line."""
    with contextlib.suppress(OSError), open(log_path, "a") as log:
        log.write(f"\nBUILD FAILED: {type(e).__name__}: {e}\n")
    text = str(e).strip()
    last = text.splitlines()[-1] if text else ""
    return BuildError(f"{what}{type(e).__name__}{': ' + last if last else ''}")


def load_or_build(state: dict, build_dir: Path, key: str, name: str, compile_module, prepare=None, what: str = ""):
    """The module `name` of build_dir: a finished build imported directly (load_finished), else prepare(log path)
    (checks that note themselves in the log), then compile_module() under the folder's lock with its output in
    build.log, marked finished once it has loaded. Records the log, the folder and the seconds in `state`; a
    failure raises build_failed's BuildError (prefixed with `what`). Shared by the CUDA and emulated builds."""
    log_path = build_dir / "build.log"
    state["log"], state["dir"] = log_path, build_dir
    t0 = time.perf_counter()
    module = load_finished(build_dir, name)
    if module is not None:
        state["seconds"] = time.perf_counter() - t0
        return module
    build_dir.mkdir(parents=True, exist_ok=True)
    if prepare is not None:
        prepare(log_path)
    with file_lock(build_dir / "build.lock"):
        try:
            with _output_to(log_path):
                module = compile_module()
        except Exception as e:  # compile errors, no compiler or ninja, version mismatches, import errors
            raise build_failed(log_path, e, what) from e
        mark_finished(build_dir, key, name)
    state["seconds"] = time.perf_counter() - t0
    with open(log_path, "a") as log:
        log.write(f"loaded in {state['seconds']:.1f} s\n")
    return module


def _build() -> object:
    import torch
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        raise BuildError("no CUDA GPU visible to torch")
    arch = _arch()
    key = build_key(arch)
    name = f"kaggletrain_wkv7_{key}"

    def prepare(log_path: Path) -> None:
        with open(log_path, "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} torch {torch.__version__} CUDA {torch.version.cuda}"
                      f" sm_{arch[0]}{arch[1]} {torch.cuda.get_device_name()} pid {os.getpid()}\n")
            try:
                _check_toolchain()
            except BuildError as e:
                log.write(f"NOT BUILT: {e}\n")
                raise

    def compile_module():
        with _env(TORCH_CUDA_ARCH_LIST=f"{arch[0]}.{arch[1]}"):
            return cpp_extension.load(
                name=name,
                sources=[str(SRC_DIR / s) for s in SOURCES],
                extra_include_paths=[str(SRC_DIR)],
                extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=_flags(arch),
                build_directory=str(build_dir),
                with_cuda=True,
                verbose=True,
            )

    build_dir = cache_root() / key
    return load_or_build(_state, build_dir, key, name, compile_module, prepare)


def build_once(state: dict, key: str, build, warn: bool, unavailable: str):
    """state[key], running build() on the first call only (its error message goes to state["error"]).
    When there is nothing to return, warn once per process, at the first call with warn=True, with
    `unavailable` formatted with the error and the build log's path. Callers hold their own lock."""
    if not state["tried"]:
        state["tried"] = True
        try:
            state[key] = build()
        except Exception as e:  # noqa: BLE001 - any failure means "use the fallback"
            state["error"] = str(e) or type(e).__name__
    if state[key] is None and warn and not state.get("warned"):
        state["warned"] = True
        where = f" Build log: {state['log']}" if state["log"] else ""
        warnings.warn(unavailable.format(error=state["error"]) + where, RuntimeWarning, stacklevel=4)
    return state[key]


def load_extension(warn: bool = True):
    """The compiled module, building it on first call; None if it can't be built (one warning, once)."""
    with _lock:
        return build_once(_state, "module", _build, warn, "rwkv_cuda: the CUDA WKV-7 kernel is unavailable "
                          "({error}); using the PyTorch chunked WKV instead.")


def kernel_available(head_size: int) -> bool:
    """True when a CUDA GPU is present and the kernel for this head size is built (or builds now) and loads."""
    if os.environ.get("KAGGLETRAIN_DISABLE_CUDA_KERNEL", "") not in ("", "0"):
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    if int(head_size) not in HEAD_SIZES:
        if head_size not in _warned_heads:
            _warned_heads.add(head_size)
            warnings.warn(f"rwkv_cuda: head size {head_size} has no CUDA kernel (only {HEAD_SIZES}); "
                          "using the PyTorch chunked WKV.", RuntimeWarning, stacklevel=2)
        return False
    return load_extension() is not None


def build_info() -> dict:
    """What happened on this process's build attempt (for `kaggletrain doctor`)."""
    return {k: _state[k] for k in ("tried", "error", "log", "seconds", "dir")} | {"loaded": _state["module"] is not None}
