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
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

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


def dry_run(cfg, steps: int = 10, _trial: bool = False) -> dict[str, Any]:
    """Run `steps` real training steps of `cfg` in a temporary directory and report (see module doc).
    `_trial`: a probe of the out-of-memory search -- steps only, no checkpoint, evaluation or nested search."""
    from kaggletrain.ops.wkv import resolve_impl
    from kaggletrain.train.loop import Trainer

    steps = max(2, steps)
    warmup = min(2, steps - 1)
    tmp = tempfile.TemporaryDirectory(prefix="kaggletrain-dry-")
    dcfg = copy.deepcopy(cfg)
    dcfg.out_dir = str(Path(tmp.name) / "run")
    dcfg.logging = dataclasses.replace(dcfg.logging, progress=False, tensorboard=False, plot=False)
    dcfg.checkpoint = dataclasses.replace(dcfg.checkpoint, resume=False)
    rss_before = _rss_peak_bytes()
    t_setup = time.perf_counter()
    trainer = Trainer(dcfg, resume=False, progress=False)
    if trainer.dist.enabled and not _trial:  # see kaggletrain/process.py; probes must free their memory
        from kaggletrain.process import hold_until_exit

        hold_until_exit(trainer)
    try:
        trainer.setup()
        setup_s = time.perf_counter() - t_setup
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, cpu_times, losses = [], [], []
        ends = [time.time()]  # wall-clock ends of the steps: the measured window, to line up with other logs
        oom = _run_steps(trainer, steps, times, cpu_times, losses, ends)
        if _trial:
            return {"out_of_memory": oom}
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
        t0 = time.perf_counter()
        try:
            val = trainer.evaluate(max_batches=1)
        except Exception as e:  # evaluation at the configured batch may not fit either
            if not is_out_of_memory(e):
                raise
            val, oom = None, oom or f"out of memory in the evaluation batch: {describe(e)}"
            del e
            _release()
        eval_batch_s = time.perf_counter() - t0
        report = _report(cfg, trainer, times[warmup:], cpu_times[warmup:], losses, peak, rss_before, setup_s,
                         ckpt_s, eval_batch_s, val, oom or ckpt_oom, resolve_impl)
        if ckpt_oom:
            report["warnings"].append(
                "the checkpoint save and reload ran out of memory (the weights and optimizer state are copied to "
                "host memory and back); a real run's saves would too: free memory, or set "
                "checkpoint.save_optimizer=false to save the weights alone")
        report["measured_window_unix"] = [ends[min(warmup, len(ends) - 1)], ends[-1]]
        world = trainer.dist.world_size
    finally:
        trainer.close()
        tmp.cleanup()
    if oom:  # the steps or the evaluation batch: both shrink with the micro batch
        del trainer  # (a distributed run's trainer stays held: see above)
        _release()
        report["suggestion"] = _search_fitting_batch(cfg, world)
    return report


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


