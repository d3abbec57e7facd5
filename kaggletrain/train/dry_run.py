"""`kaggletrain train CONFIG --dry-run`: the real training path for a few steps, in a temporary directory.

Answers before any GPU quota is spent: does it fit, how fast is it, what will the whole run cost.
The run directory named by the config is never touched.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kaggletrain.errors import KaggletrainError, first_line
from kaggletrain.train.memory_rehearsal import rehearse_trainer_step
from kaggletrain.train.out_of_memory import describe, is_out_of_memory

KAGGLE_SESSION_HOURS = 12.0
T4_MEMORY_GB = 16.0
# Optimizer-state bytes per trainable parameter: fp32 weight + grad + AdamW exp_avg + exp_avg_sq.
BYTES_PER_TRAINABLE = 16
BYTES_PER_FROZEN = 4
BUSY_CPU_SHARE = 0.7


def _rss_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _attention_backend(device: torch.device, has_attention: bool) -> str:
    if not has_attention:
        return "none (pure RWKV)"
    if device.type != "cuda":
        return "SDPA (CPU kernels)"
    flash = torch.backends.cuda.flash_sdp_enabled() and torch.cuda.get_device_capability(device)[0] >= 8
    return "SDPA (flash)" if flash else "SDPA (memory-efficient/math)"


def dry_run(cfg, steps: int = 10, _trial: bool = False, resume: bool | None = None) -> dict[str, Any]:
    """Run `steps` real training steps of `cfg` in a temporary directory and report (see module doc). `resume`:
    the command's --resume/--no-resume (None: the config's checkpoint.resume), for the start-up checks on the
    configured run directory, which is only read. `_trial`: a probe of the out-of-memory search -- steps only,
    no checkpoint, evaluation or nested search."""
    from kaggletrain.ops.wkv import resolve_impl
    from kaggletrain.train.host_memory import check_step_fits
    from kaggletrain.train.loop import Trainer

    steps = max(2, steps)
    warmup = min(2, steps - 1)
    start_problems, resume_from = ([], None) if _trial else real_run_start(cfg, resume)
    tmp = tempfile.TemporaryDirectory(prefix="kaggletrain-dry-")
    restore_sigterm = _sigterm_as_exit()  # so that the temporary directory goes too
    dcfg = copy.deepcopy(cfg)
    dcfg.out_dir = str(Path(tmp.name) / "run")
    dcfg.logging = dataclasses.replace(dcfg.logging, progress=False, tensorboard=False, plot=False)
    dcfg.checkpoint = dataclasses.replace(dcfg.checkpoint, resume=False)
    # A GPU config rehearsed on a machine without a GPU (a laptop before `kaggletrain push`): the steps run on
    # the CPU with one sequence each, which checks the whole path (data, model, loss, checkpoint, evaluation)
    # in seconds rather than hours (and without the GPU-sized micro batch exhausting the laptop's memory); the
    # T4 memory is rehearsed at the configured micro batch all the same. No run time is projected from the CPU.
    # (A real run here stops with an error.)
    on_cpu_instead = dcfg.train.device == "cuda" and not torch.cuda.is_available()
    if on_cpu_instead:
        # One sequence per process (under torchrun, one each), in the configured precision (fp16 with its loss
        # scaler, as on a T4); torch.compile needs the GPU.
        dcfg.train = dataclasses.replace(
            dcfg.train, device="cpu", batch_size=int(os.environ.get("WORLD_SIZE", "1")), micro_batch_size=1,
            compile=False)
    rss_before = _rss_peak_bytes()
    t_setup = time.perf_counter()
    trainer = Trainer(dcfg, resume=False, progress=False)
    if trainer.dist.enabled and not _trial:  # see kaggletrain/process.py; probes must free their memory
        from kaggletrain.process import hold_until_exit

        hold_until_exit(trainer)
    try:
        trainer.setup(checkpoint_follows=resume_from is not None)
        if resume_from is not None:  # the real run resumes: so does the rehearsal (the files are only read)
            stand_in_batch = trainer.sampler.global_batch
            if on_cpu_instead:  # the saved data stream is checked against the configured batch, not the stand-in's
                trainer.sampler.global_batch = cfg.train.batch_size
            try:
                trainer.load(resume_from)
            except KaggletrainError as e:
                start_problems.append(str(e))
            finally:
                trainer.sampler.global_batch = stand_in_batch
        start_step = trainer.step
        setup_s = time.perf_counter() - t_setup
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, cpu_times, losses = [], [], []
        ends = [time.time()]  # wall-clock ends of the steps: the measured window, to line up with other logs
        # On the CPU a step that does not fit is killed by the kernel, not refused: rehearsed first.
        host_notes = []
        host = check_step_fits(trainer, host_notes) if device.type == "cpu" and not _trial else None
        oom = host["problem"] if host else _run_steps(trainer, steps, times, cpu_times, losses, ends)
        if _trial:
            return {"out_of_memory": oom}
        t0 = time.perf_counter()
        val = None
        try:  # before the checkpoint round trip, whose host copies would count in a CPU process's peak
            if not host:  # (the evaluation batch is the step's micro batch, without gradients: it may not fit)
                val = trainer.evaluate(max_micro_batches=1)
        except Exception as e:  # evaluation at the configured batch may not fit either
            if not is_out_of_memory(e):
                raise
            val, oom = None, oom or f"out of memory in the evaluation batch: {describe(e)}"
            del e
            _release()
        eval_batch_s = time.perf_counter() - t0
        # The steps' and the evaluation's peak: a real run needs room for both.
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_peak_bytes()
        t0 = time.perf_counter()
        ckpt_oom = None  # the steps' activations are gone by now: a smaller micro batch would not help here
        try:
            trainer.load(trainer.save())
        except Exception as e:  # a process at its memory limit: what a real run's saves would meet too
            if not is_out_of_memory(e):
                raise
            ckpt_oom = f"out of memory in the checkpoint save and reload: {describe(e)}"
            del e
            _release()
        ckpt_s = time.perf_counter() - t0
        report = _report(cfg, trainer, times[warmup:], cpu_times[warmup:], losses, peak, rss_before, setup_s,
                         ckpt_s, eval_batch_s, val, oom, resolve_impl, start_step, ckpt_oom, on_cpu_instead)
        if ckpt_oom and not on_cpu_instead:  # (the stand-in's own warning covers this machine's memory)
            report["warnings"].append(
                "the checkpoint save and reload ran out of memory (the weights and optimizer state are copied to "
                "host memory and back); a real run's saves would too: free memory, or set "
                "checkpoint.save_optimizer=false to save the weights alone")
        report["warnings"] += host_notes
        report["resumes_from"] = str(resume_from) if resume_from is not None and not start_problems else None
        if on_cpu_instead:
            t4_said = ("the T4 memory is projected at the configured micro batch and precision"
                       if report["projected_t4_memory_gb"] is not None else "no T4 memory is projected (see below)")
            report["warnings"].insert(0, f"train.device=cuda, but no CUDA GPU is visible here: the steps ran on "
                                         f"the CPU, one sequence of {cfg.train.seq_len} tokens each, in "
                                         f"{trainer.precision.name}, to check the path; {t4_said}, and no run time "
                                         f"is projected (a real run here would stop)")
        # The run directory is this machine's (a Kaggle push starts from an empty one, and a local run stops at
        # once, costing nothing): warnings. What the steps met would stop the real run anywhere (exit 3).
        report["warnings"] += [f"the real run would stop at its start here: {p}" for p in start_problems]
        report["real_run_would_stop"] = report.pop("_would_stop")
        report["measured_window_unix"] = [ends[min(warmup, len(ends) - 1)], ends[-1]]
        world = trainer.dist.world_size
    finally:
        trainer.close()
        tmp.cleanup()
        restore_sigterm()
    if host and not on_cpu_instead:
        report["suggestion"] = host["suggestion"]
    elif oom and not on_cpu_instead:  # the steps or the evaluation batch: both shrink with the micro batch
        del trainer  # (a distributed run's trainer stays held: see above)
        _release()
        report["suggestion"] = _search_fitting_batch(cfg, world)
    return report


def real_run_start(cfg, resume: bool | None) -> tuple[list[str], Path | None]:
    """What the real run would do first with the configured run directory, found by reading it only: the errors
    it would stop with at once, and the checkpoint it would resume from (None: a fresh start)."""
    from kaggletrain.train.loop import resume_decision
    from kaggletrain.train import checkpoint as ckpt

    out_dir = Path(cfg.out_dir)
    resume = cfg.checkpoint.resume if resume is None else resume
    existing = next((p for p in (out_dir, *out_dir.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():  # (the real run's mkdir: "File exists", "Not a directory")
        why = "File exists" if existing == out_dir else f"Not a directory: {existing}"
        return [f"{out_dir}: cannot write the run directory ({why})"], None
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [f"{out_dir}: cannot write the run directory ({existing} is not writable)"], None
    latest = ckpt.latest_checkpoint(out_dir / "checkpoints") if out_dir.is_dir() else None
    try:
        return [], resume_decision(out_dir, latest, resume)
    except KaggletrainError as e:
        return [str(e)], None


def _sigterm_as_exit():
    """SIGTERM (a timeout, a stopped session) ends the dry run through its cleanup, as Ctrl-C does, with the
    signal's exit status; returns what restores the previous handler. Main thread only (else a no-op)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _run_steps(trainer, steps, times, cpu_times, losses, ends) -> str | None:
    """The measured steps; the first line of an out-of-memory error (GPU or CPU), or None. The error is turned
    into a string here, so that no frame of the failed step (and none of its tensors) outlives this function."""
    try:
        for _ in range(steps):
            res = trainer.train_step()
            ends.append(time.time())
            times.append(res.seconds)
            cpu_times.append(res.cpu_seconds)
            losses.append(res.loss)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        trainer.optimizer.zero_grad(set_to_none=True)
        return describe(e)
    return None


