"""A CPU step that would not fit this machine's memory is answered before it runs (train/host_memory.py).

Linux overcommits: without the check, such a step is killed part-way by the OOM killer, and neither the dry run
nor the real run says anything. The configs below need terabytes at their micro batch, which no machine
running these tests has; their processes run under an address-space cap, so that a missing check ends in a
quick MemoryError (another answer than the one asserted), never in a machine out of memory.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kaggletrain.train import host_memory
from test_dry_run import limited_cli, run_script

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")

CAP = 6 * 2**30  # address space above the imports: without the check, the step's first big tensors fail


def huge_config(tmp_path: Path, **train) -> Path:
    """512 wide, 2 layers, micro batches of 16384 x 512 bytes: ~2.3 TB of activations, ~0.15 GB per sequence."""
    cfg = {"name": "huge", "out_dir": str(tmp_path / "run"),
           "model": {"hidden_size": 512, "num_layers": 2, "head_size": 64},
           "data": {"source": "builtin", "tokenizer": "byte"},
           "train": {"seq_len": 512, "batch_size": 16384, "micro_batch_size": 16384, "max_steps": 4,
                     "device": "cpu", "precision": "fp32", "eval_interval": 0, **train},
           "logging": {"progress": False}}
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_available_memory_reads_this_machine():
    room, source = host_memory.available_bytes()
    info = host_memory._meminfo(Path("/proc"))
    assert 0 < room <= info["MemTotal"] + info.get("SwapTotal", 0)
    assert "meminfo" in source or "cgroup" in source


def _proc(tmp_path: Path, cgroup_line: str, avail_kb: int = 8_000_000, swap_kb: int = 1_000_000) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       16000000 kB\nMemFree:         1000000 kB\n"
                                  f"MemAvailable:    {avail_kb} kB\nSwapTotal:       2000000 kB\n"
                                  f"SwapFree:        {swap_kb} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    return proc


def test_available_memory_is_the_tighter_of_meminfo_and_the_cgroup_limits(tmp_path):
    # No cgroup limit ("max"): MemAvailable + SwapFree.
    proc = _proc(tmp_path, "0::/job")
    root = tmp_path / "cg"
    (root / "job").mkdir(parents=True)
    (root / "job" / "memory.max").write_text("max\n")
    (root / "job" / "memory.current").write_text("123\n")
    assert host_memory.available_bytes(proc, root) == (9_000_000 * 1024, "MemAvailable + SwapFree (/proc/meminfo)")
    # cgroup v2: 4 GB limit, 3 GB used of which 1 GB is inactive page cache (reclaimable): 2 GB of room.
    (root / "job" / "memory.max").write_text(f"{4 * 10**9}\n")
    (root / "job" / "memory.current").write_text(f"{3 * 10**9}\n")
    (root / "job" / "memory.stat").write_text(f"anon 5\ninactive_file {10**9}\nactive_file 7\n")
    room, source = host_memory.available_bytes(proc, root)
    assert room == 2 * 10**9 and "memory.max" in source
    # A tighter limit on the parent wins; a container that sees its cgroup as the root (the path in
    # /proc/self/cgroup missing) is read at the root.
    (root / "memory.max").write_text(f"{2 * 10**9}\n")
    (root / "memory.current").write_text(f"{1.5 * 10**9:.0f}\n")
    assert host_memory.available_bytes(proc, root)[0] == 5 * 10**8
    proc = _proc(tmp_path / "v1", "4:memory:/process_api/abc\n3:cpuset:/")
    v1 = tmp_path / "v1cg" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{6 * 10**9}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{2 * 10**9}\n")
    (v1 / "memory.stat").write_text(f"cache 9\ntotal_inactive_file {10**9}\n")
    assert host_memory.available_bytes(proc, tmp_path / "v1cg")[0] == 5 * 10**9
    # v1 without a limit (the kernel's "unlimited" is 2^63 rounded to pages): meminfo.
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert host_memory.available_bytes(proc, tmp_path / "v1cg")[1].startswith("MemAvailable")


@pytest.mark.parametrize("model,micro,seq_len,precision", [
    ({}, 8, 512, None),
    ({"hidden_size": 128, "vocab_size": 50304}, 1, 64, torch.bfloat16),
    ({"hidden_size": 256, "num_layers": 3, "attention_layers": [1]}, 4, 384, None),
])
def test_the_free_bound_is_above_the_rehearsed_step(model, micro, seq_len, precision):
    """The bound that lets small configs skip the rehearsal must not be under what the rehearsal finds."""
    from types import SimpleNamespace

    from kaggletrain.model.config import ModelConfig
    from kaggletrain.model.model import RWKVModel
    from kaggletrain.train.memory_rehearsal import rehearse_step

    spec = {"hidden_size": 512, "num_layers": 2, "head_size": 64, "vocab_size": 256, **model}
    trainer = SimpleNamespace(model=RWKVModel(ModelConfig(**spec)), micro=micro,
                              cfg=SimpleNamespace(train=SimpleNamespace(seq_len=seq_len)))
    r = rehearse_step(trainer.model, micro_batch=micro, seq_len=seq_len, amp_dtype=precision, kernel=False)
    need = r.peak_bytes - r.weight_bytes
    assert need < host_memory._upper_bound(trainer) < 20 * need + host_memory.BOUND_FIXED


def test_the_search_offers_a_micro_batch_whose_rehearsed_step_fits(tmp_path):
    """Given a budget between the rehearsed needs of micro batches 4 and 8 (of 16), the search offers 4."""
    from kaggletrain.config import load_config
    from kaggletrain.train.loop import Trainer

    cfg = load_config(huge_config(tmp_path, seq_len=64, batch_size=16, micro_batch_size=16))
    trainer = Trainer(cfg, resume=False, progress=False).setup()
    needs = {m: host_memory._need(trainer, m, 16 // m, 64) for m in (4, 8, 16)}
    assert needs[4][0] < needs[8][0] < needs[16][0]
    budget = (needs[4][0] + needs[8][0]) / 2
    found = host_memory._fitting_micro_batch(trainer, 16, 1, *needs[16], budget)
    assert found["micro_batch_size"] == 4 and found["gradient_checkpointing"] is False, found
    assert found["tried"][-1] == {"micro_batch_size": 4, "gradient_checkpointing": False, "fits": True,
                                  "needs_gb": needs[4][0] * host_memory.RESIDENT_FACTOR / 1e9}
    assert all(not t["fits"] for t in found["tried"][:-1])
    # Nothing fits without checkpointing: micro batch 1 with it, if that fits.
    one_ckpt = host_memory._need(trainer, 1, 16, 64, ckpt=True)[0]
    found = host_memory._fitting_micro_batch(trainer, 16, 1, *needs[16], one_ckpt)
    assert found["micro_batch_size"] == 1 and found["gradient_checkpointing"] is True, found
    found = host_memory._fitting_micro_batch(trainer, 16, 1, *needs[16], one_ckpt / 2)
    assert found["micro_batch_size"] is None and "no micro batch fits" in found["note"]
    assert trainer.model._grad_ckpt is False  # the probes put the model's mode back


def test_a_dry_run_that_would_not_fit_this_machine_is_answered_before_the_step(tmp_path):
    path = huge_config(tmp_path)
    proc = limited_cli(CAP, "train", path, "--dry-run", "--steps", "2", "--json")
    assert proc.returncode == 3, proc.stderr[-3000:]
    rep = json.loads(proc.stdout)
    problem = rep["out_of_memory"]
    assert problem.startswith("this machine's memory: a step at train.micro_batch_size=16384 x train.seq_len=512 "
                              "needs ~"), problem
    assert rep["real_run_would_stop"] == [problem]
    assert rep["step_time_s"] is None and rep["measured_steps"] == 0 and rep["val_loss_one_batch"] is None
    s = rep["suggestion"]
    room, _ = host_memory.available_bytes()
    assert 1 <= s["micro_batch_size"] < 16384 and 16384 % s["micro_batch_size"] == 0
    assert s["tried"][-1]["fits"] and s["tried"][-1]["needs_gb"] * 1e9 <= 0.9 * room * 1.05  # (room moves a little)
    assert s["method"] == "rehearsed against this machine's available memory"
    assert rep["projected_t4_memory_gb"] > 1000 and rep["t4_micro_batch_that_fits"]["micro_batch_size"] >= 1
    assert not (tmp_path / "run").exists()
    proc = limited_cli(CAP, "train", path, "--dry-run", "--steps", "2")
    out = " ".join(proc.stdout.split())
    # (what is available moves between the two runs: the micro batch offered can too)
    assert proc.returncode == 3 and re.search(r"suggestion: train\.micro_batch_size=(\d+) fits \(tried micro "
                                              r"batches (.*, )?\1: needs \d+\.\d GB, fits\)", out), out


def test_a_real_cpu_run_that_would_not_fit_stops_at_once_with_one_line(tmp_path):
    path = huge_config(tmp_path)
    proc = limited_cli(CAP, "train", path)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "this machine's memory" in errors[0] and "train.micro_batch_size=16384" in errors[0]
    assert "fits (tried micro batches" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    # The user's way past the check: the step then runs, and here meets the address-space cap instead.
    proc = limited_cli(CAP, "train", path, KAGGLETRAIN_HOST_MEMORY_CHECK="0")
    assert proc.returncode != 0 and "error: out of memory in training step 1 on cpu" in proc.stderr, proc.stderr[-3000:]
    assert "this machine's memory" not in proc.stderr


SPLIT_CHECK = r"""
import sys
from kaggletrain.config import load_config
from kaggletrain.train import host_memory
from kaggletrain.train.loop import Trainer

