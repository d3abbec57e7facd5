"""The CUDA kernels' own sources run on the CPU (cuda_emu.h) behind the same torch binding: a developer's switch
for testing the CUDA path (the custom operators, autograd, torch.compile, the model's dispatch) on a machine
without a GPU. It is slow (each block's threads are fibers on one core) and meant for small shapes.

    KAGGLETRAIN_WKV_EMULATE=1   wkv_cuda / wkv(impl="auto"|"cuda") accept CPU tensors and run the emulated kernel

The module is built on first use with torch.utils.cpp_extension.load (host compiler only, ~1-2 minutes) into
the kernel cache, keyed like the CUDA build by the sources, torch and Python versions.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading

from rwkv_cuda.loader import HEADERS, SOURCES, SRC_DIR, BuildError, build_once, cache_root, load_or_build

ENV = "KAGGLETRAIN_WKV_EMULATE"
EMU_SOURCES = ("wkv7_emu_torch.cpp", "cuda_emu.h")
# -O1 as the emulator tests build it: the kernels run correctly at any level, and -O1 compiles quickly.
EMU_FLAGS = ("-std=c++17", "-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-DWKV7_EMU=1")

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None, "log": None, "seconds": None, "dir": None}


def enabled() -> bool:
    """Whether KAGGLETRAIN_WKV_EMULATE asks for the emulated kernel on CPU tensors."""
    return os.environ.get(ENV, "") not in ("", "0")


def _key() -> str:
    import torch

    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS, *EMU_SOURCES):
        h.update(name.encode())
        h.update((SRC_DIR / name).read_bytes())
    h.update("\0".join(["emu", torch.__version__, sys.version.split()[0], *EMU_FLAGS]).encode())
    return h.hexdigest()[:16]


def _build():
    from torch.utils import cpp_extension

    key = _key()
    build_dir = cache_root() / f"emu-{key}"
    name = f"kaggletrain_wkv7_emu_{key}"

    def compile_module():
        return cpp_extension.load(
            name=name,
            sources=[str(SRC_DIR / "wkv7_emu_torch.cpp")],
            extra_include_paths=[str(SRC_DIR)],
            extra_cflags=list(EMU_FLAGS),
            build_directory=str(build_dir),
            with_cuda=False,
            verbose=True,
        )

    try:
        return load_or_build(_state, build_dir, key, name, compile_module,
                             what="the emulated WKV-7 kernel did not build: ")
    except BuildError as e:  # (no fallback here: the message names the log itself)
        raise BuildError(f"{e}; see {_state['log']}") from e


def load_emulated():
    """The emulated module, built on first call; raises BuildError (naming the log) when it cannot be built."""
    with _lock:
        module = build_once(_state, "module", _build, False, "")
    if module is None:
        raise BuildError(_state["error"])
    return module