def _release() -> None:
    """Free what a failed step or a probe left: Python cycles, then the CUDA allocator's cached blocks."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def events(start: int, stop: int, every: int) -> int:
    """How many of the steps start+1 .. stop a run evaluates or saves at: every `every` steps (0: never) and
    always at the last step, as Trainer.fit does."""
    if stop <= start:
        return 0
    regular = (stop // every - start // every) if every > 0 else 0
    return regular + (0 if every > 0 and stop % every == 0 else 1)


def _nonfinite_run(losses: list) -> int:
    """The longest run of consecutive non-finite losses."""
    longest = current = 0
    for loss in losses:
        current = 0 if math.isfinite(loss) else current + 1
        longest = max(longest, current)
    return longest


def _report(cfg, trainer, times, cpu_times, losses, peak, rss_before, setup_s, ckpt_s, eval_batch_s, val, oom,
            resolve_impl, start_step=0, ckpt_oom=None, on_cpu_instead=False):
    from kaggletrain.data import eval_offsets
    from kaggletrain.ops.wkv import kernel_applies
    from kaggletrain.train.loop import MAX_NONFINITE_STEPS, MIN_LOSS_SCALE

    t, model, device = cfg.train, trainer.model, trainer.device
    n_params = model.num_parameters()
    n_train = model.num_parameters(trainable_only=True)
    tokens_per_step = trainer.cfg.train.batch_size * t.seq_len  # the measured steps' (see on_cpu_instead)
    step_s = statistics.median(times) if times else None  # None: no step was measured (out of memory)
    spread = [min(times), max(times)] if times else None
    cpu_s = statistics.median(cpu_times) if cpu_times else None
    remaining = max(0, t.max_steps - start_step)  # a resumed run does only the rest
    has_val = trainer.data.val_tokens is not None and len(trainer.data.val_tokens) >= t.seq_len + 1
    n_evals = events(start_step, t.max_steps, t.eval_interval) if has_val else 0
    n_ckpts = events(start_step, t.max_steps, cfg.checkpoint.every_steps)
    # An evaluation: eval_batches x batch_size windows (fewer on a short split), each rank its share of them
    # in micro-batches, each timed as eval_batch_s.
    val_len = len(trainer.data.val_tokens) if has_val else 0
    windows = len(eval_offsets(val_len, t.seq_len, t.eval_batches * t.batch_size))
    eval_s = -(-windows // (trainer.micro * trainer.dist.world_size)) * eval_batch_s
    projected_s = (remaining * step_s + n_evals * eval_s + n_ckpts * ckpt_s + setup_s
                   if step_s is not None and not on_cpu_instead else None)
    probe = torch.empty(1, 2, 1, model.config.head_size, device=device,
                        dtype=trainer.precision.amp_dtype or torch.float32)
    wkv_impl = resolve_impl(model.config.wkv_impl, probe)
    warnings = []
    t4 = t4_projection(cfg, trainer, peak, rss_before, oom, warnings, on_cpu_instead)
    t4_bytes = t4["bytes"]
    rehearsed_here = _rehearse_this_gpu(trainer, wkv_impl == "cuda", warnings) if device.type == "cuda" else None
    would_stop = [problem for problem in (oom, ckpt_oom) if problem]
    if on_cpu_instead and would_stop:  # this machine's memory, not the GPU's: the T4 projection answers for that
        warnings.append(f"the CPU stand-in ran out of this machine's memory ({'; '.join(would_stop)}), so the "
                        f"path was not checked to the end here; this says nothing about the GPU")
        would_stop = []
    bad = _nonfinite_run(losses)
    if bad:  # (fp16's loss scaler skips such steps, but a real run stops after a few all the same)
        first = next(i for i, x in enumerate(losses) if not math.isfinite(x)) + 1
        if bad >= MAX_NONFINITE_STEPS:
            would_stop.append(f"the loss was not finite for {bad} steps in a row (from dry-run step {first}): a real "
                              f"run stops after {MAX_NONFINITE_STEPS}; lower train.lr, or check the data")
        else:
            would_stop.append(f"the loss was not finite at dry-run step {first}; a real run stops after "
                              f"{MAX_NONFINITE_STEPS} such steps in a row: lower train.lr, or check the data")
    if trainer.loss_scale_too_low():
        would_stop.append(f"fp16's loss scale fell to {trainer.scaler.get_scale():g}, below {MIN_LOSS_SCALE:g} (the "
                          f"gradients overflow fp16 even unscaled): a real run stops there; lower train.lr, or use "
                          f"fp32 (bf16 on a GPU that has it)")
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if t.precision == "bf16" and cap[0] < 8:
            warnings.append("bf16 requested on a GPU without native bf16 (T4): use fp16 or auto")
        total = torch.cuda.get_device_properties(device).total_memory
        if peak < 0.25 * total and not oom:
            warnings.append(f"peak memory {peak / 2**30:.1f} GiB of {total / 2**30:.0f} GiB: a larger "
                            f"micro_batch_size would use the GPU better")
    if t.seq_len % 16 and kernel_applies(model.config.wkv_impl, model.config.head_size) \
            and (device.type == "cuda" or on_cpu_instead):
        warnings.append(f"train.seq_len={t.seq_len} is not a multiple of 16: the CUDA kernel pads each sequence")
    if device.type == "cpu" and step_s is not None and cpu_s < BUSY_CPU_SHARE * step_s and not on_cpu_instead:
        # Even one thread keeps a core busy for the whole step; far less CPU than wall time means other
        # processes took the cores, and the projection is as slow as this moment's machine.
        warnings.append(f"the step used {cpu_s / step_s:.0%} of a core per wall second: other processes are "
                        f"competing for the CPU, so the projected time is pessimistic")
    if 0 < len(times) < 3 and not on_cpu_instead:  # (steps after the warm-up; the first ones compile and warm caches)
        warnings.append(f"the step time and the projection rest on {len(times)} measured step"
                        f"{'s' if len(times) > 1 else ''} after the warm-up: --steps 5 or more measures a steadier "
                        f"median (the default, 10, measures 8)")
    if device.type == "cpu" and trainer.precision.name in ("fp16", "bf16") and not on_cpu_instead:
        warnings.append(f"{trainer.precision.name} on CPU is emulated and usually slower than fp32")
    return {
        "config": cfg.source,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "parameters": n_params,
        "trainable_parameters": n_train,
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_s,
        "step_time_spread_s": spread,
        "step_cpu_time_s": cpu_s,
        "tokens_per_s": tokens_per_step / step_s if step_s else None,
        "measured_steps": len(times),
        "start_step": start_step,
        "peak_memory_bytes": int(peak),
        "peak_memory_source": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "projected_run_s": projected_s,
        "projected_run_h": projected_s / 3600 if projected_s is not None else None,
        "projected_evaluations": n_evals,
        "projected_checkpoints": n_ckpts,
        "fits_kaggle_session": projected_s / 3600 <= KAGGLE_SESSION_HOURS if projected_s is not None else None,
        "projected_t4_memory_gb": t4_bytes / 1e9 if t4_bytes is not None else None,
        "fits_t4": fits_t4(t4_bytes) if t4_bytes is not None else None,
        "t4_memory_method": t4["method"],
        "t4_memory_breakdown": t4.get("breakdown"),
        "t4_micro_batch_that_fits": t4.get("fit"),
        "rehearsed_peak_memory_bytes": rehearsed_here,
        "precision": trainer.precision.name,
        "wkv_impl": wkv_impl,
        "attention_backend": _attention_backend(device, bool(model.config.attention_layers)),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "val_loss_one_batch": val,
        "checkpoint_roundtrip_s": ckpt_s,
        "out_of_memory": oom or ckpt_oom,
        "warnings": warnings,
        "_would_stop": would_stop,
    }


def fits_t4(nbytes: float) -> bool:
    """Room is left for the CUDA context and the allocator's fragmentation, which no peak counts."""
    return nbytes / 1e9 <= T4_MEMORY_GB * 0.92


