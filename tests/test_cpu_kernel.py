"""The CPU WKV-7 decode-step kernel (kaggletrain/infer/decode_cpu.cpp): token-by-token steps equal the
plain sequential recurrence in float64; the build is cached, locked, shares torch's OpenMP runtime, and
any failure falls back to PyTorch ops with one warning naming the build log."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from kaggletrain.infer import cpu_kernel
from kaggletrain.ops.decay import decay_log
from kaggletrain.ops.wkv_reference import wkv_sequential

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CAN_BUILD = platform.machine().lower() in ("x86_64", "amd64") and \
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and \
    any(shutil.which(c) for c in ("c++", "g++", "clang++"))
needs_build = pytest.mark.skipif(not CAN_BUILD, reason="needs an x86-64 AVX2 CPU and a C++ compiler")


@pytest.fixture(scope="module")
def lib():
    found = cpu_kernel.step_kernel(warn=False)
    if found is None:  # on a machine that can build it, a failed build is a bug, not a skip
        pytest.fail(f"the CPU kernel did not build: {cpu_kernel.build_info()}")
    return found


def _inputs(B, T, H, N, seed):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = torch.rand(B, T, H, N, generator=g) * 22 - 12  # decay logits over the whole useful range
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g)
    return r, w, k, v, kk, kk * gate, torch.randn(B, H, N, N, generator=g)


def _rel(have, want):
    return ((have.double() - want).norm() / want.norm()).item()


@needs_build
@pytest.mark.parametrize("B,T,H,N", [(1, 9, 1, 8), (2, 17, 3, 32), (3, 12, 2, 64), (1, 6, 2, 128)])
def test_steps_equal_the_sequential_recurrence_in_float64(lib, B, T, H, N):
    r, w, k, v, kk, b, S0 = _inputs(B, T, H, N, seed=B * 100 + N)
    y_ref, S_ref = wkv_sequential(*(t.double() for t in (r, w, k, v, -kk, b)), state=S0.double())
    S = S0.reshape(B * H, N, N)
    ys = []
    flat = lambda t: t.reshape(B * H, N)  # noqa: E731
    for t in range(T):
        d = torch.exp(decay_log(w[:, t]))  # float32 decay, as the decode step computes it
        y, S = cpu_kernel.wkv7_step(S, flat(d), flat(kk[:, t]), flat(b[:, t]), flat(k[:, t]), flat(r[:, t]),
                                    flat(v[:, t]), lib=lib)
        ys.append(y.reshape(B, H, N))
    assert _rel(torch.stack(ys, 1), y_ref) < 1e-5
    assert _rel(S.reshape(B, H, N, N), S_ref) < 1e-5


@needs_build
def test_in_place_equals_out_of_place_and_inputs_are_checked(lib):
    r, w, k, v, kk, b, S0 = _inputs(2, 1, 2, 64, seed=7)
    vecs = [t[:, 0].reshape(4, 64) for t in (torch.exp(decay_log(w)), kk, b, k, r, v)]
    S = S0.reshape(4, 64, 64)
    y1, S1 = cpu_kernel.wkv7_step(S, *vecs, lib=lib)
    S2 = S.clone()
    y2, out = cpu_kernel.wkv7_step(S2, *vecs, out=S2, lib=lib)
    assert out is S2 and torch.equal(S1, S2) and torch.equal(y1, y2)
    assert not torch.equal(S1, S)  # out-of-place left the input alone
    with pytest.raises(ValueError, match="N % 8"):
        cpu_kernel.wkv7_step(torch.zeros(4, 12, 12), *(t[:, :12] for t in vecs), lib=lib)
    with pytest.raises(ValueError, match="kk must be float32"):
        cpu_kernel.wkv7_step(S, vecs[0], vecs[1].double(), *vecs[2:], lib=lib)


@needs_build
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 7, 8, 11, 16])
@pytest.mark.parametrize("O,I", [(64, 48), (31, 40), (70, 13), (5, 8)])
def test_linear_equals_float64_for_every_batch_tile(lib, B, O, I):
    """Batch rows go through tiles of 8, 4, 2 and 1 and weight rows through blocks of 3 (8 rows),
    8 or 4 (fewer rows) with the rest one at a time; I not a multiple of 8 takes the scalar tail."""
    g = torch.Generator().manual_seed(B * 1000 + O * 10 + I)
    x, w = torch.randn(B, I, generator=g), torch.randn(O, I, generator=g)
    bias, add = torch.randn(O, generator=g), torch.randn(B, O, generator=g)
    ref = x.double() @ w.double().t()
    assert _rel(cpu_kernel.linear(x, w, lib=lib), ref) < 1e-6
    assert _rel(cpu_kernel.linear(x, w, bias=bias, add=add, lib=lib), ref + bias.double() + add.double()) < 1e-6


@needs_build
def test_linear_checks_its_operands(lib):
    x, w = torch.randn(2, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"w must be a contiguous float32 CPU tensor of shape \(4, 16\).*strided"):
        cpu_kernel.linear(x, w.t().contiguous().t(), lib=lib)
    with pytest.raises(ValueError, match="bias must be"):
        cpu_kernel.linear(x, w, bias=torch.zeros(5), lib=lib)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


@needs_build
def test_build_is_cached_across_processes_and_shares_torchs_openmp(tmp_path):
    code = """
        import torch
        from kaggletrain.infer.cpu_kernel import step_kernel, build_info
        assert step_kernel() is not None, build_info()
        gomp = {line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line or 'libiomp' in line}
        print(len(gomp), build_info()['log'])
    """
    first = _run(code, KAGGLETRAIN_CPU_KERNEL_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    second = _run(code, KAGGLETRAIN_CPU_KERNEL_CACHE=str(tmp_path))
    assert second.returncode == 0, second.stderr
    n_runtimes, log = first.stdout.split()
    assert n_runtimes == "1"  # the kernel's OpenMP calls go to the runtime torch loaded, not a second one
    assert open(log).read().count("built in") == 1  # the second process loaded the cached library
    assert len(list(tmp_path.glob("*/decode_cpu.so"))) == 1
    assert not list(tmp_path.glob("*/*.tmp.so"))


def test_a_broken_compiler_falls_back_with_one_warning(tmp_path):
    code = """
        import warnings, torch
        from kaggletrain import ModelConfig, RWKVModel
        from kaggletrain.infer import generate
        from kaggletrain.infer.cpu_kernel import build_info
        torch.manual_seed(0)
        model = RWKVModel(ModelConfig(hidden_size=64, num_layers=2, head_size=32, vocab_size=100))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = generate(model, [[1, 2, 3]], max_new_tokens=3, temperature=0)
            generate(model, [[4, 5]], max_new_tokens=3, temperature=0)
        mine = [str(w.message) for w in caught if "CPU decode kernels" in str(w.message)]
        print(len(mine), len(out.tokens[0]), build_info()["loaded"])
        from kaggletrain.infer.cpu_kernel import CpuKernelError, linear
        try:
            linear(torch.randn(2, 8), torch.randn(3, 8))
        except CpuKernelError as e:
            print(e)
        print(mine[0] if mine else "")
    """
    res = _run(code, KAGGLETRAIN_CPU_KERNEL_CACHE=str(tmp_path), CXX="false")
    assert res.returncode == 0, res.stderr
    counts, error, message = res.stdout.strip().split("\n", 2)
    assert counts.split() == ["1", "3", "False"]
    assert error.startswith("the CPU decode kernels are unavailable: ")
    if CAN_BUILD:  # elsewhere the reason is the machine, before any compiler runs
        assert "false exited with status 1" in message and "build.log" in message
        assert error.endswith("false exited with status 1")


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("KAGGLETRAIN_DISABLE_CPU_KERNEL", "1")
    assert cpu_kernel.step_kernel() is None
    with pytest.raises(cpu_kernel.CpuKernelError, match="unavailable: KAGGLETRAIN_DISABLE_CPU_KERNEL is set"):
        cpu_kernel.linear(torch.randn(2, 8), torch.randn(3, 8))


def test_doctor_reports_both_kernels(tmp_path):
    """`kaggletrain doctor --json` in a real subprocess: the CPU kernel is built and self-checked against
    float64 (or reported unavailable with its reason), and the CUDA kernel's status matches the machine."""
    import json

    def doctor(**env):
        res = subprocess.run([sys.executable, "-m", "kaggletrain", "doctor", "--json"], capture_output=True,
                             text=True, timeout=600, env={**os.environ, **env})
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    info = doctor(KAGGLETRAIN_CPU_KERNEL_CACHE=str(tmp_path / "a"))
    cpu = info["cpu_decode_kernel"]
    if CAN_BUILD:
        assert cpu["status"] == "ok" and cpu["self_check"]["max_rel_err"] < 1e-5, cpu
    if not torch.cuda.is_available():
        assert info["gpu"] is None and info["wkv_kernel"]["status"].startswith("no GPU")
    broken = doctor(KAGGLETRAIN_CPU_KERNEL_CACHE=str(tmp_path / "b"), CXX="false")["cpu_decode_kernel"]
    assert broken["status"] == "unavailable" and broken["error"]
