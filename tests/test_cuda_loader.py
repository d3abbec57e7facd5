"""The kernel loader's cache and failure paths (rwkv_cuda/loader.py, emulated.py), with real builds, files and
processes: a finished build loads without the toolchain and writes nothing (a read-only or copied cache), a
damaged one is not loaded, a failed build says why and logs it, and the CLI reports it in one line. The
emulated build (the kernels' sources compiled for the CPU) shares the cache code with the CUDA build."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="needs a C++ compiler")

# Run in a child: the emulated kernel against the float64 reference (fresh random inputs), then where it came from.
CHILD = r"""
import torch
from rwkv_cuda import emulated
from kaggletrain.ops.wkv import wkv
from kaggletrain.ops.wkv_reference import wkv_sequential
emulated.load_emulated()
g = torch.Generator().manual_seed(11)
r, k, v = (torch.randn(1, 19, 2, 64, generator=g) for _ in range(3))
w = torch.rand(1, 19, 2, 64, generator=g) * 22 - 12
kk = torch.nn.functional.normalize(torch.randn(1, 19, 2, 64, generator=g), dim=-1)
b = kk * torch.rand(1, 19, 2, 64, generator=g)
y, s = wkv(r, w, k, v, -kk, b, impl="cuda")
y64, s64 = wkv_sequential(*(t.double() for t in (r, w, k, v, -kk, b)))
err = ((y.double() - y64).norm() / y64.norm()).item()
print("ERR", err, "SECONDS", emulated._state["seconds"], "DIR", emulated._state["dir"])
"""


def _child_env(**extra) -> dict:
    env = {**os.environ, "KAGGLETRAIN_WKV_EMULATE": "1", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _snapshot(folder: Path) -> dict:
    """Every entry's size and modification time, and the folder's own (a created file changes it)."""
    out = {".": folder.stat().st_mtime_ns}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished_build():
    """The emulated module built (or found) in the default cache: its folder, marked finished."""
    from rwkv_cuda import emulated
    from rwkv_cuda.loader import BUILT_MARK

    emulated.load_emulated()
    folder = Path(emulated._state["dir"])
    assert (folder / BUILT_MARK).is_file(), sorted(p.name for p in folder.iterdir())
    return folder


def test_a_finished_build_loads_without_the_toolchain_and_writes_nothing(finished_build, tmp_path):
    """A child whose PATH has no ninja and no compiler loads the finished build and computes with it; nothing in
    the cache folder is created or modified (so the same works from a read-only copy, e.g. a Kaggle dataset)."""
    before = _snapshot(finished_build)
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                         env=_child_env(PATH=str(empty_path)), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    fields = res.stdout.split()
    err, folder = float(fields[fields.index("ERR") + 1]), fields[fields.index("DIR") + 1]
    assert Path(folder) == finished_build
    assert err < 1e-5, err
    assert _snapshot(finished_build) == before
    # Without a finished build, the same PATH cannot build: the toolchain really was not used above.
    assert shutil.which("ninja", path=str(empty_path)) is None


def test_a_damaged_build_is_not_loaded(finished_build, tmp_path):
    """A marked library that changed since it was marked (truncated: importing it would crash the process inside
    dlopen, a SIGBUS no except can catch) or that does not import: load_finished answers None, without importing
    the changed one, and removes the mark and the library, so that the next build links it again."""
    from rwkv_cuda.loader import BUILT_MARK, load_finished, mark_finished

    name = next(p.stem for p in finished_build.glob("*.so"))
    copy = tmp_path / "emu-copy"
    copy.mkdir()
    shutil.copy2(finished_build / f"{name}.so", copy / f"{name}.so")
    mark_finished(copy, "0123456789abcdef", name)
    assert (copy / BUILT_MARK).read_text().split()[0] == "0123456789abcdef"
    with open(copy / f"{name}.so", "r+b") as f:
        f.truncate(400_000)
    probe = ("import sys; from pathlib import Path; from rwkv_cuda.loader import load_finished; "
             "print(load_finished(Path(sys.argv[1]), sys.argv[2]))")
    res = subprocess.run([sys.executable, "-c", probe, str(copy), name], capture_output=True, text=True, timeout=120,
                         env=_child_env())
    assert res.returncode == 0 and res.stdout.strip() == "None", (res.returncode, res.stderr[-2000:])
    assert sorted(p.name for p in copy.iterdir()) == []

    junk = tmp_path / "emu-junk"
    junk.mkdir()
    (junk / "kaggletrain_wkv7_emu_x.so").write_bytes(b"\x7fELF" + os.urandom(60))
    assert load_finished(junk, "kaggletrain_wkv7_emu_x") is None  # not marked: not even tried
    assert (junk / "kaggletrain_wkv7_emu_x.so").exists()
    mark_finished(junk, "0123456789abcdef", "kaggletrain_wkv7_emu_x")  # marked as it is, but no library
    assert load_finished(junk, "kaggletrain_wkv7_emu_x") is None
    assert sorted(p.name for p in junk.iterdir()) == []


def test_a_failed_build_says_why_in_one_line_and_in_its_log(tmp_path):
    """No ninja on PATH and an empty cache: the emulated build fails. `kaggletrain train` on the emulated kernel
    stops with one line naming the cause and the log (no traceback, exit 2), and the log has the failure."""
    cache = tmp_path / "cache"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("c++", "g++", "gcc", "cc"):  # a compiler, but no ninja
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    res = subprocess.run([sys.executable, "-m", "kaggletrain", "train", str(REPO / "configs" / "tiny.yaml"),
                          f"out_dir={tmp_path / 'run'}", "train.max_steps=2", "train.seq_len=32", "train.batch_size=2",
                          "data.max_tokens=20000", f"data.cache_dir={tmp_path / 'tokens'}", "--no-progress"],
                         capture_output=True, text=True, timeout=300,
                         env=_child_env(PATH=str(bin_dir), KAGGLETRAIN_CUDA_CACHE=str(cache)), cwd=tmp_path)
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    logs = list(cache.glob("emu-*/build.log"))
    assert len(logs) == 1
    line = " ".join(res.stderr.split())  # rich may wrap the line
    assert "the emulated WKV-7 kernel did not build: RuntimeError: Ninja is required" in line, line
    assert str(logs[0]) in line.replace(" ", ""), line
    assert "BUILD FAILED: RuntimeError: Ninja is required" in logs[0].read_text()
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_a_cuda_toolkit_folder_without_nvcc_is_named(tmp_path):
    from rwkv_cuda.loader import BuildError, nvcc_in

    with pytest.raises(BuildError, match="no CUDA toolkit found"):
        nvcc_in(None)
    with pytest.raises(BuildError, match=rf"no nvcc at {tmp_path}/bin/nvcc: CUDA_HOME={tmp_path} is not"):
        nvcc_in(str(tmp_path))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    assert nvcc_in(str(tmp_path)) == tmp_path / "bin" / "nvcc"


def test_asking_for_the_cuda_kernel_on_a_cpu_warns_once(monkeypatch):
    """model.wkv_impl=cuda with the model on the CPU (no emulation): one warning, then the chunked WKV."""
    wkv_module = importlib.import_module("kaggletrain.ops.wkv")  # (kaggletrain.ops.wkv is also a function's name)
    monkeypatch.delenv("KAGGLETRAIN_WKV_EMULATE", raising=False)
    monkeypatch.setattr(wkv_module, "_warned_no_gpu", [])
    r = torch.randn(1, 8, 1, 64)
    with pytest.warns(RuntimeWarning, match=r"'cuda' \(model.wkv_impl\) needs a CUDA GPU.*chunked WKV"):
        assert wkv_module.resolve_impl("cuda", r) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wkv_module.resolve_impl("cuda", r) == "chunked"  # once per process
        assert wkv_module.resolve_impl("auto", r) == "chunked"  # 'auto' on a CPU is not a surprise: no warning
