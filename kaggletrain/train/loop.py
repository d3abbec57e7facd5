"""The training loop: config → data → model → steps → checkpoints, resumable and crash-safe.

`Trainer(cfg).fit()` runs a whole configured run. The pieces (`setup`, `train_step`, `evaluate`,
`save`) are separate so the dry run (train/dry_run.py) exercises the very same code.
Under torchrun every rank runs this; rank 0 alone logs, evaluates and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kaggletrain.config import RunConfig, save_config
from kaggletrain.errors import CheckpointError, ConfigError, KaggletrainError, RankFailed
from kaggletrain.train import checkpoint as ckpt
from kaggletrain.train.distributed import (DistInfo, all_reduce_sum, broadcast_object, cleanup,
                                           dist_info_from_env, init_distributed, optimizer_state_from_fqn,
                                           optimizer_state_mismatch, optimizer_state_to_fqn, raise_if_any_failed)
from kaggletrain.train.metrics import MetricsWriter, plot_loss
from kaggletrain.train.optim import build_optimizer, lr_at, set_lr
from kaggletrain.train.out_of_memory import describe, is_out_of_memory
from kaggletrain.train.precision import resolve_device, resolve_precision

MAX_NONFINITE_STEPS = 3
# fp16: a skipped step that leaves the loss scale below this stops the run. Below 1 the gradients overflow fp16
# even unscaled, and halving again cannot help (DeepSpeed's default floor is 1 too); without a floor the scale
# halves to 0 and the run skips every step to the end.
MIN_LOSS_SCALE = 1.0


class TrainingError(KaggletrainError):
    """The run cannot continue (non-finite loss, failed write); the last good checkpoint is kept."""


@dataclass
class StepResult:
    loss: float
    lr: float
    tokens: int
    seconds: float
    skipped: bool = False
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): wall >> CPU means a busy machine


@dataclass
class RunSummary:
    out_dir: str
    steps: int
    train_loss: Optional[float]
    val_loss: Optional[float]
    tokens_per_s: float
    elapsed_s: float
    checkpoint: Optional[str]
    stopped_by_signal: bool = False
    history: list = field(default_factory=list)


def resume_decision(out_dir: Path, latest: Optional[Path], resume) -> Optional[Path]:
    """The checkpoint a run starts from (None: a fresh start), given the latest one in its out_dir and the resume
    setting (True, False or "auto"); KaggletrainError when the run must not start. (The dry run asks too.)"""
    if latest is not None and resume is False:
        raise KaggletrainError(
            f"{out_dir}: already holds checkpoints ({latest.name}); pass --resume to continue it, "
            f"or choose another name/out_dir (nothing was overwritten)")
    if latest is None and resume is True:
        raise KaggletrainError(f"--resume: no checkpoint found under {Path(out_dir) / 'checkpoints'}")
    return latest


class Trainer:
    def __init__(self, cfg: RunConfig, *, resume: Optional[bool] = None, progress: Optional[bool] = None,
                 dist: Optional[DistInfo] = None):
        self.cfg = cfg
        self.dist = dist or dist_info_from_env()
        self.resume = cfg.checkpoint.resume if resume is None else resume
        self.show_progress = cfg.logging.progress if progress is None else progress
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self._stop_signal: Optional[int] = None   # a signal this process received
        self._stop_agreed = False                   # some rank received one: every rank stops after this step
        self.stop_signal_agreed: Optional[int] = None  # that signal (SIGTERM if any rank got one): the exit status
        self._compile_ok = False                    # a compiled (train.compile) step has succeeded
        self._eval_pending = False                  # this step's evaluation was due but skipped (a stop signal)

    # ------------------------------------------------------------------------------------------
    def setup(self, *, out_dir_writable: bool = True, checkpoint_follows: bool = False) -> "Trainer":
        """`checkpoint_follows`: the caller loads a checkpoint next (eval, the dry run of a resume)."""
        cfg, t = self.cfg, self.cfg.train
        self.device = resolve_device(t.device, self.dist.local_rank)
        init_distributed(self.dist, self.device)
        self.accum = cfg.validate_for_world_size(self.dist.world_size)
        self.micro = t.micro_batch(self.dist.world_size)
        self.precision = resolve_precision(t.precision, self.device)
        if self.precision.name == "bf16" and self.device.type == "cuda":
            from kaggletrain.train.precision import native_bf16

            if not native_bf16(self.device):
                raise ConfigError("train.precision: bf16 requested but this GPU has no native bf16 "
                                  "(T4/sm_75): use fp16 or auto")
        torch.manual_seed(t.seed)
        self._prepare_data()
        latest = self._checkpoint_to_resume() if out_dir_writable else None
        # A checkpoint holds every weight, so model.init_from is not read before one is loaded: its file may be
        # gone by then (a fine-tune whose base came from /kaggle/input, pulled home).
        self._build_model(init_from=not (checkpoint_follows or latest))
        if out_dir_writable:
            self._resume_or_start(latest)
        return self

    def _prepare_data(self) -> None:
        from kaggletrain.data import WindowSampler, prepare_data

        # Each node's local rank 0 tokenises (and fills its cache) first; the others then read the cache
        # (the cache is locked per entry, so nodes sharing one file system also work).
        first = self.dist.local_rank == 0
        error = None
        if first:
            try:
                self.data = prepare_data(self.cfg.data, seq_len=self.cfg.train.seq_len,
                                         progress=self.show_progress and self.dist.is_main)
            except KaggletrainError as e:
                error = e
        raise_if_any_failed(error, self.dist)  # also the barrier: the others read the filled cache
        if not first:
            self.data = prepare_data(self.cfg.data, seq_len=self.cfg.train.seq_len, progress=False)
        self.tokenizer = self.data.tokenizer
        self.model_config = self.cfg.model_config(vocab_size=self.tokenizer.vocab_size)
        self.data.check_vocab(self.model_config.vocab_size)  # uses the max id stored with the cache
        self.sampler = WindowSampler(self.data.train_tokens, self.cfg.train.seq_len,
                                     global_batch=self.cfg.train.batch_size, seed=self.cfg.train.seed,
                                     rank=self.dist.rank, world_size=self.dist.world_size)

    def _build_model(self, init_from: bool = True) -> None:
        from kaggletrain.model import RWKVModel

        cfg, t = self.cfg, self.cfg.train
        model = RWKVModel(self.model_config)
        if init_from and cfg.model.get("init_from"):
            self._init_from(model, cfg.model["init_from"])
        if t.state_tuning:
            if not self.model_config.rwkv_use_learnable_states:
                raise ConfigError("train.state_tuning: needs model.rwkv_use_learnable_states: true")
            for name, p in model.named_parameters():
                p.requires_grad_(name.endswith(("time_state", "shift_state")))
        if t.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if self.precision.amp_dtype is not None:
            model.enable_mixed_precision(self.precision.amp_dtype)
        if t.compile:
            if self.device.type != "cuda":
                raise ConfigError(f"train.compile: true needs a CUDA device (got device '{self.device.type}'); "
                                  "on CPU, compiling takes minutes and is not supported here")
            model.compile_for_training()
        self.fsdp = self.dist.enabled and t.distributed == "fsdp"
        if self.fsdp:
            from kaggletrain.train.fsdp import apply_fsdp

            model = apply_fsdp(model, self.device)  # moves each shard to the device as it goes
        else:
            model.to(self.device)
        self.model = model
        self.ddp_model = model  # what train_step calls: the DDP wrapper, or the (FSDP-sharded) model
        if self.dist.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Every trainable parameter gets a gradient in every backward (the first RWKV layer's unused
            # value-residual LoRA is frozen; learnable states are used by the first chunk), so no
            # find_unused_parameters. Per-rank differences in chunk count don't matter: DDP reduces each
            # parameter's accumulated gradient once per backward, in buckets ordered as on rank 0.
            self.ddp_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = build_optimizer(model, t.lr, t.weight_decay, t.betas, t.eps, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)
        self.step = 0

    def _init_from(self, model, path: str) -> None:
        try:
            from kaggletrain.interop import load_state_dict_any
        except ImportError:
            load_state_dict_any = None
        p = Path(path)
        try:
            if load_state_dict_any is not None:
                sd = load_state_dict_any(p)
            else:
                target = ckpt.latest_checkpoint(p / "checkpoints") or ckpt.latest_checkpoint(p) or p
                sd = ckpt.load_model_state(target)
        except KaggletrainError as e:  # the reader names the file; the key says where it came from
            raise type(e)(f"model.init_from: {e}") from None
        own = model.state_dict()
        missing = [k for k in own if k not in sd and not k.endswith(("time_state", "shift_state", "att.v0",
                                                                    "att.v1", "att.v2"))]
        shape_bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or shape_bad:
            what = f"missing {missing[:3]}" if missing else \
                f"{shape_bad[0]} has shape {tuple(sd[shape_bad[0]].shape)}, model expects {tuple(own[shape_bad[0]].shape)}"
            raise CheckpointError(f"model.init_from: {path}: does not fit this model ({what})")
        model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)

    # ------------------------------------------------------------------------------------------
    def _checkpoint_to_resume(self) -> Optional[Path]:
        """The checkpoint this run starts from (None: a fresh start). Rank 0 decides (its file system holds the
        checkpoints); every rank then acts alike."""
        latest = ckpt.latest_checkpoint(self.ckpt_root) if self.dist.is_main else None
        if self.dist.enabled:
            latest = broadcast_object(str(latest) if latest else None, self.dist)
            latest = Path(latest) if latest else None
        return resume_decision(self.out_dir, latest, self.resume)

    def _resume_or_start(self, latest: Optional[Path]) -> None:
        if latest is not None:
            self.load(latest)
        error = None
        if self.dist.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.out_dir / "config.yaml")
                (self.out_dir / "tokenizer.json").write_text(json.dumps(self.tokenizer.to_dict()))
            except OSError as e:
                error = TrainingError(f"{self.out_dir}: cannot write the run directory ({e.strerror or e})")
        raise_if_any_failed(error, self.dist)

    def load(self, ckpt_dir: Path) -> None:
        """Load a checkpoint. Under torchrun rank 0 alone reads the files and broadcasts (weights, optimizer
        state, step, data position), whatever the number of processes or DDP/FSDP layout that wrote it."""
        ckpt_dir = Path(ckpt_dir)
        reader = self.dist.is_main or not self.dist.enabled
        sd, state, problem = {}, None, None
        if reader:
            try:
                meta = ckpt.read_meta(ckpt_dir)
                sd = ckpt.load_model_state(ckpt_dir)
                state = ckpt.load_trainer_state(ckpt_dir)
                problem = self._state_mismatch(ckpt_dir, sd)
                if problem is None and state and state.get("sampler") is not None:  # (before anything is loaded)
                    problem = self.sampler.state_mismatch(state["sampler"])
                    problem = problem and (f"{ckpt_dir}: {problem}; resume with the data and config that wrote "
                                           f"it, or start a new run from its weights: model.init_from={ckpt_dir}")
                if problem is None and state and state.get("optimizer") is not None:
                    why = optimizer_state_mismatch(self.model, self.optimizer, state["optimizer"])
                    if why:  # (before any collective: every rank then stops alike)
                        problem = (f"{ckpt_dir}: its optimizer state does not fit this run's trainable parameters "
                                   f"({why}); resume with the train settings that wrote it (e.g. train.weight_decay,"
                                   f" train.state_tuning), or start a new run from its weights: "
                                   f"model.init_from={ckpt_dir}")
            except KaggletrainError as e:
                if not self.dist.enabled:
                    raise
                problem = str(e)
            if problem is None:
                state = state if state is not None else {}
                state.setdefault("step", int(meta.get("step", 0)))
                state["eval_pending"] = bool(meta.get("eval_pending", False))
        if self.dist.enabled:
            problem = broadcast_object(problem, self.dist)
        if problem is not None:
            raise CheckpointError(problem)
        optim_state = state.pop("optimizer", None) if state is not None else None
        if self.dist.enabled:
            from kaggletrain.train.fsdp import load_model_state_from_rank0, load_optimizer_state_from_rank0

            state = broadcast_object(state, self.dist)
            has_optim = broadcast_object(optim_state is not None, self.dist)
            load_model_state_from_rank0(self.model, sd)
            if has_optim:
                fqn = optimizer_state_to_fqn(self.model, self.optimizer, optim_state) if reader else {}
                load_optimizer_state_from_rank0(self.model, self.optimizer, fqn)
        else:
            self.model.load_state_dict(sd)
            if optim_state is not None:
                self.optimizer.load_state_dict(optimizer_state_from_fqn(self.model, self.optimizer, optim_state))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("rng") is not None:
            ckpt.set_rng_state(state["rng"])
        if state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.step = int(state.get("step", 0))
        self._eval_pending = bool(state.get("eval_pending", False))
        self.resumed_from = ckpt_dir

    def _state_mismatch(self, ckpt_dir: Path, sd: dict) -> Optional[str]:
        own = self.model.state_dict()  # FSDP: DTensors, whose .shape is the full shape
        bad = [k for k in own if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape)]
        if not bad:
            return None
        k = bad[0]
        found = "missing" if k not in sd else f"shape {tuple(sd[k].shape)}"
        return (f"{ckpt_dir}: checkpoint does not match this config's model "
                f"({k}: {found}, expected {tuple(own[k].shape)})")

    def save(self) -> Optional[Path]:
        """Write a checkpoint (rank 0; under FSDP every rank first helps gather the full state); every rank
        returns its path once it is written."""
        c = self.cfg.checkpoint
        if self.fsdp:
            from kaggletrain.train.fsdp import gather_model_state, gather_optimizer_state

            model_state = gather_model_state(self.model)
            optim_state = gather_optimizer_state(self.model, self.optimizer) if c.save_optimizer else None
        elif self.dist.is_main:
            model_state = self.model.state_dict()
            optim_state = optimizer_state_to_fqn(self.model, self.optimizer, self.optimizer.state_dict()) \
                if c.save_optimizer else None
        if not self.dist.is_main:  # wait for rank 0's write; every rank gets the path (e.g. for load())
            return Path(broadcast_object(None, self.dist))
        trainer_state = {
            "step": self.step,
            "optimizer": optim_state,  # keyed by parameter name: resumes under any layout/world size
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": ckpt.rng_state(),
            "sampler": self.sampler.state_dict(),
            "world_size": self.dist.world_size,
            "distributed": "fsdp" if self.fsdp else ("ddp" if self.dist.enabled else "none"),
        }
        import yaml

        try:
            path = ckpt.save_checkpoint(
                self.ckpt_root, self.step, model_state=model_state,
                meta=ckpt.model_meta(self.model_config.to_dict(), self.step, {"precision": self.precision.name,
                                                                               "eval_pending": self._eval_pending}),
                trainer_state=trainer_state, run_config_yaml=yaml.safe_dump(self.cfg.to_dict(), sort_keys=False),
                tokenizer=self.tokenizer.to_dict(), keep_last=c.keep_last)
        except OSError as e:
            if is_out_of_memory(e):
                raise
            raise TrainingError(f"{self.ckpt_root}: checkpoint write failed ({e.strerror or e}); "
                                f"the previous checkpoint is intact") from None
        broadcast_object(str(path), self.dist)
        return path

    # ------------------------------------------------------------------------------------------
    def _forward_loss(self, x, y):
        t = self.cfg.train
        out = self.ddp_model(x, labels=y, shift_labels=False, use_chunking=t.use_chunking,
                             return_logits=False, bptt=t.bptt, l2wrap=t.l2wrap)
        return out.loss

    def train_step(self) -> StepResult:
        return self._compile_fallback(self._train_step)

    def _compile_fallback(self, fn):
        """Runs `fn`; with train.compile, a failure of torch.compile (no working Triton or C compiler, a
        graph inductor cannot lower, a wrong compiled gradient) turns compiling off with one warning and runs
        `fn` again eagerly, as the CUDA kernel's loader falls back to PyTorch. Until the first compiled step
        has succeeded any error counts (the eager retry raises it again if it is not the compiler's);
        after that, torch.compile's own errors (recompiling for a new shape, evaluation)."""
        if not self.model.compiled:
            return fn()
        try:
            out = fn()
        except Exception as e:
            if is_out_of_memory(e) or (self._compile_ok and not isinstance(e, torch._dynamo.exc.TorchDynamoException)):
                raise
            root = e  # BackendCompilerFailed wraps what the compiler raised
            while getattr(root, "inner_exception", None) or root.__cause__:
                root = getattr(root, "inner_exception", None) or root.__cause__
            first = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), "")[:300]
            warnings.warn(f"train.compile: torch.compile failed ({type(root).__name__}: {first}); training goes "
                          f"on without compiling (eager mode, slower)", RuntimeWarning, stacklevel=2)
            self.model.uncompile()
            self.optimizer.zero_grad(set_to_none=True)  # what the failed step's backward may have added
            return fn()
        self._compile_ok = True
        return out

    def _train_step(self) -> StepResult:
        t = self.cfg.train
        t0, c0 = time.perf_counter(), time.process_time()
        lr = lr_at(self.step, lr=t.lr, min_lr=t.final_lr(), warmup=t.warmup_steps, total=t.max_steps,
                   schedule=t.lr_schedule)
        set_lr(self.optimizer, lr)
        x, y = self.sampler.batch(self.step)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        total = torch.zeros((), device=self.device)
        for i in range(self.accum):
            xs, ys = x[i * self.micro:(i + 1) * self.micro], y[i * self.micro:(i + 1) * self.micro]
            sync = contextlib.nullcontext()
            if self.dist.enabled and not self.fsdp and i < self.accum - 1:
                sync = self.ddp_model.no_sync()  # DDP: all-reduce only in the last micro-step's backward
            # FSDP reduce-scatters every micro-step: unsharded accumulated gradients would cost a full copy.
            with sync:
                loss = self._forward_loss(xs, ys) / self.accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        # One all-reduce carries the loss and the stop flag: a signal received by any rank stops every
        # rank after this same step (no rank is left waiting in a collective).
        # Which signal each rank got travels too, so that every rank exits with the same status (SIGTERM's
        # if any rank got one: a scheduler's stop outranks a Ctrl-C).
        got = [float(self._stop_signal == sig) for sig in (signal.SIGTERM, signal.SIGINT)]
        packed = torch.cat([total.float().reshape(1), torch.tensor(got, device=self.device)])
        packed = all_reduce_sum(packed, self.dist).tolist()
        loss_val = packed[0] / self.dist.world_size
        if packed[1] > 0 or packed[2] > 0:
            self._stop_agreed = True
            self.stop_signal_agreed = self.stop_signal_agreed or int(signal.SIGTERM if packed[1] > 0 else signal.SIGINT)
        skipped = not math.isfinite(loss_val)  # no update from a non-finite loss, with a scaler or without
        if skipped and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if t.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if scale_before is not None and self.scaler.get_scale() < scale_before:
                skipped = True  # fp16 overflow: GradScaler skipped this step and lowered the scale
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepResult(loss_val, lr, x.numel() * self.dist.world_size, time.perf_counter() - t0, skipped,
                          time.process_time() - c0)

    def evaluate(self, batches: Optional[int] = None, *, max_micro_batches: Optional[int] = None) -> Optional[float]:
        return self._compile_fallback(lambda: self._evaluate(batches, max_micro_batches))

    def eval_windows(self, batches: Optional[int] = None, max_micro_batches: Optional[int] = None) -> Optional[list]:
        """The micro-batches (x, y) of one evaluation, all ranks' in order (rank r of W takes r, r + W, ...); None
        without a validation split. An evaluation covers `batches` (default train.eval_batches) global batches of
        train.batch_size fixed windows (fewer if the split is shorter): the same windows, and so the same loss,
        whatever train.micro_batch_size (a memory setting) or the number of processes. `max_micro_batches`: at
        most this many micro-batches per rank (the dry run's check that one runs and fits)."""
        from kaggletrain.data import eval_batches

        t = self.cfg.train
        val = self.data.val_tokens
        if val is None or len(val) < t.seq_len + 1:
            return None
        count = (batches or t.eval_batches) * t.batch_size // self.micro  # batch_size is a multiple of micro x W
        if max_micro_batches:
            count = min(count, max_micro_batches * self.dist.world_size)
        return eval_batches(val, t.seq_len, self.micro, count)

    @torch.no_grad()
    def _evaluate(self, batches: Optional[int] = None, max_micro_batches: Optional[int] = None) -> Optional[float]:
        """Mean validation loss over the fixed windows of `eval_windows` (the same at every evaluation).

        Under torchrun every rank must call it: each evaluates its share of the micro-batches and the sums are
        all-reduced (FSDP: every rank runs the same number of forward passes, as its collectives need)."""
        t = self.cfg.train
        windows = self.eval_windows(batches, max_micro_batches)
        if windows is None:
            return None
        W, r = self.dist.world_size, self.dist.rank
        mine = [(windows[i], 1.0) for i in range(r, len(windows), W)]
        if self.fsdp:  # pad with zero-weight passes so that every rank joins every all-gather
            mine += [(windows[0], 0.0)] * (-(-len(windows) // W) - len(mine))
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for (x, y), weight in mine:
                x, y = x.to(self.device), y.to(self.device)
                out = self.model(x, labels=y, shift_labels=False, use_chunking=t.use_chunking, return_logits=False)
                sums[0] += out.loss.double() * out.num_targets * weight
                sums[1] += out.num_targets * weight
        finally:
            self.model.train()
        total, count = all_reduce_sum(sums, self.dist).tolist()
        return total / max(count, 1)

    # ------------------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return []
        previous = []

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous.append((sig, signal.signal(sig, handler)))
        return previous

    def fit(self) -> RunSummary:
        cfg, t = self.cfg, self.cfg.train
        if not hasattr(self, "model"):
            self.setup()
        if self.device.type == "cpu" and self.step < t.max_steps:
            self._check_host_memory()
        is_main = self.dist.is_main
        start_step = self.step
        metrics = MetricsWriter(self.out_dir / "metrics.jsonl",
                                self.out_dir / "tensorboard" if cfg.logging.tensorboard else None,
                                resume_from_step=start_step) if is_main else None
        previous = self._install_signal_handlers()
        if t.detect_anomaly:
            torch.autograd.set_detect_anomaly(True)
        history, last_ckpt, val_loss, train_loss = [], None, None, None
        tokens_done, time_done = 0, 0.0
        nonfinite = skipped_run = 0  # consecutive steps with a non-finite loss / skipped by the scaler
        t_start = time.perf_counter()
        progress = _Progress(enabled=is_main and self.show_progress, total=t.max_steps, start=start_step,
                             name=cfg.name)
        try:
            with progress:
                if self._eval_pending:  # a stop signal came before this step's evaluation: run it first
                    with self._out_of_memory_as_error(f"the evaluation after step {self.step}", None):
                        val_loss = self.evaluate()
                    self._eval_pending = False
                    if is_main:
                        metrics.add_to_step({"step": self.step, "val_loss": val_loss})
                while self.step < t.max_steps:
                    with self._out_of_memory_as_error(f"training step {self.step + 1}", last_ckpt):
                        res = self.train_step()
                    # (fp16's scaler skips a non-finite loss too, but cannot cure one: it comes from the forward
                    # pass, which the loss scale does not touch)
                    nonfinite = 0 if math.isfinite(res.loss) else nonfinite + 1
                    skipped_run = skipped_run + 1 if res.skipped else 0
                    if nonfinite >= MAX_NONFINITE_STEPS:
                        raise self._diverged(nonfinite, is_main, f"loss is not finite for {nonfinite} steps in a "
                                             f"row (step {self.step})")
                    if res.skipped and self.loss_scale_too_low():
                        raise self._diverged(skipped_run, is_main, (
                            f"fp16's loss scaler skipped {skipped_run} step(s) in a row (step {self.step}: gradients "
                            f"not finite) and the loss scale fell to {self.scaler.get_scale():g}, below "
                            f"{MIN_LOSS_SCALE:g}: halving it again cannot help"))
                    if self.step > start_step + 1 or self.step == t.max_steps:  # first step includes warm-up
                        tokens_done += res.tokens
                        time_done += res.seconds
                    tps = tokens_done / time_done if time_done > 0 else res.tokens / max(res.seconds, 1e-9)
                    if math.isfinite(res.loss):
                        train_loss = res.loss
                    # "time" (unix seconds at the step's end) lines the log up with other processes' logs.
                    record = {"step": self.step, "time": round(time.time(), 3), "loss": res.loss, "lr": res.lr,
                              "tokens_per_s": round(tps, 1), "step_s": round(res.seconds, 4),
                              "step_cpu_s": round(res.cpu_seconds, 4), "skipped": res.skipped}
                    due = self.step == t.max_steps or (t.eval_interval > 0 and self.step % t.eval_interval == 0)
                    do_eval = due and not self._stop_agreed
                    self._eval_pending = due and not do_eval  # saved with the checkpoint: a resume evaluates first
                    if do_eval:  # every rank evaluates its share; rank 0 logs
                        with self._out_of_memory_as_error(f"the evaluation after step {self.step}", last_ckpt):
                            val_loss = self.evaluate()
                        record["val_loss"] = val_loss
                    if is_main and (self.step % cfg.logging.log_interval == 0 or due):
                        metrics.log(record)
                    history.append(record)
                    progress.update(self.step, res.loss, res.lr, tps, val_loss)
                    every = cfg.checkpoint.every_steps
                    if nonfinite == 0 and ((every and self.step % every == 0) or self.step == t.max_steps
                                           or self._stop_agreed):
                        with self._out_of_memory_as_error(f"the checkpoint save at step {self.step}", last_ckpt):
                            last_ckpt = self.save()  # never from weights that just gave a non-finite loss
                    if self._stop_agreed:
                        if is_main:
                            why = (f"signal {self._stop_signal}" if self._stop_signal
                                   else "a stop signal on another rank")
                            progress.note(f"received {why}: checkpoint saved at step {self.step}")
                        break
        finally:
            for sig, prev in previous:
                signal.signal(sig, prev)
            if t.detect_anomaly:
                torch.autograd.set_detect_anomaly(False)
            if metrics is not None:
                metrics.close()
        if is_main and cfg.logging.plot:
            plot_loss(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
        elapsed = time.perf_counter() - t_start
        summary = RunSummary(str(self.out_dir), self.step, train_loss, val_loss,
                             tokens_done / time_done if time_done else 0.0, elapsed,
                             str(last_ckpt) if last_ckpt else None, self._stop_agreed, history)
        if is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(
                {k: v for k, v in summary.__dict__.items() if k != "history"}, indent=2))
        return summary

    def _check_host_memory(self) -> None:
        """A CPU step that does not fit is killed by Linux part-way, with nothing said: rehearsed first
        (train/host_memory.py), and refused with one line that names a micro batch that fits."""
        from kaggletrain.train.dry_run import suggestion_text
        from kaggletrain.train.host_memory import check_step_fits

        notes = []
        host = check_step_fits(self, notes)
        for note in notes:
            warnings.warn(note)
        if host:  # (every rank has rank 0's verdict: each stops; rank 0 alone prints it)
            message = f"{host['problem']}; {suggestion_text(host['suggestion'])}"
            raise RankFailed(message) if not self.dist.is_main else TrainingError(message)

    def loss_scale_too_low(self) -> bool:
        """fp16: the loss scale fell below MIN_LOSS_SCALE, where a run stops (the dry run says so too)."""
        return self.scaler.is_enabled() and self.scaler.get_scale() < MIN_LOSS_SCALE

    def _diverged(self, bad_steps: int, is_main: bool, what: str) -> TrainingError:
        """The error that stops a run whose last `bad_steps` steps went wrong. The weights saved at step s gave
        the loss of step s + 1: the checkpoints from the step before the first bad one on are set aside, never
        resumed from."""
        first_bad = self.step - bad_steps + 1
        keep = ckpt.quarantine_from(self.ckpt_root, first_bad - 1) if is_main else None
        fp32 = "train.precision=fp32 (or bf16 on a GPU that has it)" if self.precision.name == "fp16" else \
            "train.precision=fp32"
        return TrainingError(f"{what}; stopped. Last good checkpoint: {keep or 'none yet'}. Try a lower train.lr, "
                             f"{fp32}, or train.detect_anomaly=true")

    @contextlib.contextmanager
    def _out_of_memory_as_error(self, where: str, last_ckpt):
        """An out-of-memory error inside becomes one line for a run that does not fit the device: what ran out,
        with which settings, and how to find settings that fit (the dry run's batch search)."""
        try:
            yield
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            t = self.cfg.train
            raise TrainingError(
                f"out of memory in {where} on {self.device} (train.micro_batch_size={self.micro} x train.seq_len="
                f"{t.seq_len}, {self.precision.name}): {describe(e)}. `kaggletrain train {self.cfg.source or 'CONFIG'}"
                f" --dry-run` finds a micro batch that fits; train.gradient_checkpointing=true or "
                f"train.use_chunking=true also cut activation memory. Last checkpoint: "
                f"{last_ckpt or 'none from this run'}") from e

    def close(self) -> None:
        cleanup(self.dist)


class _Progress:
    """A rich progress bar (step, loss, lr, tokens/s, ETA) or plain log lines when disabled/not a TTY."""

    def __init__(self, enabled: bool, total: int, start: int, name: str):
        self.enabled, self.total, self.start = enabled, total, start
        self.name = name
        self._p = None
        self._last_print = 0.0

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._p.__enter__()
            self._task = self._p.add_task(self.name, total=self.total, completed=self.start, info="")
        return self

    def update(self, step, loss, lr, tps, val_loss):
        info = f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s" + (f" val {val_loss:.4f}" if val_loss else "")
        if self._p is not None:
            self._p.update(self._task, completed=step, info=info)

    def note(self, text: str) -> None:
        if self._p is not None:
            self._p.console.print(text)
        else:
            print(text, flush=True)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False
