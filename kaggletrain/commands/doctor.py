"""`kaggletrain doctor`: what this machine offers for training (GPU, bf16, CUDA toolchain, the WKV kernel)."""

from __future__ import annotations

import json

import typer

from kaggletrain.cli import app


def _tool(name: str, version_args: list[str]) -> tuple[str | None, str]:
    """(path, last line of its version output) or (None, reason)."""
    import shutil
    import subprocess

    path = shutil.which(name)
    if name == "nvcc" and path is None:
        from pathlib import Path

        from torch.utils.cpp_extension import CUDA_HOME  # also finds /usr/local/cuda without PATH

        if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            path = str(Path(CUDA_HOME) / "bin" / "nvcc")
    if path is None:
        return None, "not found"
    try:
        out = subprocess.run([path, *version_args], capture_output=True, text=True, timeout=30).stdout.strip()
        lines = out.splitlines() or ["?"]
        return path, next((ln for ln in lines if "release" in ln), lines[-1])  # nvcc: "..., release 13.0, V13.0.88"
    except (OSError, subprocess.SubprocessError) as e:
        return path, f"version query failed: {e}"


def collect(build: bool = True) -> dict:
    """The doctor's findings as a plain dict (also the --json output)."""
    import platform

    import torch

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        try:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no including_emulation
            bf16 = major >= 8
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = {
            "name": torch.cuda.get_device_name(idx),
            "count": torch.cuda.device_count(),
            "capability": f"{major}.{minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "native_bf16": bf16,
        }
    for name, args in (("nvcc", ["--version"]), ("ninja", ["--version"])):
        path, version = _tool(name, args)
        info[name] = {"path": path, "version": version}

    kernel: dict = {"status": "not tried"}
    if info["gpu"] is None:
        kernel = {"status": "no GPU: the PyTorch chunked WKV is used"}
    elif build:
        import time

        from rwkv_cuda import build_info, kernel_available

        t0 = time.perf_counter()
        ok = kernel_available(64)
        b = build_info()
        kernel = {"status": "built" if ok else "unavailable", "seconds": round(time.perf_counter() - t0, 1),
                  "error": b["error"], "log": str(b["log"]) if b["log"] else None}
        if ok:
            from rwkv_cuda.selfcheck import self_check

            checks = self_check()
            kernel["self_check"] = {k: {"max_rel_err": err, "passed": passed} for k, (err, passed) in checks.items()}
            kernel["status"] = "ok" if all(p for _, p in checks.values()) else "SELF-CHECK FAILED"
    info["wkv_kernel"] = kernel
    return info


@app.command("doctor")
def doctor(
    build: bool = typer.Option(True, "--build/--no-build", help="Build (or load) the CUDA WKV kernel and self-check it."),
    json_out: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
):
    """Report the GPU, compute capability, native bf16, nvcc/ninja, torch/CUDA versions and the WKV kernel."""
    info = collect(build)
    if json_out:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kaggletrain doctor", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_row("python / torch", f"{info['python']} / {info['torch']}")
    table.add_row("torch CUDA", info["torch_cuda"] or "none (CPU-only torch)")
    gpu = info["gpu"]
    if gpu is None:
        table.add_row("GPU", "no GPU")
    else:
        table.add_row("GPU", f"{gpu['name']} x{gpu['count']} ({gpu['memory_gib']} GiB)")
        table.add_row("compute capability", gpu["capability"])
        table.add_row("native bf16", "yes" if gpu["native_bf16"] else "no (use fp16 + loss scaling)")
    for name in ("nvcc", "ninja"):
        t = info[name]
        table.add_row(name, f"{t['path']}  {t['version']}" if t["path"] else "not found")
    k = info["wkv_kernel"]
    line = k["status"]
    if "seconds" in k:
        line += f" ({k['seconds']} s)"
    if k.get("error"):
        line += f": {k['error']}"
    if k.get("log"):
        line += f"\nlog: {k['log']}"
    for dt, c in k.get("self_check", {}).items():
        line += f"\n{dt}: max rel err {c['max_rel_err']:.1e} {'ok' if c['passed'] else 'FAIL'}"
    table.add_row("WKV CUDA kernel", line)
    Console().print(table)