def _t4_dtype(precision: str):
    """The autocast dtype a T4 trains this config in ("auto": fp16, the T4 has no bf16)."""
    return {"fp32": None, "bf16": torch.bfloat16}.get(precision, torch.float16)


def t4_projection(cfg, trainer, peak, rss_before, oom, warnings: list, on_cpu_instead: bool = False) -> dict:
    """The T4's peak for this config: measured when this is a T4, else rehearsed on fake tensors
    (train/memory_rehearsal.py), with the largest micro batch that fits when the configured one does not.
    Falls back to the measured peak scaled for fp16 if the rehearsal fails or cannot model the run (FSDP's
    sharding); with no measurement of the configured step to fall back on (`on_cpu_instead`), no projection."""
    from kaggletrain.model.model import is_sharded

    device, model = trainer.device, trainer.model
    if device.type == "cuda" and "T4" in torch.cuda.get_device_name(device):
        return {"bytes": None if oom else peak, "method": "measured on this T4 (torch.cuda.max_memory_allocated)"}
    dtype = _t4_dtype(cfg.train.precision)
    world = trainer.dist.world_size
    micro, accum = cfg.train.micro_batch(world), cfg.validate_for_world_size(world)  # as configured
    try:
        if is_sharded(model):
            raise NotImplementedError("FSDP shards the weights, which the rehearsal does not model")
        r = rehearse_trainer_step(trainer, micro, accum, dtype)
    except Exception as e:  # the projection is an estimate: never the reason a dry run fails
        why = (f"the T4 memory is not rehearsed ({first_line(e)})" if isinstance(e, NotImplementedError)
               else f"the T4 memory rehearsal failed ({type(e).__name__}: {first_line(e)})")
        if on_cpu_instead:
            warnings.append(f"{why}; no T4 projection (the CPU stand-in's one-sequence steps say nothing about the "
                            f"GPU's)")
            return {"bytes": None, "method": f"not projected: {why}"}
        warnings.append(f"{why}; the T4 projection comes from the measured peak instead")
        return _t4_from_measured(cfg, trainer, peak, rss_before, oom)
    out = {"bytes": r.peak_bytes, "method": r.method,
           "breakdown": {"weights": r.weight_bytes, "gradients": r.gradient_bytes, "adamw_moments": r.optimizer_bytes,
                         "activations_and_temporaries": r.peak_bytes - r.weight_bytes - r.gradient_bytes
                         - r.optimizer_bytes}}
    if not fits_t4(r.peak_bytes) and cfg.train.precision == "bf16":  # for bf16 GPUs: no T4 advice
        warnings.append(f"projected T4 memory {r.peak_bytes / 1e9:.1f} GB does not fit a 16 GB T4 (a bf16 config, "
                        f"for bf16 GPUs; a T4 trains in fp16: train.precision=auto)")
    elif not fits_t4(r.peak_bytes):
        out["fit"] = _t4_fitting_micro_batch(trainer, micro, accum, dtype)
        fit = out["fit"]
        how = ("no micro batch fits, even with gradient checkpointing: a smaller model or train.use_chunking"
               if fit is None else f"train.micro_batch_size={fit['micro_batch_size']}"
               + (" train.gradient_checkpointing=true" if fit["gradient_checkpointing"] else "")
               + f" would ({fit['projected_gb']:.1f} GB)")
        warnings.append(f"projected T4 memory {r.peak_bytes / 1e9:.1f} GB does not fit a 16 GB T4: {how}")
    return out