def _report(cfg, trainer, times, cpu_times, losses, peak, rss_before, setup_s, ckpt_s, eval_batch_s, val, oom,
            resolve_impl):
    t, model, device = cfg.train, trainer.model, trainer.device
    n_params = model.num_parameters()
    n_train = model.num_parameters(trainable_only=True)
    tokens_per_step = t.batch_size * t.seq_len
    step_s = statistics.median(times) if times else float("nan")
    spread = (min(times), max(times)) if times else (float("nan"), float("nan"))
    cpu_s = statistics.median(cpu_times) if cpu_times else float("nan")
    n_evals = (t.max_steps // t.eval_interval) if t.eval_interval else 0
    n_ckpts = (t.max_steps // cfg.checkpoint.every_steps if cfg.checkpoint.every_steps else 0) + 1
    projected_s = t.max_steps * step_s + n_evals * t.eval_batches * eval_batch_s + n_ckpts * ckpt_s + setup_s
    static = n_train * BYTES_PER_TRAINABLE + (n_params - n_train) * BYTES_PER_FROZEN
    activation = max(0, peak - (static if device.type == "cuda" else rss_before + static))
    # Activations scale with precision (fp16 halves fp32 activations) and with the per-GPU micro batch.
    act_scale = 0.5 if trainer.precision.name == "fp32" else 1.0
    t4_bytes = static + activation * act_scale
    probe = torch.empty(1, 2, 1, model.config.head_size, device=device,
                        dtype=trainer.precision.amp_dtype or torch.float32)
    warnings = []
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if t.precision == "bf16" and cap[0] < 8:
            warnings.append("bf16 requested on a GPU without native bf16 (T4): use fp16 or auto")
        total = torch.cuda.get_device_properties(device).total_memory
        if peak < 0.25 * total and not oom:
            warnings.append(f"peak memory {peak / 2**30:.1f} GiB of {total / 2**30:.0f} GiB: a larger "
                            f"micro_batch_size would use the GPU better")
    if t.seq_len % 16:
        warnings.append(f"train.seq_len={t.seq_len} is not a multiple of 16: the CUDA kernel pads each sequence")
    if device.type == "cpu" and cpu_s < BUSY_CPU_SHARE * step_s:
        # Even one thread keeps a core busy for the whole step; far less CPU than wall time means other
        # processes took the cores, and the projection is as slow as this moment's machine.
        warnings.append(f"the step used {cpu_s / step_s:.0%} of a core per wall second: other processes are "
                        f"competing for the CPU, so the projected time is pessimistic")
    if device.type == "cpu" and t.precision in ("fp16", "bf16"):
        warnings.append(f"{t.precision} on CPU is emulated and usually slower than fp32")
    return {
        "config": cfg.source,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "parameters": n_params,
        "trainable_parameters": n_train,
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_s,
        "step_time_spread_s": list(spread),
        "step_cpu_time_s": cpu_s,
        "tokens_per_s": tokens_per_step / step_s if step_s and math.isfinite(step_s) else None,
        "measured_steps": len(times),
        "peak_memory_bytes": int(peak),
        "peak_memory_source": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "projected_run_s": projected_s,
        "projected_run_h": projected_s / 3600,
        "fits_kaggle_session": projected_s / 3600 <= KAGGLE_SESSION_HOURS,
        "projected_t4_memory_gb": t4_bytes / 1e9,
        "fits_t4": t4_bytes / 1e9 <= T4_MEMORY_GB * 0.92,
        "t4_memory_method": ("static = trainable params x 16 B (fp32 weight, grad, AdamW m, v) + frozen x 4 B; "
                             "activations = measured peak minus static (minus the process baseline on CPU), "
                             "halved when measured in fp32 since a T4 trains in fp16; per-GPU micro batch as configured"),
        "precision": trainer.precision.name,
        "wkv_impl": resolve_impl(model.config.wkv_impl, probe),
        "attention_backend": _attention_backend(device, bool(model.config.attention_layers)),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "val_loss_one_batch": val,
        "checkpoint_roundtrip_s": ckpt_s,
        "out_of_memory": oom,
        "warnings": warnings,
    }


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


def render_report(report: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dry run: {report['config']}")
    table.add_column("")
    table.add_column("value", justify="right")
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    rows = [
        ("device", f"{report['device']} ({report['device_name']})"),
        ("parameters", f"{report['parameters']:,} ({report['trainable_parameters']:,} trainable)"),
        ("tokens per step", f"{report['tokens_per_step']:,}"),
        ("step time (median)", f"{report['step_time_s'] * 1000:.1f} ms"),
        ("tokens/s", f"{report['tokens_per_s']:,.0f}" if report["tokens_per_s"] else "n/a"),
        ("peak memory", f"{gb(report['peak_memory_bytes'])} ({report['peak_memory_source']})"),
        ("projected run time", f"{report['projected_run_h']:.2f} h "
                               f"({'fits' if report['fits_kaggle_session'] else 'does NOT fit'} a 12 h Kaggle session)"),
        ("projected T4 memory", f"{report['projected_t4_memory_gb']:.2f} GB "
                                f"({'fits' if report['fits_t4'] else 'does NOT fit'} 16 GB)"),
        ("precision / WKV / attention", f"{report['precision']} / {report['wkv_impl']} / {report['attention_backend']}"),
        ("loss first → last", f"{report['first_loss']:.4f} → {report['last_loss']:.4f}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console = Console()
    console.print(table)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    if report.get("out_of_memory"):
        console.print(f"[red]out of memory:[/] {report['out_of_memory']}; suggestion: {report.get('suggestion')}")
