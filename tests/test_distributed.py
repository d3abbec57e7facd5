"""torchrun on CPU (gloo, 2 processes): DDP and FSDP give the losses of one process, stop together, and
checkpoints resume with another number of processes. Real `torch.distributed.run` subprocesses.

All runs share one tiny config with chunked training (3 chunks of 12/12/8 tokens per 32-token sequence)
and learnable states, so the DDP/FSDP paths are exercised with both enabled.

Uneven chunk counts per rank: in the training pipeline every micro-batch is [micro_batch, train.seq_len]
(fixed-length windows, no padding), so every rank always runs the same number of chunks;
`test_ddp_uneven_chunk_counts_per_rank` drives DDP directly with different sequence lengths per rank and
per micro-step to show that such a mismatch neither hangs nor corrupts the gradients.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kaggletrain.train import checkpoint as ckpt

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs.\n") * 60
STEPS = 5
TOL = 1e-5

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc to find worker processes")


# ---- helpers ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "250", "PYTHONPATH": path}


def _cmd(nproc: int, *args) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "kaggletrain", *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "kaggletrain", *map(str, args)]


def run(nproc: int, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(nproc, *args), capture_output=True, text=True, env=_env(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_losses_match(run_dir: Path, baseline: list[dict], steps) -> None:
    got = {r["step"]: r["loss"] for r in records(run_dir)}
    want = {r["step"]: r["loss"] for r in baseline}
    assert sorted(got) == sorted(set(got)), "duplicate metrics records"
    for s in steps:
        assert got[s] == pytest.approx(want[s], abs=TOL), f"step {s}: {got[s]} vs {want[s]}"


def assert_weights_match(a: Path, b: Path) -> None:
    wa, wb = ckpt.load_model_state(a), ckpt.load_model_state(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=TOL, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def truncate_run(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if it had been killed right after checkpoint `step`."""
    shutil.copytree(src, dst)
    for p in ckpt.list_checkpoints(dst / "checkpoints"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    (dst / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")
    return dst


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _worker_pid(agent_pid: int, rank: int) -> int | None:
    for pid in _children(agent_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config, and the uninterrupted single-process reference run (STEPS steps, checkpoint every 2)."""
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text(TEXT)
    cfg = {
        "name": "d",
        "out_dir": str(root / "base"),
        "model": {"hidden_size": 32, "num_layers": 2, "head_size": 16, "vocab_size": None,
                  "rwkv_use_learnable_states": True, "rwkv_chunk_size": 12},
        "data": {"source": str(root / "corpus.txt"), "tokenizer": "char", "cache_dir": str(root / "cache")},
        "train": {"seq_len": 32, "batch_size": 4, "max_steps": STEPS, "lr": 3e-3, "warmup_steps": 2,
                  "use_chunking": True, "eval_interval": 0, "eval_batches": 3},  # eval at the end only
        "checkpoint": {"every_steps": 2, "keep_last": 0},
        "logging": {"log_interval": 1, "progress": False, "plot": False},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run(1, "train", path)
    base = root / "base"
    return root, path, base, records(base)


# ---- DDP ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_matches_one_process_stops_together_and_resumes_with_one_process(setup):
    """2-process DDP (gradient accumulation 2 per rank: no_sync path) gives the single-process losses; a
    SIGTERM to rank 1 alone stops both ranks after the same step with a checkpoint; one process resumes it
    and finishes exactly like the uninterrupted single-process run."""
    root, cfg, base, base_recs = setup
    run_dir = root / "ddp"
    args = ["train", cfg, f"out_dir={run_dir}", "train.micro_batch_size=1", "logging.plot=true"]
    agent = subprocess.Popen(_cmd(2, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.time() + 300
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and agent.poll() is None:
            if metrics.exists() and metrics.read_text().strip():
                break  # step 1 is done: both ranks are inside fit(), signal handlers installed
            time.sleep(0.01)
        pid = _worker_pid(agent.pid, rank=1)
        assert pid is not None, "rank 1 worker not found"
        os.kill(pid, signal.SIGTERM)
        out, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["stopped_by_signal"] and 1 <= stopped < STEPS, (summary, out)
    # Rank 0 alone reports, logs and writes; the stop was agreed by both ranks at the same step.
    assert out.count("done: step") == 1 and out.count("world size 2") == 1, out
    assert out.count(f"checkpoint saved at step {stopped}") == 1, out
    assert "a stop signal on another rank" in out
    # Every rank exits with SIGTERM's status (before: rank 0 with SIGINT's 130, which torchrun reported as the
    # root cause, and the rank that got the signal with 0).
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", out)
    assert agent.returncode != 0 and codes and set(codes) == {"143"}, (agent.returncode, codes, out[-3000:])
    assert [r["step"] for r in records(run_dir)] == list(range(1, stopped + 1))
    assert (run_dir / "loss.png").exists()
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "latest" in names and not [n for n in names if n.startswith(".")], names
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == f"step-{stopped:08d}"
    state = ckpt.load_trainer_state(run_dir / "checkpoints" / f"step-{stopped:08d}")
    assert state["step"] == stopped and state["world_size"] == 2 and state["distributed"] == "ddp"
    assert_losses_match(run_dir, base_recs, range(1, stopped + 1))

    # Resume with ONE process: same step, same data position.
    proc = run(1, "train", cfg, f"out_dir={run_dir}", "--resume")
    assert f"resumed at step {stopped}" in proc.stdout
    assert [r["step"] for r in records(run_dir)] == list(range(1, STEPS + 1))
    assert_losses_match(run_dir, base_recs, range(1, STEPS + 1))
    assert_weights_match(run_dir / f"checkpoints/step-{STEPS:08d}", base / f"checkpoints/step-{STEPS:08d}")


UNEVEN_SCRIPT = r'''
import copy, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from kaggletrain import ModelConfig, RWKVModel

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = ModelConfig(hidden_size=32, num_layers=2, head_size=16, vocab_size=40, rwkv_chunk_size=8,
                  rwkv_use_learnable_states=True)
g = torch.Generator().manual_seed(1)
# (rank, micro-step) → sequence length: rank 0 runs 3 and 3 chunks, rank 1 runs 2 chunks and 1 (no chunking).
lengths = [[24, 20], [12, 6]]
data = [[torch.randint(0, 40, (2, T + 1), generator=g) for T in row] for row in lengths]

def loss_of(m, w, bptt):
    return m(w[:, :-1], labels=w[:, 1:], shift_labels=False, use_chunking=True, return_logits=False,
             bptt=bptt, l2wrap=True).loss

for bptt in ("full", "truncated"):
    torch.manual_seed(0)
    model = RWKVModel(cfg)
    with torch.no_grad():  # perturb (att.output starts at zero, which would zero the WKV state's gradient)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    for step in range(2):  # the second step checks that no gradient leaks across steps
        mine = data[rank]
        with ddp.no_sync():
            (loss_of(ddp, mine[0], bptt) / 2).backward()
        (loss_of(ddp, mine[1], bptt) / 2).backward()
        # The same global batch in one process: mean over ranks of the mean over micro-steps.
        for row in data:
            for w in row:
                (loss_of(ref, w, bptt) / (2 * world)).backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if not p.requires_grad:
                assert p.grad is None and q.grad is None, name
                continue
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{bptt} {name}: {m}")
        states = model.learnable_state_parameters()
        assert states and all(float(p.grad.abs().sum()) > 0 for p in states), bptt
        for m in (model, ref):
            with torch.no_grad():
                for p in m.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
                        p.grad = None
print(f"rank {rank} OK", flush=True)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_ddp_uneven_chunk_counts_per_rank(tmp_path):
    """Ranks running different numbers of chunks (and one micro-step without chunking), with learnable
    states used only by the first chunk, under no_sync accumulation: no hang, and the DDP gradients equal
    the single-process gradients of the whole batch (full and truncated BPTT)."""
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 OK" in proc.stdout and "rank 1 OK" in proc.stdout


# ---- FSDP ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_checkpoint_loads_anywhere(setup):
    """FSDP (fully_shard per block + root, 2 processes) gives the single-process losses; its checkpoint
    (full state gathered on rank 0) is the ordinary single-file one: `kaggletrain eval` loads it in one
    process, and its optimizer state resumes exactly under another layout (DDP)."""
    root, cfg, base, base_recs = setup
    run_dir = root / "fsdp"
    proc = run(2, "train", cfg, f"out_dir={run_dir}", "train.distributed=fsdp", "train.micro_batch_size=1")
    assert proc.stdout.count("done: step") == 1
    assert_losses_match(run_dir, base_recs, range(1, STEPS + 1))
    final = run_dir / f"checkpoints/step-{STEPS:08d}"
    assert_weights_match(final, base / f"checkpoints/step-{STEPS:08d}")
    state = ckpt.load_trainer_state(final)
    assert state["distributed"] == "fsdp" and all(isinstance(k, str) for k in state["optimizer"]["state"])
    base_val = json.loads((base / "summary.json").read_text())["val_loss"]
    # The baseline's 3 x 4 validation windows, here in micro-batches of 1 split over the ranks.
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] == pytest.approx(base_val, abs=TOL)

    # One process evaluates the FSDP checkpoint (its run config's micro-batch of 1: the same 12 windows).
    res = json.loads(run(1, "eval", run_dir, "--json").stdout)
    assert res["step"] == STEPS and res["val_loss"] == pytest.approx(base_val, abs=TOL) and res["tokens"] == 12 * 32

    # 2 processes under DDP resume the FSDP checkpoint of step 4 (rank 0 reads, broadcasts).
    resumed = truncate_run(run_dir, root / "fsdp_then_ddp", 4)
    proc = run(2, "train", cfg, f"out_dir={resumed}", "--resume")
    assert proc.stdout.count("resumed at step 4") == 1
    assert_losses_match(resumed, base_recs, range(1, STEPS + 1))
    # Evaluation split over the 2 ranks covers the single process's windows: the same validation loss.
    assert json.loads((resumed / "summary.json").read_text())["val_loss"] == pytest.approx(base_val, abs=TOL)
    assert_weights_match(resumed / f"checkpoints/step-{STEPS:08d}", base / f"checkpoints/step-{STEPS:08d}")


FSDP_CUDA_SCRIPT = r'''
import copy
import torch, torch.distributed as dist
from kaggletrain import ModelConfig, RWKVModel
from kaggletrain.train.fsdp import (apply_fsdp, gather_model_state, gather_optimizer_state,
                                    load_model_state_from_rank0, load_optimizer_state_from_rank0)
from kaggletrain.train.optim import build_optimizer

dev = torch.device("cuda", int(__import__("os").environ["LOCAL_RANK"]))
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
rank, world = dist.get_rank(), dist.get_world_size()
cfg = ModelConfig(hidden_size=64, num_layers=2, head_size=16, vocab_size=50, rwkv_chunk_size=16,
                  rwkv_use_learnable_states=True, wkv_impl="chunked")

def build():
    torch.manual_seed(0)
    m = RWKVModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.enable_mixed_precision(torch.float16)

ref = build().to(dev)
model = apply_fsdp(build(), dev)
opts = [build_optimizer(m, 1e-4, 0.1, (0.9, 0.99), 1e-8, dev) for m in (ref, model)]
assert all(g.get("fused") for o in opts for g in o.param_groups)
scalers = [torch.amp.GradScaler("cuda") for _ in range(2)]
g = torch.Generator().manual_seed(1)
for step in range(3):
    w = torch.randint(0, 50, (2 * world, 49), generator=g).to(dev)
    mine = w[2 * rank:2 * rank + 2]
    losses = []
    for m, opt, sc, batch in ((ref, opts[0], scalers[0], w), (model, opts[1], scalers[1], mine)):
        loss = m(batch[:, :-1], labels=batch[:, 1:], shift_labels=False, use_chunking=True, return_logits=False).loss
        sc.scale(loss).backward()
        sc.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        sc.step(opt)
        sc.update()
        opt.zero_grad(set_to_none=True)
        l = loss.detach().clone()
        if m is model:
            dist.all_reduce(l)
            l /= world
        losses.append(float(l))
    assert abs(losses[0] - losses[1]) < 2e-3, (step, losses)
full = gather_model_state(model)
osd = gather_optimizer_state(model, opts[1])
if rank == 0:
    for k, v in ref.state_dict().items():
        # Adam moves each weight by <= ~lr per step whatever the gradient's size: rounding-level
        # gradient differences (half-precision matmuls on other shapes) stay within a few lr.
        torch.testing.assert_close(full[k], v.cpu(), atol=1e-3, rtol=0)
    assert set(osd["state"]) == {n for n, p in ref.named_parameters() if p.requires_grad}
fresh = apply_fsdp(RWKVModel(cfg), dev)
fopt = build_optimizer(fresh, 1e-4, 0.1, (0.9, 0.99), 1e-8, dev)
expect = {k: v.clone() for k, v in full.items()}  # (loading distributes the given dict in place)
load_model_state_from_rank0(fresh, full if rank == 0 else {})
load_optimizer_state_from_rank0(fresh, fopt, osd if rank == 0 else {})
again = gather_model_state(fresh)
if rank == 0:
    assert all(torch.equal(again[k], expect[k]) for k in expect)
print(f"rank {rank} OK", flush=True)
dist.destroy_process_group()
'''


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_fsdp_fp16_gradscaler_fused_adamw_on_cuda(tmp_path):
    """The T4 path: FSDP on NCCL (1 or 2 GPUs) with fp16 autocast, GradScaler and fused AdamW over sharded
    (DTensor) parameters matches a plain model on the global batch; the gathered state reloads."""
    script = tmp_path / "fsdp_cuda.py"
    script.write_text(FSDP_CUDA_SCRIPT)
    nproc = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(f"rank {r} OK" in proc.stdout for r in range(nproc))


def test_an_error_on_rank0_alone_ends_every_rank_with_one_line(tmp_path):
    """Rank 0 alone tokenises the data; when that fails (a corpus too short for one sequence), every rank
    must stop with the one-line error instead of rank 1 waiting in a collective and dying with a traceback."""
    (tmp_path / "tiny.txt").write_text("ab")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "r", "out_dir": str(tmp_path / "run"),
        "model": {"hidden_size": 32, "num_layers": 1, "head_size": 16},
        "data": {"source": str(tmp_path / "tiny.txt"), "tokenizer": "char", "cache_dir": str(tmp_path / "cache")},
        "train": {"seq_len": 16, "batch_size": 2, "max_steps": 2, "device": "cpu"},
        "logging": {"progress": False},
    }))
    proc = run(2, "train", cfg, check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "tiny.txt" in lines[0] and "train.seq_len" in lines[0], proc.stderr[-3000:]
    assert "[rank1]" not in proc.stderr and "kaggletrain/train" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ddp_with_gradient_checkpointing_matches_one_process(setup):
    """DDP + gradient checkpointing (RWKV blocks recomputed graph-free, parameters as explicit inputs) +
    chunking + learnable states: every parameter's gradient is reduced once per backward, so the losses
    and final weights are those of the plain single-process run."""
    root, cfg, base, base_recs = setup
    run_dir = root / "ddp_ckpt"
    run(2, "train", cfg, f"out_dir={run_dir}", "train.micro_batch_size=1", "train.gradient_checkpointing=true")
    assert_losses_match(run_dir, base_recs, range(1, STEPS + 1))
    assert_weights_match(run_dir / "checkpoints" / f"step-{STEPS:08d}", base / "checkpoints" / f"step-{STEPS:08d}")


def test_a_distributed_process_ends_with_its_code_and_output_but_no_destructors():
    """kaggletrain.process: once a distributed run holds its trainer, the process ends through os._exit
    (ProcessGroupGloo's destructor can deadlock against its worker thread), output flushed, code kept."""
    code = ("import sys; from kaggletrain.process import hold_until_exit, exit_process\n"
            "class Loud:\n"
            "    def __del__(self): print('destructor ran')\n"
            "hold_until_exit(Loud()); print('trained', end=''); sys.stderr.write('warned'); exit_process(3)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (3, "trained", "warned")
    plain = subprocess.run([sys.executable, "-c", "from kaggletrain.process import exit_process; exit_process(4)"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 4