def _t4_fitting_micro_batch(trainer, micro: int, accum: int, dtype):
    """The largest per-GPU micro batch below `micro` that divides the per-GPU batch and whose rehearsed T4 peak
    fits (memory grows with the micro batch: a bisection over the divisors); failing that, micro batch 1 with
    gradient checkpointing. None if nothing fits."""
    t = trainer.cfg.train
    world = trainer.dist.world_size
    per_gpu, batch = micro * accum, micro * accum * world
    # Valid here and on Kaggle's T4 x2, which the pushed notebook runs as 2 processes (when the batch splits).
    worlds = {world} | ({2} if batch % 2 == 0 else set())
    sizes = [m for m in range(1, micro) if all(batch % (m * w) == 0 for w in worlds)]
    best, lo, hi = None, 0, len(sizes) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        peak = rehearse_trainer_step(trainer, sizes[mid], per_gpu // sizes[mid], dtype).peak_bytes
        if fits_t4(peak):
            best = {"micro_batch_size": sizes[mid], "gradient_checkpointing": False, "projected_gb": peak / 1e9}
            lo = mid + 1
        else:
            hi = mid - 1
    if best is None and not t.gradient_checkpointing:
        peak = rehearse_trainer_step(trainer, 1, per_gpu, dtype, grad_ckpt=True).peak_bytes
        if fits_t4(peak):
            best = {"micro_batch_size": 1, "gradient_checkpointing": True, "projected_gb": peak / 1e9}
    return best


def _t4_from_measured(cfg, trainer, peak, rss_before, oom) -> dict:
    """The older estimate: the measured peak minus the static memory, halved when measured in fp32 for a
    config that a T4 trains in half precision."""
    model, device = trainer.model, trainer.device
    n_params, n_train = model.num_parameters(), model.num_parameters(trainable_only=True)
    static = n_train * BYTES_PER_TRAINABLE + (n_params - n_train) * BYTES_PER_FROZEN
    activation = max(0, peak - (static if device.type == "cuda" else rss_before + static))
    act_scale = 0.5 if trainer.precision.name == "fp32" and _t4_dtype(cfg.train.precision) is not None else 1.0
    return {"bytes": None if oom else static + activation * act_scale,
            "method": ("static = trainable params x 16 B (fp32 weight, grad, AdamW m, v) + frozen x 4 B; "
                       "activations = measured peak of the steps and the evaluation batch minus static (minus "
                       "the process baseline on CPU), halved when measured in fp32 for a config a T4 trains in fp16; "
                       "per-GPU micro batch as configured; none after an out-of-memory")}


def _rehearse_this_gpu(trainer, kernel: bool, warnings: list):
    """The rehearsal for this GPU's own precision and WKV (`kernel`: the run's WKV is the CUDA kernel), to set
    beside the allocator's measured peak (how close the T4 projection is, checked wherever a GPU runs the dry
    run)."""
    try:
        return rehearse_trainer_step(trainer, trainer.micro, trainer.accum, trainer.precision.amp_dtype,
                                     kernel=kernel).peak_bytes
    except Exception as e:
        warnings.append(f"the memory rehearsal for this GPU failed ({type(e).__name__}: {first_line(e)})")
        return None


def _cpu_name() -> str:
    from kaggletrain.bench.machine import cpu_name

    return cpu_name()


def _search_fitting_batch(cfg, world: int) -> dict:
    """After an OOM: halve the per-device micro batch until two steps fit; if none does, the same with gradient
    checkpointing on. Each probe is a fresh trainer running steps only (`dry_run(_trial=True)`)."""
    micro = cfg.train.micro_batch(world)
    tried = []
    plans = [(cfg.train.gradient_checkpointing, micro // 2)]  # the configured micro batch has just failed
    if not cfg.train.gradient_checkpointing:
        plans.append((True, micro))
    for ckpt_on, m in plans:
        while m >= 1:
            trial = copy.deepcopy(cfg)
            trial.train = dataclasses.replace(trial.train, micro_batch_size=m, gradient_checkpointing=ckpt_on,
                                              batch_size=max(m * world, cfg.train.batch_size // (m * world) * m * world))
            rep = dry_run(trial, steps=2, _trial=True)
            tried.append({"micro_batch_size": m, "gradient_checkpointing": ckpt_on,
                          "fits": not rep["out_of_memory"]})
            _release()
            if not rep["out_of_memory"]:
                return {"micro_batch_size": m, "gradient_checkpointing": ckpt_on, "tried": tried}
            m //= 2
    return {"micro_batch_size": None, "tried": tried,
            "note": "no batch fits; enable train.use_chunking or use a smaller model"}


def finite(value):
    """The report with every non-finite float (a NaN loss) as None, so that --json prints strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def render_report(report: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(finite(report), indent=2, default=str, allow_nan=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dry run: {report['config']}")
    table.add_column("")
    table.add_column("value", justify="right")
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    num = lambda x, fmt: "n/a" if x is None else format(x, fmt)  # noqa: E731 (None: not measured)
    fits = lambda ok, what: "" if ok is None else f" ({'fits' if ok else 'does NOT fit'} {what})"  # noqa: E731
    step = report["step_time_s"]
    rows = [
        ("device", f"{report['device']} ({report['device_name']})"),
        ("parameters", f"{report['parameters']:,} ({report['trainable_parameters']:,} trainable)"),
        ("tokens per step", f"{report['tokens_per_step']:,}"),
        ("step time (median)", "n/a" if step is None else f"{step * 1000:.1f} ms"),
        ("tokens/s", num(report["tokens_per_s"], ",.0f")),
        ("peak memory", f"{gb(report['peak_memory_bytes'])} ({report['peak_memory_source']})"),
        ("projected run time", ("n/a" if report["projected_run_h"] is None else f"{report['projected_run_h']:.2f} h")
                               + fits(report["fits_kaggle_session"], "a 12 h Kaggle session")),
        ("projected T4 memory", ("n/a" if report["projected_t4_memory_gb"] is None
                                 else f"{report['projected_t4_memory_gb']:.2f} GB") + fits(report["fits_t4"], "16 GB")),
        ("precision / WKV / attention", f"{report['precision']} / {report['wkv_impl']} / {report['attention_backend']}"),
        ("loss first → last", f"{num(report['first_loss'], '.4f')} → {num(report['last_loss'], '.4f')}"),
    ]
    if report.get("rehearsed_peak_memory_bytes"):  # a GPU: how close the rehearsal behind the T4 projection is
        rows.insert(6, ("rehearsed peak (this GPU)", gb(report["rehearsed_peak_memory_bytes"])))
    if report.get("resumes_from"):
        rows.insert(3, ("resumes from", f"{report['resumes_from']} (step {report['start_step']})"))
    for k, v in rows:
        table.add_row(k, v)
    console = Console()
    console.print(table)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    # One unwrapped line each: a rehearsal (kaggle/kernel_runtime.failure_summary) quotes the first as the cause.
    for problem in report.get("real_run_would_stop", []):
        console.print(f"[bold red]the real run would stop:[/] {problem}", highlight=False, soft_wrap=True)
    if report.get("suggestion"):
        console.print(f"[yellow]suggestion:[/] {suggestion_text(report['suggestion'])}", highlight=False,
                      soft_wrap=True)


def suggestion_text(s: dict) -> str:
    """The batch search's answer as overrides to copy, and what was tried."""
    def outcome(t):  # a probe's (ran or ran out of memory), or a rehearsal's (what it needs)
        if "needs_gb" in t:
            return f"needs {t['needs_gb']:.1f} GB, {'fits' if t['fits'] else 'too much'}"
        return "fits" if t["fits"] else "out of memory"

    tried = ", ".join(f"{t['micro_batch_size']}{' + checkpointing' if t['gradient_checkpointing'] else ''}: "
                      f"{outcome(t)}" for t in s.get("tried", []))
    if s.get("micro_batch_size") is None:
        return f"{s.get('note', 'no batch fits')} (tried micro batches {tried})"
    how = f"train.micro_batch_size={s['micro_batch_size']}"
    if s.get("gradient_checkpointing"):
        how += " train.gradient_checkpointing=true"
    return f"{how} fits (tried micro batches {tried})"