cfg = load_config(sys.argv[1])
cfg.out_dir = sys.argv[2]  # (not the config's runs/tiny, which the README's main job may have filled)
trainer = Trainer(cfg, resume=False, progress=False).setup()
print(host_memory._upper_bound(trainer), host_memory.available_bytes()[0])
"""


def test_small_configs_skip_the_rehearsal(tmp_path):
    """configs/tiny.yaml's bound is far below any machine's memory: checking it costs no rehearsal."""
    repo = Path(__file__).resolve().parents[1]
    proc = run_script(SPLIT_CHECK, repo / "configs" / "tiny.yaml", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    bound, room = map(int, proc.stdout.split())
    assert bound < 2 * 2**30 and bound * host_memory.RESIDENT_FACTOR <= host_memory.SCREEN_SHARE * room


def test_under_torchrun_rank0_judges_for_every_process_and_all_stop_alike(tmp_path):
    """Two CPU processes on this machine: each gets half of what is available, rank 0's verdict reaches rank 1
    (which would otherwise run its step alone and wait in a collective), and the run ends with one line."""
    import os
    import resource
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def cap():  # inherited by the workers: without the check their first big tensors fail fast
        resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    path = huge_config(tmp_path, micro_batch_size=8192)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "kaggletrain", "train", str(path)],
                          capture_output=True, text=True, env=env, timeout=600, preexec_fn=cap)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "this machine's memory: a step at train.micro_batch_size=8192" in errors[0], errors[0]
    assert "shared by 2 processes" in errors[0] and "fits (tried micro batches" in errors[0], errors[0]
    # (torchrun's launcher prints its own traceback for a failed worker; none comes from kaggletrain)
    assert "[rank1]" not in proc.stderr and "kaggletrain/train" not in proc.stderr, proc.stderr[-3000:]
