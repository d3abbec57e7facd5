"""`kaggletrain bench`: the --quick smoke run through the CLI (JSON structure and sanity, not speed), and
the measurement helpers on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kaggletrain.bench.machine import peak_tflops
from kaggletrain.bench.memory import PeakMemory
from kaggletrain.bench.timing import stats

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"wkv", "train", "optim", "infer", "context"}


def _timings(row: dict) -> list[dict]:
    return [v for v in row.values() if isinstance(v, dict) and "median_s" in v]


def _measured(row: dict) -> bool:
    return not ({"skip", "error", "oom"} & row.keys())


@pytest.mark.slow
def test_bench_quick_through_the_cli(tmp_path):
    out = tmp_path / "out"
    # One torch thread: pytest -n 2 runs two workers on the CI's two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "kaggletrain", "bench", "--quick", "--device", "cpu",
                           "--threads", "1", "--out", str(out), "--json"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert doc == json.loads((out / "bench.json").read_text())
    assert doc["format"] == "kaggletrain-bench/1"
    assert "--quick" in doc["command"] and doc["settings"]["quick"] is True

    m = doc["machine"]
    for key in ("date", "cpu", "cpu_logical_cores", "torch", "cuda", "gpu", "python", "torch_threads"):
        assert key in m, key
    assert m["torch"] == torch.__version__ and m["gpu"] is None and m["torch_threads"] == 1
    assert m["date"][:4].isdigit() and m["cpu"]
    assert set(doc["method"]) >= {"timing", "memory"}

    assert set(doc["suites"]) == SUITES
    for name, suite in doc["suites"].items():
        rows = suite["rows"]
        assert rows and suite["title"] and isinstance(suite["summary"], dict), name
        assert not [r for r in rows if "error" in r], name
        measured = [r for r in rows if _measured(r)]
        assert measured, f"{name}: nothing measured"
        png = out / suite["chart"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        for r in measured:
            where = f"{name}: {r['label']}"
            assert r["peak_memory_bytes"] > 0, where
            timings = _timings(r)
            assert timings, where
            for t in timings:
                assert t["n"] == len(t["runs_s"]) >= 2, where
                assert all(x > 0 for x in t["runs_s"]), where
                assert 0 < t["min_s"] <= t["q1_s"] <= t["median_s"] <= t["q3_s"] <= t["max_s"], where
            rates = [v for k, v in r.items() if k.endswith("tokens_per_s")]
            assert rates and all(v > 0 for v in rates), where

    # What each suite is for is in its rows.
    wkv = doc["suites"]["wkv"]["rows"]
    assert {r["impl"] for r in wkv} >= {"sequential", "chunked"}
    assert all("skip" in r for r in wkv if r["impl"] == "cuda")  # no GPU here
    assert any(r.get("fwd_bwd_speedup") for r in wkv if r["impl"] == "chunked")
    optim = doc["suites"]["optim"]["rows"]
    assert optim[0]["label"] == "baseline (fp32)" and optim[0]["time_vs_baseline"] == 1.0
    assert {"ckpt", "precision", "chunking", "compression"} <= optim[0].keys()
    assert all(r["time_vs_baseline"] > 0 and r["memory_vs_baseline"] > 0 for r in optim)
    infer = doc["suites"]["infer"]["rows"]
    assert {r["batch"] for r in infer} == {1, 8}
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in infer)
    context = doc["suites"]["context"]["rows"]
    assert {r["mode"] for r in context} == {"unchunked", "chunked, full BPTT", "chunked, truncated BPTT"}
    assert len({r["T"] for r in context}) >= 2


def test_unknown_suite_is_a_user_error(capsys):
    from kaggletrain.cli import main

    assert main(["bench", "wkv", "nope"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err


def test_compile_without_a_gpu_is_a_user_error(capsys, tmp_path):
    from kaggletrain.cli import main

    assert main(["bench", "train", "--quick", "--device", "cpu", "--compile", "--out", str(tmp_path)]) == 2
    assert "--compile needs a CUDA device (got device 'cpu')" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran or was written


def test_stats_median_quartiles_and_spread():
    s = stats([0.4, 0.1, 0.3, 0.2])
    assert s["median_s"] == pytest.approx(0.25) and s["min_s"] == 0.1 and s["max_s"] == 0.4
    assert s["q1_s"] == pytest.approx(0.175) and s["q3_s"] == pytest.approx(0.325)
    assert s["runs_s"] == [0.4, 0.1, 0.3, 0.2] and s["n"] == 4
    one = stats([2.0])
    assert one["min_s"] == one["q1_s"] == one["median_s"] == one["q3_s"] == one["max_s"] == 2.0


def test_cpu_peak_memory_sees_an_allocation_and_its_size():
    size = 64 * 2**20
    with PeakMemory(torch.device("cpu")) as pm:
        x = torch.ones(size // 4)
        del x
    assert 0.9 * size <= pm.peak_bytes <= 1.6 * size
    # Freed memory went back to the OS: the next point does not inherit it as a hidden free pool.
    with PeakMemory(torch.device("cpu")) as pm2:
        y = torch.ones(size // 4)
        del y
    assert pm2.peak_bytes >= 0.9 * size


def test_peak_tflops_table():
    assert peak_tflops("Tesla T4", "fp16") == 65.0
    assert peak_tflops("Tesla T4", "bf16") is None  # no bf16 tensor cores
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("NVIDIA H200", "fp32") is None
    assert peak_tflops("Some Future GPU", "bf16") is None


def test_gpu_check_picks_the_fastest_backward_that_failed_no_test(tmp_path):
    """benchmarks/pick_wkv_bwd.py, run as gpu_check.sh runs it: the fastest bf16 backward at H=12, skipping one
    with a failed test; "new" when nothing was timed or the tests did not finish."""
    def bench(rows):
        return {"results": [{"impl": impl, "dtype": dt, "fwd_ms": 1.0, "fwd_bwd_ms": ms} for impl, dt, ms in rows]}

    rows = [("rwkv_cuda bwd=new", "bf16", 7.7), ("rwkv_cuda bwd=chunk", "bf16", 9.0), ("rwkv_cuda bwd=old", "bf16", 9.9),
            ("rwkv_cuda bwd=new H=12", "bf16", 4.2), ("rwkv_cuda bwd=chunk H=12", "bf16", 3.1),
            ("rwkv_cuda bwd=old H=12", "bf16", 5.0), ("rwkv_cuda bwd=chunk", "fp16", 1.0)]
    failed = "FAILED tests/test_cuda_kernel.py::test_matches_float64_reference[chunk-1-37-2-True-dtype1] - assert\n"
    cases = [("", rows, "chunk"), (failed, rows, "new"), ("", rows[:3], "new"), ("", [], "new"),
             ("ERROR tests/test_cuda_kernel.py::test_x[new-2] - boom\n", rows[:3], "chunk"),
             ("", rows + [("rwkv_cuda bwd=fused H=12", "bf16", 2.6)], "fused"),
             ("FAILED tests/test_cuda_kernel.py::test_y[fused-1-2] - x\n", rows + [("rwkv_cuda bwd=fused H=12", "bf16", 2.6)],
              "chunk")]
    for text, rs, want in cases:
        (tmp_path / "pytest.txt").write_text(text + "12 passed in 9.08s\n")
        (tmp_path / "bench.json").write_text(json.dumps(bench(rs)))
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pick_wkv_bwd.py"), str(tmp_path / "pytest.txt"),
                            str(tmp_path / "bench.json")], capture_output=True, text=True, check=True)
        assert p.stdout.strip() == want, (text, rs)
    (tmp_path / "pytest.txt").write_text("..........\n")  # cut off by its time cap: no closing summary
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pick_wkv_bwd.py"), str(tmp_path / "pytest.txt"),
                        str(tmp_path / "bench.json")], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "new"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pick_wkv_bwd.py"), str(tmp_path / "missing.txt"),
                        str(tmp_path / "missing.json")], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "new"


def test_gpu_check_picks_the_chunk_forward_only_when_faster_and_passing(tmp_path):
    """pick_wkv_bwd.py --forward: "chunk" when its bf16 forward (H=12 rows first) beats the sequential one and
    none of its tests failed; a failure in its own tests does not count against the backward it ran with."""
    def bench(rows):
        return {"results": [{"impl": impl, "dtype": dt, "fwd_ms": f, "fwd_bwd_ms": f + 5} for impl, dt, f in rows]}

    def run(*args):
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pick_wkv_bwd.py"), *args, str(tmp_path / "pytest.txt"),
                            str(tmp_path / "bench.json")], capture_output=True, text=True, check=True)
        return p.stdout.strip()

    rows = [("rwkv_cuda bwd=new", "bf16", 1.7), ("rwkv_cuda fwd=chunk bwd=new", "bf16", 2.0),
            ("rwkv_cuda bwd=new H=12", "bf16", 1.4), ("rwkv_cuda fwd=chunk bwd=new H=12", "bf16", 0.9),
            ("rwkv_cuda fwd=chunk bwd=new", "fp16", 0.1)]
    failed = "FAILED tests/test_cuda_kernel.py::test_chunk_forward_matches_float64_reference[1-37-2-fp32-new] - x\n"
    for text, rs, want in [("", rows, "chunk"), (failed, rows, "seq"), ("", rows[:2], "seq"), ("", rows[:1], "seq"),
                           ("", [], "seq")]:
        (tmp_path / "pytest.txt").write_text(text + "1 failed, 9 passed, 2 skipped in 3.50s\n")
        (tmp_path / "bench.json").write_text(json.dumps(bench(rs)))
        assert run("--forward") == want, (text, rs)
    (tmp_path / "pytest.txt").write_text(failed + "1 failed, 9 passed in 3.50s\n")
    (tmp_path / "bench.json").write_text(json.dumps(bench(rows)))
    assert run() == "new"  # the backward keeps its own verdict
    # a test run cut off by its time cap (no closing summary): nothing counts as tested
    (tmp_path / "pytest.txt").write_text("....................\n")
    assert run("--forward") == "seq"
