"""Reliability (issue 10): nothing is lost under crashes, and bad input never produces a traceback.

Every run here is the real CLI (`kaggletrain.cli.main`, what `python -m kaggletrain` calls) in a real child
process that receives real signals. Importing torch costs 2-20 s per process on a loaded 2-core machine,
so most children are forked from a "zygote": one long-lived `python` process that imported torch and
kaggletrain once (and ran no torch op, so no thread pool is forked) and then forks one child per run. A
child redirects its stdout/stderr to files, applies the requested environment, file size limit or kill
hook, runs `main(argv)` and exits with its return code, as `python -m kaggletrain` would. The reference run
and the SIGTERM run use `python -m kaggletrain` itself, and the crash and signal tests require the forked
runs to end bit-identical to that reference, which also shows the two paths are equivalent.

Kill hooks (crash test): the child SIGKILLs itself at a named point (inside a training step, inside
evaluation, after each file of a checkpoint write, between the renames, before the pointer moves, in the
middle of pruning an old checkpoint, right after a metrics line). Timed kills (random delays) and kills
triggered by the test seeing a `.tmp-*` checkpoint directory appear come from the test process.
The figures of a run are written to $KAGGLETRAIN_RELIABILITY_REPORT (JSON) when that is set.
See docs/reliability.md.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from kaggletrain.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs.\n") * 60
MAX_STEPS = 48
CKPT_FILES = {"model.safetensors", "config.json", "trainer_state.pt", "run_config.yaml", "tokenizer.json"}
FIGURES: dict = {}  # written to $KAGGLETRAIN_RELIABILITY_REPORT at the end of the module
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KAGGLETRAIN_DEBUG": "0"}


def write_config(tmp: Path, out_dir: Path, name: str = "cfg.yaml", **train) -> Path:
    """The crash/signal run: tiny model, char tokenizer, a checkpoint every 3 steps (2 kept), eval every 4."""
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "corpus.txt"
    data.write_text(TEXT)
    cfg = {
        "name": "rel",
        "out_dir": str(out_dir),
        "model": {"hidden_size": 32, "num_layers": 2, "head_size": 16, "vocab_size": None},
        "data": {"source": str(data), "tokenizer": "char", "cache_dir": str(tmp / "cache")},
        "train": {"seq_len": 32, "batch_size": 4, "max_steps": MAX_STEPS, "lr": 3e-3, "warmup_steps": 2,
                  "eval_interval": 4, "eval_batches": 2, **train},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "logging": {"log_interval": 1, "progress": False, "plot": False},
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------------
# The zygote: one process that imported everything, forking one child per CLI run.
# ------------------------------------------------------------------------------------------------

ZYGOTE = r'''
import json, os, resource, signal, sys, traceback
import torch
torch.set_num_threads(1)
import safetensors.torch, shutil, yaml, numpy
import kaggletrain.cli as cli
cli._register_commands()
import kaggletrain.train.loop, kaggletrain.train.evaluate, kaggletrain.data, kaggletrain.interop
from kaggletrain.model.model import RWKVModel
from kaggletrain.train.metrics import MetricsWriter

# Warm up once (one thread: no thread pool to fork): the optimizer's first use imports torch._dynamo (~10 s).
from kaggletrain import ModelConfig
from kaggletrain.train.optim import build_optimizer
_m = RWKVModel(ModelConfig(hidden_size=32, num_layers=1, head_size=16, vocab_size=16))
_opt = build_optimizer(_m, 1e-3, 0.0, (0.9, 0.99), 1e-8, torch.device("cpu"))
_x = torch.randint(0, 16, (1, 8))
_m(_x, labels=_x).loss.backward()
_opt.step()
del _m, _opt, _x


def install_kill_hook(spec, marker):
    """SIGKILL this process at the nth time `point` is reached."""
    point, nth = spec.split(":")
    nth, seen = int(nth), [0]

    def hit(name):
        if name != point:
            return
        seen[0] += 1
        if seen[0] == nth:
            with open(marker, "w") as f:
                f.write(name)
            os.kill(os.getpid(), signal.SIGKILL)

    base = os.path.basename
    st_save, t_save = safetensors.torch.save_file, torch.save
    rename, replace, rmtree = os.rename, os.replace, shutil.rmtree
    forward, log = RWKVModel.forward, MetricsWriter.log

    def save_file(tensors, filename, *a, **k):
        r = st_save(tensors, filename, *a, **k)
        if ".tmp-step-" in str(filename):
            hit("ckpt_weights")  # weights written into the temporary directory, nothing else yet
        return r

    def t_save_hook(obj, f, *a, **k):
        r = t_save(obj, f, *a, **k)
        if ".tmp-step-" in str(f):
            hit("ckpt_state")  # trainer_state.pt written too
        return r

    def rename_hook(src, dst, *a, **k):
        if base(str(src)).startswith(".tmp-step-"):
            hit("ckpt_before_rename")  # the temporary directory is complete, not yet in place
        r = rename(src, dst, *a, **k)
        if base(str(src)).startswith(".tmp-step-"):
            hit("ckpt_after_rename")  # in place, `latest` not moved yet
        if base(str(dst)).startswith(".old-step-") and not str(dst).endswith("-pruned"):
            hit("swap_gap")  # re-saving a step: the old directory moved away, the new one not yet in place
        return r

    def replace_hook(src, dst, *a, **k):
        if base(str(src)).startswith(".latest.tmp-"):
            hit("ckpt_pointer")  # the new pointer written to its temporary file, not yet in place
        return replace(src, dst, *a, **k)

    def rmtree_hook(path, *a, **k):
        name = base(str(path))
        if name.endswith("-pruned") or name.startswith("step-"):  # pruning an old checkpoint
            files = sorted(p for p in os.listdir(path))
            if files:
                os.unlink(os.path.join(path, files[-1]))
            hit("prune")  # killed in the middle of deleting it
        return rmtree(path, *a, **k)

    def forward_hook(self, *a, **k):
        hit("step" if self.training else "eval")  # inside a training step / inside evaluation
        return forward(self, *a, **k)

    def log_hook(self, record):
        r = log(self, record)
        hit("metrics")
        return r

    safetensors.torch.save_file, torch.save = save_file, t_save_hook
    os.rename, os.replace, shutil.rmtree = rename_hook, replace_hook, rmtree_hook
    RWKVModel.forward, MetricsWriter.log = forward_hook, log_hook


def child(req):
    os.chdir(req["cwd"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8")
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8")
    os.environ.update(req.get("env") or {})
    for k in req.get("unset") or []:
        os.environ.pop(k, None)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if req.get("fsize") is not None:  # a full disk: writes past this size fail with EFBIG (not SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    if req.get("hook"):
        install_kill_hook(req["hook"], req["marker"])
    if req.get("memory_at_read"):
        from memory_caps import cap_checkpoint_reads  # tests/memory_caps.py

        cap_checkpoint_reads(req["memory_at_read"])
    try:
        rc = cli.main(req["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return rc or 0


print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(req)
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class Run:
    def __init__(self, zygote: "Zygote", pid: int, out: Path, err: Path, marker: Path | None):
        self.zygote, self.pid, self.out_path, self.err_path, self.marker = zygote, pid, out, err, marker
        self.rc: int | None = None

    def wait(self) -> int:
        if self.rc is None:
            self.rc = self.zygote._ask({"op": "wait", "pid": self.pid})["rc"]
        return self.rc

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"exit {self.rc}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


class Zygote:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.n = 0
        env = {**os.environ, **CHILD_ENV,
               "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
        self.log = open(workdir / "zygote.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=workdir)
        line = self.proc.stdout.readline()
        assert line, f"zygote failed to start: {(workdir / 'zygote.log').read_text()[-2000:]}"

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"zygote died: {(self.workdir / 'zygote.log').read_text()[-2000:]}"
        return json.loads(line)

    def start(self, *argv, cwd: Path | None = None, env: dict | None = None, unset=(), fsize: int | None = None,
              hook: str | None = None, memory_at_read: int | None = None) -> Run:
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        marker = self.workdir / f"{self.n}.killed" if hook else None
        req = {"op": "run", "argv": [str(a) for a in argv], "cwd": str(cwd or self.workdir), "stdout": str(out),
               "stderr": str(err), "env": env or {}, "unset": list(unset), "fsize": fsize, "hook": hook,
               "marker": str(marker) if marker else None, "memory_at_read": memory_at_read}
        return Run(self, self._ask(req)["pid"], out, err, marker)

    def run(self, *argv, **kw) -> Run:
        r = self.start(*argv, **kw)
        r.wait()
        return r

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def real_cli(*args, env=None, **popen) -> subprocess.Popen:
    """`python -m kaggletrain ...` in a fresh interpreter (no zygote)."""
    full_env = {**os.environ, **CHILD_ENV, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "kaggletrain", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO, **popen)


class Reference:
    """An uninterrupted run of the crash/signal config through `python -m kaggletrain`, started at once in the
    background (it overlaps with the crash test) and awaited by whoever needs its weights. It saves and keeps a
    checkpoint at every step (neither changes the numbers), so any step can be compared: a signal saves at
    whichever step it interrupts, e.g. step 7 on a loaded machine, between the config's saves every 3 steps."""

    def __init__(self, tmp: Path):
        self.run_dir = tmp / "run"
        self.proc = real_cli("train", write_config(tmp, self.run_dir), "checkpoint.keep_last=0",
                             "checkpoint.every_steps=1")
        self._result = None

    def result(self) -> tuple[dict, list]:
        if self._result is None:
            self._result = (self.weights(MAX_STEPS), losses(self.run_dir))
        return self._result

    def weights(self, step: int) -> dict:
        # Only once the run has ended: a test may ask for a step the background run has not reached yet.
        if self.proc.returncode is None:
            out, err = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, f"reference run failed\n{out}\n{err}"
        return ckpt.load_model_state(self.run_dir / "checkpoints" / f"step-{step:08d}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


def losses(run_dir: Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs from the uninterrupted run"


def check_checkpoints(run_dir: Path) -> int:
    """Every visible checkpoint is complete, and the latest one loads: weights, metadata, trainer state.
    Returns its step (0: none yet)."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("step-"):
                assert CKPT_FILES <= {p.name for p in d.iterdir()}, f"incomplete checkpoint {d}: {os.listdir(d)}"
    latest = ckpt.latest_checkpoint(root)
    if latest is None:
        return 0
    meta = ckpt.read_meta(latest)
    state = ckpt.load_trainer_state(latest)
    sd = ckpt.load_model_state(latest)
    assert sd and all(torch.isfinite(t).all() for t in sd.values())
    step = int(latest.name.split("-")[1])
    assert meta["step"] == state["step"] == step
    return step


def no_traceback_one_line(run: Run, *needles: str) -> str:
    """The failure is one `error:` line on stderr naming what is wrong; no traceback; exit 2."""
    err = run.stderr
    assert "Traceback" not in err, run.describe()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.describe()
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert run.rc == 2, run.describe()
    return lines[0]


def file_hashes(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Crash safety
# ------------------------------------------------------------------------------------------------

# In this order, from a fresh run directory (the latest checkpoint after each kill in brackets):
HOOKED_KILLS = [
    "step:2",                # inside step 2, before any checkpoint: nothing to lose yet            [none]
    "ckpt_weights:1",        # first save (step 3): weights written into .tmp-step-*, nothing else  [none]
    "ckpt_state:1",          # ... trainer_state.pt written too                                      [none]
    "ckpt_before_rename:1",  # ... the temporary directory complete, not yet renamed into place       [none]
    "ckpt_after_rename:1",   # ... in place, `latest` not written yet: found as the newest complete   [3]
    "ckpt_pointer:2",        # resumed: step 6 saved; step 9 in place, the pointer not yet moved      [6]
    "swap_gap:1",            # resumed at 6, re-saving step 9: old step-9 moved away, new one not in  [6]
    "eval:1",                # inside the evaluation of step 8                                        [6]
    "prune:1",               # step 9 saved, then killed half-way through deleting step 3 (keep 2)   [9]
    "metrics:2",             # right after the metrics line of step 11                                [9]
    "step:5",                # inside step 14, after step 12 was saved                                [12]
]


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _wait_for_progress(run_dir: Path, start_step: int, timeout: float = 300.0, describe=lambda: "",
                       stale_mtime: int = -1) -> dict:
    """Until the run has logged a step beyond `start_step` (in a metrics file written since `stale_mtime`:
    a killed run's leftover lines do not count); returns that metrics record."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        try:
            if _mtime(metrics) <= stale_mtime:
                time.sleep(0.01)
                continue
            lines = metrics.read_text().splitlines()
            if lines:
                rec = json.loads(lines[-1])
                if rec["step"] > start_step:
                    return rec
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"no progress within {timeout} s\n{describe()}")


def _exited(pid: int) -> bool:
    """A zygote child has exited (a zombie until the zygote reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def test_sigkill_anywhere_loses_nothing_and_resume_is_bit_identical(zygote, reference, sigterm_run, tmp_path):
    # (sigterm_run: started here so that it runs alongside; checked by its own test below)
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, run_dir)
    rng = random.Random(10)
    plan = [("hook", h) for h in HOOKED_KILLS] + [("tmp_poll", None)] * 4 + [("timed", None)] * 4
    last, log, steps = 0, [], []
    mid_write = 0
    for mode, spec in plan:
        resume = ["--resume"] if ckpt.latest_checkpoint(run_dir / "checkpoints") else []
        stale = _mtime(run_dir / "metrics.jsonl")
        run = zygote.start("train", cfg, *resume, hook=spec)
        if mode == "timed":  # a random moment within the next ~4 steps (step, eval, checkpoint or logging)
            rec = _wait_for_progress(run_dir, last, describe=run.describe, stale_mtime=stale)
            time.sleep(rng.uniform(0.0, 4 * max(rec.get("step_s") or 0.05, 0.01)))
            os.kill(run.pid, signal.SIGKILL)
        elif mode == "tmp_poll":  # kill the moment this child's temporary checkpoint directory appears
            root, tag, deadline = run_dir / "checkpoints", f"-{run.pid}", time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if any(n.startswith(".tmp-step-") and n.endswith(tag) for n in os.listdir(root)):
                        break
                except FileNotFoundError:
                    pass
                time.sleep(0.0002)
            os.kill(run.pid, signal.SIGKILL)
        rc = run.wait()
        assert rc == -signal.SIGKILL, f"{mode} {spec}: the kill point was not reached\n{run.describe()}"
        if mode == "hook":
            assert run.marker.read_text() == spec.split(":")[0]
        if mode == "tmp_poll" and any(n.endswith(f"-{run.pid}") for n in os.listdir(run_dir / "checkpoints")):
            mid_write += 1  # the kill landed while the checkpoint was being written
        step = check_checkpoints(run_dir)
        assert step >= last, f"{mode} {spec}: the latest checkpoint went back from step {last} to {step}"
        steps.append(step)
        if step:
            latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
            log.append((mode, spec, step, ckpt.load_model_state(latest)))
        last = step
    assert last > 0
    final = zygote.run("train", cfg, "--resume")
    assert final.rc == 0, final.describe()
    assert check_checkpoints(run_dir) == MAX_STEPS
    leftovers = [n for n in os.listdir(run_dir / "checkpoints") if n.startswith((".tmp-", ".old-", ".latest.tmp-"))]
    assert not leftovers, f"temporaries of killed writers were not cleaned up: {leftovers}"
    ref_weights, ref_losses = reference.result()
    for mode, spec, step, weights in log:  # the checkpoint left by every kill is the uninterrupted run's
        assert_same_weights(reference.weights(step), weights, f"step {step} after kill {mode} {spec}")
    assert_same_weights(ref_weights, ckpt.load_model_state(run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}"),
                        f"after {len(plan)} kills")
    assert losses(run_dir) == ref_losses  # the metrics read like one uninterrupted run: no gaps, no repeats
    FIGURES["sigkill"] = {"kills": len(plan), "survived": len(plan), "hooked": len(HOOKED_KILLS),
                          "timed": 4, "tmp_poll": 4, "tmp_poll_landed_mid_write": mid_write,
                          "latest_step_after_each_kill": steps}


def test_checkpoint_store_edge_cases(tmp_path):
    """The checkpoint directory's own rules, in process: a damaged pointer, leftovers of killed writers,
    pruning, and setting aside checkpoints after a non-finite loss."""
    root = tmp_path / "checkpoints"
    meta = ckpt.model_meta({"hidden_size": 1}, 0)
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, model_state={"w": torch.full((2,), float(step))}, meta=meta)
    for garbage in (b"\xff\x00\n", b"../../etc\n", b"step-00000002/../step-00000001\n", b""):
        (root / "latest").write_bytes(garbage)
        assert ckpt.latest_checkpoint(root).name == "step-00000002"  # the newest complete one
    # Temporaries of dead writers go at the next save; a live writer's stay.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f".tmp-step-00000003-{dead.pid}", f".old-step-00000002-{dead.pid}",
                 f".old-step-00000001-{dead.pid}-pruned", f".tmp-step-00000003-{os.getppid()}"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"partial")
    (root / f".latest.tmp-{dead.pid}").write_text("step-00000003\n")
    ckpt.save_checkpoint(root, 3, model_state={"w": torch.zeros(2)}, meta=meta, keep_last=2)
    assert sorted(os.listdir(root)) == [f".tmp-step-00000003-{os.getppid()}", "latest", "step-00000002",
                                        "step-00000003"]
    # Pruning never removes the checkpoint just written, even when older-looking names sort after it.
    (root / "step-00000009").mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copy(root / "step-00000003" / f, root / "step-00000009" / f)
    ckpt.save_checkpoint(root, 4, model_state={"w": torch.ones(2)}, meta=meta, keep_last=1)
    assert (root / "step-00000004").is_dir() and ckpt.latest_checkpoint(root).name == "step-00000004"
    # After a non-finite loss first seen at step 5: checkpoints from step 4 on are set aside, not deleted.
    shutil.rmtree(root / "step-00000009")
    ckpt.save_checkpoint(root, 2, model_state={"w": torch.full((2,), 2.0)}, meta=meta)
    ckpt.save_checkpoint(root, 4, model_state={"w": torch.ones(2)}, meta=meta)
    assert ckpt.quarantine_from(root, 4).name == "step-00000002"
    assert ckpt.latest_checkpoint(root).name == "step-00000002" and (root / ".nonfinite-step-00000004").is_dir()
    ckpt.save_checkpoint(root, 4, model_state={"w": torch.ones(2)}, meta=meta)  # the same step goes bad again
    assert ckpt.quarantine_from(root, 3).name == "step-00000002"
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    assert ckpt.quarantine_from(root, 0) is None and ckpt.latest_checkpoint(root) is None


# ------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT
# ------------------------------------------------------------------------------------------------

def _signal_and_time(pid: int, sig: int, run_dir: Path, wait_exit) -> tuple[float, float, int]:
    """Send `sig`; return (seconds until a newer checkpoint is in place, seconds until exit, exit code)."""
    root = run_dir / "checkpoints"
    latest = ckpt.latest_checkpoint(root)
    before = int(latest.name.split("-")[1]) if latest else 0
    t0 = time.monotonic()
    os.kill(pid, sig)
    saved_at = None
    rc = None
    while rc is None:
        if saved_at is None:
            latest = ckpt.latest_checkpoint(root)
            if latest is not None and int(latest.name.split("-")[1]) > before:
                saved_at = time.monotonic() - t0
        rc = wait_exit(0.005)
    exit_s = time.monotonic() - t0
    return (saved_at if saved_at is not None else exit_s), exit_s, rc


class SigtermRun:
    """Kaggle stopping a session: SIGTERM to `python -m kaggletrain train` once it is past step 4. Driven by a
    background thread from the start of the module, so that its interpreter start-up overlaps other tests."""

    def __init__(self, tmp: Path):
        self.run_dir = tmp / "run"
        self.cfg = write_config(tmp, self.run_dir)
        self.proc = real_cli("train", self.cfg)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drive, daemon=True)
        self.thread.start()

    def _drive(self) -> None:
        try:
            _wait_for_progress(self.run_dir, 4, timeout=600)

            def wait_exit(dt):
                try:
                    return self.proc.wait(timeout=dt)
                except subprocess.TimeoutExpired:
                    return None

            self.save_s, self.exit_s, self.rc = _signal_and_time(self.proc.pid, signal.SIGTERM, self.run_dir,
                                                                 wait_exit)
            self.out, self.err = self.proc.communicate(timeout=120)
        except BaseException as e:  # re-raised in the test
            self.error = e

    def result(self) -> "SigtermRun":
        self.thread.join(timeout=900)
        if self.proc.poll() is None:
            self.proc.kill()
        if self.error is not None:
            raise self.error
        return self


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    run = SigtermRun(tmp_path_factory.mktemp("sigterm"))
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


def test_sigterm_saves_a_checkpoint_then_exits_and_resume_matches(zygote, reference, sigterm_run):
    r = sigterm_run.result()
    assert r.rc in (130, 143), f"exit {r.rc}\n{r.out}\n{r.err}"
    assert "Traceback" not in r.err
    m = re.search(r"received signal 15: checkpoint saved at step (\d+)", r.out)
    assert m, r.out
    stopped = int(m.group(1))
    assert check_checkpoints(r.run_dir) == stopped < MAX_STEPS
    # Generous bounds (a shared, loaded 2-core machine). Exit includes the interpreter tearing torch down.
    assert r.save_s < 30 and r.exit_s < 60, (r.save_s, r.exit_s)
    saved = ckpt.load_model_state(r.run_dir / "checkpoints" / f"step-{stopped:08d}")
    resumed = zygote.run("train", r.cfg, "--resume")
    assert resumed.rc == 0 and f"resumed at step {stopped}" in resumed.stdout, resumed.describe()
    assert_same_weights(reference.weights(stopped), saved, "at SIGTERM")
    assert_same_weights(reference.result()[0],
                        ckpt.load_model_state(r.run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}"), "after SIGTERM")
    FIGURES["sigterm"] = {"stopped_at_step": stopped, "signal_to_checkpoint_s": round(r.save_s, 2),
                          "signal_to_exit_s": round(r.exit_s, 2), "exit_code": r.rc}


def test_sigint_saves_a_checkpoint_and_a_second_one_stops_at_once(zygote, reference, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, run_dir)
    run = zygote.start("train", cfg)
    _wait_for_progress(run_dir, 4, describe=run.describe)

    def wait_exit(dt):
        time.sleep(dt)
        return run.wait() if _exited(run.pid) else None

    save_s, exit_s, rc = _signal_and_time(run.pid, signal.SIGINT, run_dir, wait_exit)
    assert rc == 130, run.describe()
    assert "Traceback" not in run.stderr
    m = re.search(r"received signal 2: checkpoint saved at step (\d+)", run.stdout)
    assert m, run.describe()
    stopped = int(m.group(1))
    assert check_checkpoints(run_dir) == stopped
    assert save_s < 30 and exit_s < 60, (save_s, exit_s)
    saved = ckpt.load_model_state(run_dir / "checkpoints" / f"step-{stopped:08d}")

    # Ctrl-C twice: the second one stops at once; whatever it interrupts, the latest checkpoint stays loadable.
    stale = _mtime(run_dir / "metrics.jsonl")
    run2 = zygote.start("train", cfg, "--resume")
    _wait_for_progress(run_dir, stopped, describe=run2.describe, stale_mtime=stale)
    os.kill(run2.pid, signal.SIGINT)
    time.sleep(0.02)
    os.kill(run2.pid, signal.SIGINT)
    assert run2.wait() == 130, run2.describe()
    assert "Traceback" not in run2.stderr
    assert check_checkpoints(run_dir) >= stopped

    resumed = zygote.run("train", cfg, "--resume")
    assert resumed.rc == 0, resumed.describe()
    assert_same_weights(reference.weights(stopped), saved, "at SIGINT")
    assert_same_weights(reference.result()[0],
                        ckpt.load_model_state(run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}"), "after SIGINT")
    FIGURES["sigint"] = {"stopped_at_step": stopped, "signal_to_checkpoint_s": round(save_s, 2),
                         "signal_to_exit_s": round(exit_s, 2), "exit_code": rc}


# ------------------------------------------------------------------------------------------------
# Disk trouble
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_run(zygote, tmp_path_factory):
    """A finished 3-step run (one checkpoint, step-00000003) to copy and damage."""
    tmp = tmp_path_factory.mktemp("good")
    cfg = write_config(tmp, tmp / "run", max_steps=3)
    r = zygote.run("train", cfg)
    assert r.rc == 0, r.describe()
    return tmp


def _copy_run(good: Path, dst: Path) -> tuple[Path, Path]:
    """A copy of the good run; returns (config, checkpoint dir). The config resumes to step 6."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(good / "run", dst / "run")
    cfg = write_config(dst, dst / "run", max_steps=6)
    shutil.copytree(good / "cache", dst / "cache", dirs_exist_ok=True)
    return cfg, dst / "run" / "checkpoints" / "step-00000003"


def _assert_untouched(step_dir: Path, before: dict) -> None:
    root = step_dir.parent
    assert ckpt.latest_checkpoint(root) == step_dir
    assert file_hashes(step_dir) == before
    assert [p.name for p in root.iterdir() if p.name != "latest"] == [step_dir.name], os.listdir(root)
    check_checkpoints(root.parent)


def test_full_disk_fails_clearly_and_keeps_the_good_checkpoint(zygote, good_run, tmp_path):
    cfg, step3 = _copy_run(good_run, tmp_path)
    before = file_hashes(step3)
    # RLIMIT_FSIZE with SIGXFSZ ignored: every write past 64 KiB fails with EFBIG, as on a full disk. The
    # weights (~180 KB) of the step-6 checkpoint no longer fit; the small files of the run directory do.
    r = zygote.run("train", cfg, "--resume", fsize=64 * 1024)
    line = no_traceback_one_line(r, "checkpoint write failed", "File too large", "previous checkpoint is intact")
    _assert_untouched(step3, before)
    # Full from the start (a new run: its token cache no longer fits): one line, no traceback.
    fresh = write_config(tmp_path / "fresh", tmp_path / "fresh" / "run")
    r2 = zygote.run("train", fresh, fsize=2048)
    line2 = no_traceback_one_line(r2, "File too large")
    # Space again: the run resumes from the intact checkpoint and finishes.
    r3 = zygote.run("train", cfg, "--resume")
    assert r3.rc == 0 and "resumed at step 3" in r3.stdout, r3.describe()
    FIGURES.setdefault("disk", []).extend([line, line2])


def test_read_only_checkpoint_directory_fails_clearly(zygote, good_run, tmp_path):
    cfg, step3 = _copy_run(good_run, tmp_path)
    before = file_hashes(step3)
    root = step3.parent
    # Tests run as root, where chmod does not stop writes: the immutable attribute does.
    if subprocess.run(["chattr", "+i", str(root)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        assert not os.access(root, os.W_OK) or _cannot_create(root)
        r = zygote.run("train", cfg, "--resume")
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=True)
    line = no_traceback_one_line(r, "checkpoint write failed", "Operation not permitted",
                                 "previous checkpoint is intact")
    _assert_untouched(step3, before)
    # An output directory that cannot exist (its parent is a regular file).
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    bad = write_config(tmp_path / "b", blocker / "run")
    r2 = zygote.run("train", bad)
    line2 = no_traceback_one_line(r2, str(blocker), "Not a directory")
    FIGURES.setdefault("disk", []).extend([line, line2])


def _cannot_create(root: Path) -> bool:
    try:
        (root / ".probe").mkdir()
    except OSError:
        return True
    (root / ".probe").rmdir()
    return False


# ------------------------------------------------------------------------------------------------
# Bad files: one clear line, exit 2, no traceback, for train --resume / eval / generate / export
# ------------------------------------------------------------------------------------------------

def _evil_pickle(marker: Path) -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"step": 3, "optimizer": Evil()}, protocol=2)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _future(p: Path) -> None:
    meta = json.loads(p.read_text())
    p.write_text(json.dumps({**meta, "version": 99}))


CKPT_CASES = {
    # name: (file, damage, commands, words the error line must hold)
    "weights truncated": ("model.safetensors", _truncate, "trge", ["model.safetensors", "truncated or corrupt"]),
    "weights random bytes": ("model.safetensors", lambda p: p.write_bytes(random.Random(1).randbytes(5000)), "trge",
                             ["model.safetensors"]),
    "weights empty": ("model.safetensors", lambda p: p.write_bytes(b""), "trge", ["model.safetensors"]),
    "metadata not JSON": ("config.json", lambda p: p.write_text("{not json"), "trge", ["config.json"]),
    "future format version": ("config.json", _future, "trge", ["config.json", "newer", "upgrade kaggletrain"]),
    "trainer state truncated": ("trainer_state.pt", _truncate, "t", ["trainer_state.pt", "truncated or corrupted"]),
    "trainer state malicious pickle": ("trainer_state.pt", None, "tr", ["trainer_state.pt", "refusing to load",
                                                                       "nothing in it was run"]),
    "tokenizer not JSON": ("tokenizer.json", lambda p: p.write_text("{"), "g", ["tokenizer.json"]),
    "run config not YAML": ("run_config.yaml", lambda p: p.write_text("train: [1\n"), "r", ["run_config.yaml"]),
}
COMMANDS = {"t": "train --resume", "r": "eval", "g": "generate", "e": "export"}


def _argv(cmd: str, cfg: Path, ckpt_dir: Path, tmp: Path) -> list:
    return {"t": ["train", cfg, "--resume"], "r": ["eval", ckpt_dir],
            "g": ["generate", ckpt_dir, "-p", "The", "-n", "2", "--device", "cpu"],
            "e": ["export", ckpt_dir, "--format", "safetensors", "--dtype", "fp32", "-o", tmp / "out.safetensors"]}[cmd]


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_damaged_checkpoint_gives_one_clear_line(zygote, good_run, tmp_path, case):
    fname, damage, cmds, words = CKPT_CASES[case]
    cfg, step3 = _copy_run(good_run, tmp_path)
    marker = tmp_path / "PWNED"
    if damage is None:
        (step3 / fname).write_bytes(_evil_pickle(marker))
    else:
        damage(step3 / fname)
    lines = []
    for c in cmds:
        r = zygote.run(*_argv(c, cfg, step3, tmp_path))
        lines.append(f"{COMMANDS[c]}: " + no_traceback_one_line(r, *words))
    assert not marker.exists(), "the pickled code ran"
    assert not (tmp_path / "out.safetensors").exists()
    FIGURES.setdefault("bad_inputs", {})[f"checkpoint: {case}"] = lines


def test_a_checkpoint_that_does_not_fit_in_memory_is_not_called_damaged(zygote, good_run, tmp_path):
    """Reading a sound checkpoint with too little memory left (an official 7B .pth on a laptop, say) ends in one
    line that says so, for every command that reads one; until now safetensors' ENOMEM was reported as a
    truncated or corrupted file. The address space may grow by only 64 KiB while the file is opened, so mapping
    the ~180 KB weights really fails. Nothing is written, and with memory again the run resumes."""
    cfg, step3 = _copy_run(good_run, tmp_path)
    before = file_hashes(step3)
    lines = []
    for c in "trge":
        r = zygote.run(*_argv(c, cfg, step3, tmp_path), memory_at_read=64 * 1024)
        line = no_traceback_one_line(r, "out of memory reading", str(step3 / "model.safetensors"))
        assert "corrupt" not in line and "truncated" not in line, line
        lines.append(f"{COMMANDS[c]}: {line}")
    _assert_untouched(step3, before)
    assert not (tmp_path / "out.safetensors").exists()
    # The same weights as a .pth state dict, as official RWKV-LM checkpoints come (torch.load maps it): the same.
    pth = tmp_path / "weights.pth"
    torch.save(ckpt.load_model_state(step3), pth)
    r = zygote.run("generate", pth, "-p", "The", "-n", "2", "--device", "cpu", memory_at_read=64 * 1024)
    lines.append("generate (.pth): " + no_traceback_one_line(r, "out of memory reading", str(pth)))
    r = zygote.run("train", cfg, "--resume")
    assert r.rc == 0 and "resumed at step 3" in r.stdout, r.describe()
    FIGURES.setdefault("bad_inputs", {})["checkpoint: sound, but out of memory while reading it"] = lines


def test_checkpoint_of_another_model_shape(zygote, good_run, tmp_path):
    cfg, step3 = _copy_run(good_run, tmp_path)
    r = zygote.run("train", cfg, "--resume", "model.hidden_size=64")
    line = no_traceback_one_line(r, str(step3), "does not match", "(31, 32)", "(31, 64)")
    r2 = zygote.run("train", cfg, "--resume", "model.num_layers=3")
    line2 = no_traceback_one_line(r2, str(step3), "does not match", "missing")
    FIGURES.setdefault("bad_inputs", {})["checkpoint: other model shape"] = [line, line2]


def test_not_a_checkpoint_at_all(zygote, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    lines = []
    for target in (empty, tmp_path / "missing", text):
        for c in "rge":
            r = zygote.run(*_argv(c, tmp_path / "unused.yaml", target, tmp_path))
            lines.append(f"{COMMANDS[c]}: " + no_traceback_one_line(r, str(target)))
    FIGURES.setdefault("bad_inputs", {})["checkpoint: not a checkpoint"] = lines


def test_damaged_pointer_and_metrics_do_not_block_resume(zygote, good_run, tmp_path):
    """A garbage `latest` falls back to the newest complete checkpoint; a metrics line cut off by a full disk
    or a kill does not stop the resume."""
    cfg, step3 = _copy_run(good_run, tmp_path)
    run_dir = step3.parent.parent
    (step3.parent / "latest").write_bytes(b"\xff\x00../../etc\n")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    r = zygote.run("train", cfg, "--resume")
    assert r.rc == 0 and "resumed at step 3" in r.stdout and "Traceback" not in r.stderr, r.describe()
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_resuming_a_finished_run_does_nothing(zygote, good_run, tmp_path):
    """Kaggle re-running a notebook whose run already finished: `--resume` at max_steps is a no-op."""
    cfg, step3 = _copy_run(good_run, tmp_path)
    before = file_hashes(step3)
    r = zygote.run("train", cfg, "--resume", "train.max_steps=3")
    assert r.rc == 0 and "Traceback" not in r.stderr and "resumed at step 3" in r.stdout, r.describe()
    assert file_hashes(step3) == before


DATA_CASES = {
    "empty file": (b"", {}, ["the file is empty"]),
    "binary file": (bytes(range(256)) * 20, {}, ["binary"]),
    "not UTF-8": (("caf\xe9 na\xefve " * 300).encode("latin-1"), {}, ["not valid utf-8", "data.encoding"]),
    "shorter than one sequence": (b"hello world", {}, ["train.seq_len"]),
    "token ids beyond the vocabulary": (b"zzzz yyyy " * 300, {"data.tokenizer": "byte", "model.vocab_size": 100},
                                        ["token id 122", "vocab_size=100"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file_gives_one_clear_line(zygote, tmp_path, case):
    content, overrides, words = DATA_CASES[case]
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    cfg = write_config(tmp_path, tmp_path / "run")
    args = [f"data.source={data}", "train.max_steps=1", *(f"{k}={v}" for k, v in overrides.items())]
    r = zygote.run("train", cfg, *args)
    line = no_traceback_one_line(r, str(data), *words)
    FIGURES.setdefault("bad_inputs", {})[f"data: {case}"] = [line]


YAML_CASES = {
    "a list, not a mapping": (b"- model\n- train\n", ["expected a mapping"]),
    "a scalar, not a mapping": (b"hello\n", ["expected a mapping"]),
    "empty file": (b"", ["empty"]),
    "syntax error": (b"model: {hidden_size: 32\ntrain: x\n", ["line 2", "YAML syntax error"]),
    "tab indentation": (b"model:\n\thidden_size: 32\n", ["line 2", "YAML syntax error"]),
    "not UTF-8": (b"name: \xff\xfe\n", ["UTF-8"]),
    "unknown key": (b"train: {lrr: 1}\n", ["train.lrr", "did you mean"]),
    "wrong type": (b"train: {lr: fast}\n", ["train.lr"]),
    "section not a mapping": (b"model: 3\n", ["model"]),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_yaml_gives_one_clear_line(zygote, tmp_path, case):
    content, words = YAML_CASES[case]
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    r = zygote.run("train", cfg)
    line = no_traceback_one_line(r, str(cfg), *words)
    FIGURES.setdefault("bad_inputs", {})[f"config: {case}"] = [line]


def test_config_path_problems(zygote, tmp_path):
    lines = []
    for target in (tmp_path / "missing.yaml", tmp_path):
        r = zygote.run("train", target)
        lines.append(no_traceback_one_line(r, str(target)))
    FIGURES.setdefault("bad_inputs", {})["config: missing file / a directory"] = lines


# ------------------------------------------------------------------------------------------------
# Numerical faults
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_persistent_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(zygote, tmp_path, precision):
    """fp16 too: its loss scaler skips a NaN step, but a NaN loss comes from the forward pass, which no loss scale
    cures (before, an fp16 run went on skipping every step to max_steps, saving the diverged weights)."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, run_dir, max_steps=2, precision=precision)
    r = zygote.run("train", cfg, "checkpoint.every_steps=2")
    assert r.rc == 0, r.describe()
    good = run_dir / "checkpoints" / "step-00000002"
    before = file_hashes(good)
    # lr 1e30: step 3's update throws the weights to ~1e30; from step 4 on the loss is NaN.
    r = zygote.run("train", cfg, "--resume", "train.lr=1e30", "train.warmup_steps=0", "train.max_steps=12",
                   "checkpoint.every_steps=2")
    line = no_traceback_one_line(r, "loss is not finite for 3 steps in a row (step 6)", "step-00000002")
    assert ckpt.latest_checkpoint(run_dir / "checkpoints") == good, os.listdir(run_dir / "checkpoints")
    assert file_hashes(good) == before
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] is None and recs[-1]["skipped"]
    assert [r["skipped"] for r in recs if r["step"] > 2] == [False, True, True]  # (steps 3-5; step 6 stops)
    # The kept checkpoint resumes normally.
    r2 = zygote.run("train", cfg, "--resume", "train.max_steps=3")
    assert r2.rc == 0 and "resumed at step 2" in r2.stdout, r2.describe()
    FIGURES["nonfinite" if precision == "fp32" else "nonfinite_fp16"] = line


def test_fp16_loss_scale_floor_stops_the_run(zygote, tmp_path):
    """A skipped step that leaves fp16's loss scale below 1 stops the run (the gradients overflow fp16 even
    unscaled; without the floor the scale halved to 0 and the run skipped every step to the end). The run
    resumes from a checkpoint whose scale had already fallen to 2, so the floor is met before 3 NaN losses."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, run_dir, max_steps=2, precision="fp16")
    r = zygote.run("train", cfg, "checkpoint.every_steps=2")
    assert r.rc == 0, r.describe()
    good = run_dir / "checkpoints" / "step-00000002"
    state = torch.load(good / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] >= 2.0 ** 10  # fp16 on a CPU trains with a loss scaler (it starts at 2**16)
    state["scaler"]["scale"] = 2.0
    torch.save(state, good / "trainer_state.pt")
    before = file_hashes(good)
    # Step 3 (scale 2) throws the weights to ~1e30; steps 4 and 5 skip, halving the scale to 1, then 0.5.
    r = zygote.run("train", cfg, "--resume", "train.lr=1e30", "train.warmup_steps=0", "train.max_steps=12",
                   "checkpoint.every_steps=2")
    no_traceback_one_line(r, "skipped 2 step(s) in a row (step 5: gradients not finite)", "loss scale fell to 0.5, below 1",
                          "step-00000002")
    assert ckpt.latest_checkpoint(run_dir / "checkpoints") == good, os.listdir(run_dir / "checkpoints")
    assert file_hashes(good) == before


def test_detect_anomaly_runs(zygote, tmp_path):
    cfg = write_config(tmp_path, tmp_path / "run", max_steps=2)
    r = zygote.run("train", cfg, "train.detect_anomaly=true")
    assert r.rc == 0 and "Traceback" not in r.stderr, r.describe()


# ------------------------------------------------------------------------------------------------
# Secrets
# ------------------------------------------------------------------------------------------------

USER, KEY = "zq-user-51f0", "0123abcd-kaggle-key-9f8e7d6c5b4a"


def _embedded_files(path: Path, data: bytes):
    """(label, bytes) of every file inside base64 zips embedded in a notebook's cells."""
    if path.suffix != ".ipynb":
        return
    for cell in json.loads(data).get("cells", []):
        src = "".join(cell.get("source", [])) if isinstance(cell.get("source"), list) else cell.get("source", "")
        for blob in re.findall(r"[A-Za-z0-9+/=]{200,}", src):
            try:
                raw = base64.b64decode(blob, validate=True)
                with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                    for name in zf.namelist():
                        yield f"{path}!{name}", zf.read(name)
            except (ValueError, zipfile.BadZipFile):
                continue


def test_kaggle_credentials_never_leak(zygote, tmp_path):
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
    env = {"HOME": str(home), "KAGGLE_USERNAME": USER, "KAGGLE_KEY": KEY}
    unset = ["KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME"]
    work = tmp_path / "work"
    cfg = write_config(work, work / "run", max_steps=2)
    runs = [zygote.run("train", cfg, cwd=work, env=env, unset=unset)]
    assert runs[0].rc == 0, runs[0].describe()
    push_cfg = work / "push.yaml"  # Kaggle cannot see local files: the built-in corpus
    push_cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "out_dir": "runs/rel",
                                        "data": {"source": "builtin", "tokenizer": "byte"}}))
    runs.append(zygote.run("push", push_cfg, "--dry-run", "--out", work / "kernel", cwd=work, env=env, unset=unset))
    assert runs[1].rc == 0, runs[1].describe()
    # An API error (nothing listens on this port): its message must not carry the credentials either.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs.append(zygote.run("status", f"{USER}/kaggletrain-rel", "--timeout", "60", cwd=work,
                           env={**env, "KAGGLETRAIN_KAGGLE_ENDPOINT": f"http://127.0.0.1:{port}"}, unset=unset))
    assert runs[2].rc != 0 and "Traceback" not in runs[2].stderr, runs[2].describe()
    texts = [(f"stdout/stderr of `kaggletrain {name}`", (r.stdout + r.stderr).encode())
             for name, r in zip(("train", "push --dry-run", "status"), runs)]
    for p in sorted(q for q in work.rglob("*") if q.is_file()):
        data = p.read_bytes()
        texts.append((str(p), data))
        texts.extend(_embedded_files(p, data))
    for label, data in texts:
        assert KEY.encode() not in data, f"the Kaggle key appears in {label}"
        # The user name may appear only as the owner in a kernel id (owner/slug), which is public by design.
        assert USER.encode() not in data.replace(f"{USER}/".encode(), b""), f"the Kaggle user name appears in {label}"
    scanned = len(texts)
    assert scanned > 20
    FIGURES["secrets"] = {"scanned": scanned, "status_error": runs[2].stderr.strip()}


def teardown_module(module):
    path = os.environ.get("KAGGLETRAIN_RELIABILITY_REPORT")
    if path and FIGURES:
        Path(path).write_text(json.dumps(FIGURES, indent=2))
