"""`kaggletrain doctor`: what this machine offers (GPU, bf16, CUDA toolchain, the WKV CUDA kernel, the CPU
decode kernels)."""

from __future__ import annotations

import json

import typer

from kaggletrain.cli import app


def _tool(name: str, version_args: list[str]) -> tuple[str | None, str]:
    """(path, last line of its version output) or (None, reason)."""
    import shutil
    import subprocess

    path = shutil.which(name)
    if name == "nvcc":
        from pathlib import Path

        from torch.utils.cpp_extension import CUDA_HOME

        from rwkv_cuda.loader import BuildError, nvcc_in

        # The kernel build runs CUDA_HOME's nvcc (torch's choice: $CUDA_HOME, else PATH's nvcc, else
        # /usr/local/cuda; None in a CPU-only torch), which need not be the first one on PATH.
        if CUDA_HOME:
            try:
                path = str(nvcc_in(CUDA_HOME))
            except BuildError as e:
                return None, str(e)
        elif path is None and Path("/usr/local/cuda/bin/nvcc").exists():
            path = "/usr/local/cuda/bin/nvcc"
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
            from rwkv_cuda import load_extension
            from rwkv_cuda.selfcheck import self_check

            ext = load_extension()
            kernel["backward"] = ext.bwd_variant()  # KAGGLETRAIN_WKV_BWD=old|new|chunk|fused|scan, else new
            kernel["forward"] = ext.fwd_variant()  # KAGGLETRAIN_WKV_FWD=seq|chunk, else seq
            checks = self_check()
            kernel["self_check"] = {k: {"max_rel_err": err, "passed": passed} for k, (err, passed) in checks.items()}
            kernel["status"] = "ok" if all(p for _, p in checks.values()) else "SELF-CHECK FAILED"
    info["wkv_kernel"] = kernel
    info["cpu_decode_kernel"] = _cpu_decode_kernel(build)
    return info


def _cpu_decode_kernel(build: bool) -> dict:
    """Build (or load) the CPU decode kernels; check one WKV step and one product against float64."""
    if not build:
        return {"status": "not tried"}
    import time

    import torch

    from kaggletrain.infer import cpu_kernel

    t0 = time.perf_counter()
    lib = cpu_kernel.step_kernel(warn=False)
    info = cpu_kernel.build_info()
    out = {"status": "built" if lib else "unavailable", "seconds": round(time.perf_counter() - t0, 1),
           "error": info["error"], "log": info["log"]}
    if lib is not None:
        from kaggletrain.ops.decay import decay_log
        from kaggletrain.ops.wkv_reference import wkv_sequential

        # One step of 2 x 2 heads of 64 against the float64 sequential recurrence, then one product.
        g = torch.Generator().manual_seed(0)
        r, k, v = (torch.randn(2, 1, 2, 64, generator=g) for _ in range(3))
        w = torch.rand(2, 1, 2, 64, generator=g) * 22 - 12  # decay logits over the useful range
        kk = torch.nn.functional.normalize(torch.randn(2, 1, 2, 64, generator=g), dim=-1)
        b, S = kk * torch.rand(2, 1, 2, 64, generator=g), torch.randn(2, 2, 64, 64, generator=g)
        ref_y, ref_S = wkv_sequential(*(t.double() for t in (r, w, k, v, -kk, b)), state=S.double())
        flat = lambda t: t.reshape(4, 64)  # noqa: E731
        y, S1 = cpu_kernel.wkv7_step(S.reshape(4, 64, 64), flat(torch.exp(decay_log(w))), flat(kk), flat(b),
                                     flat(k), flat(r), flat(v), lib=lib)
        x, wt, bias = torch.randn(11, 72, generator=g), torch.randn(37, 72, generator=g), torch.randn(37, generator=g)
        ref_lin = x.double() @ wt.double().t() + bias.double()
        lin = cpu_kernel.linear(x, wt, bias=bias, lib=lib)
        rel = lambda have, want: ((have.double() - want).norm() / want.norm()).item()  # noqa: E731
        err = max(rel(S1, ref_S.reshape(4, 64, 64)), rel(y, ref_y.reshape(4, 64)), rel(lin, ref_lin))
        out["self_check"] = {"max_rel_err": err, "passed": err < 1e-5}
        out["status"] = "ok" if err < 1e-5 else "SELF-CHECK FAILED"
    return out


@app.command("doctor")
def doctor(
    build: bool = typer.Option(True, "--build/--no-build",
                               help="Build (or load) the CUDA WKV kernel and the CPU decode kernels; self-check them."),
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
    if k.get("forward"):
        line += f"\nforward: {k['forward']} (KAGGLETRAIN_WKV_FWD)"
    if k.get("backward"):
        line += f"\nbackward: {k['backward']} (KAGGLETRAIN_WKV_BWD)"
    for dt, c in k.get("self_check", {}).items():
        line += f"\n{dt}: max rel err {c['max_rel_err']:.1e} {'ok' if c['passed'] else 'FAIL'}"
    table.add_row("WKV CUDA kernel", line)
    c = info["cpu_decode_kernel"]
    line = c["status"] + (f" ({c['seconds']} s)" if "seconds" in c else "")
    if c.get("error"):
        line += f": {c['error']}\nlog: {c['log']}"
    if "self_check" in c:
        line += f"\nfloat32 vs float64: max rel err {c['self_check']['max_rel_err']:.1e}"
    table.add_row("CPU decode kernels", line)
    Console().print(table)
