"""Whether a CPU training step fits this machine's memory, answered before the step runs.

Linux overcommits memory: a CPU step that does not fit is not refused with a MemoryError but killed by the
kernel's OOM killer part-way through, with nothing reported. So a CPU dry run rehearses its own step first
(train/memory_rehearsal.py, on fake tensors, the WKV in its PyTorch form) and compares it with the memory
this machine can still give: MemAvailable plus free swap, and the room under a cgroup's limit (a container's
or a CI job's), whichever is smaller.

The rehearsal's cost grows with the sequence length (the chunked WKV is many small operators per chunk: ~40 s
for the 0.1B model at 4096 tokens on this 2-core VM), not with the batch. So a short rehearsal screens first:
the activations, measured at min(T, 256) tokens, scaled to T linearly (quadratically with attention blocks,
whose CPU kernels may keep T x T scores), which overstates them (per token, the activations shrink slowly with
T: the fixed-size head slices). Only a config that the screen puts above half of what is available is
rehearsed at its own length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from kaggletrain.errors import first_line
from kaggletrain.train.memory_rehearsal import rehearse_trainer_step

# A bound on the activations that costs nothing, for the many small configs that fit with room to spare.
# Rehearsals of 1-4 layers, 64-768 wide, vocabularies of 256 and 50304, fp32 and bf16, with and without
# attention, 64-512 tokens, kept at most 282 bytes per token, layer and channel, and the head (whose slices
# have a fixed size, model/head_loss.py) under 0.6 GB. The bound takes about twice the first, 32 bytes per token
# and vocabulary entry plus 1 GiB for the head, and 16 bytes per attention score (a CPU kernel that keeps the
# T x T scores and their gradient in float32). tests/test_host_memory.py checks it against rehearsals.
BOUND_PER_LAYER_CHANNEL = 600
BOUND_PER_VOCAB = 32
BOUND_FIXED = 1 << 30
# The process's resident memory grows by more than its live tensors: glibc keeps freed heap memory resident
# and cut up (see model/cpu_memory.py), and CPU kernels keep scratch outside any tensor. Measured growth of
# the resident set over two real steps: 0.99-1.58x the rehearsed tensors (benchmarks/bench_host_memory.py;
# most with attention blocks). The check compares the rehearsal times this factor with what is available.
RESIDENT_FACTOR = 1.6
SCREEN_TOKENS = 256
SCREEN_SHARE = 0.5  # the screen's (overstated) need below this share of the available memory: fits
FIT_SHARE = 0.9  # the exact need above this share: does not fit (allocator overhead and other processes)
MAX_SEARCH_REHEARSALS = 4
SKIP_ENV = "KAGGLETRAIN_HOST_MEMORY_CHECK"  # "0": no check (the user knows better: zram, a memory the kernel
# does not report as available, ...); a step that does not fit is then killed as before


def _meminfo(proc: Path) -> dict[str, int]:
    out = {}
    for line in (proc / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[key] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    return out


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 says "max" for no limit


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.count(" ") == 1)}
    except (OSError, ValueError):
        return {}


def _cgroup_room(proc: Path, cgroup_root: Path) -> Optional[tuple[int, str]]:
    """The room left under this process's cgroup memory limits (v2 memory.max, v1 memory.limit_in_bytes), the
    tightest over its cgroup and the ones above it; usage counts without reclaimable inactive page cache."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":  # v2
            base, limit_file, usage_file, inactive = cgroup_root, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # v1
            base, limit_file, usage_file = cgroup_root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
            inactive = "total_inactive_file"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        # From the process's own cgroup up to the root as this namespace sees it (a container sees its own
        # cgroup as the root, where the path in /proc/self/cgroup may not exist).
        for depth in range(len(parts), -1, -1):
            d = base.joinpath(*parts[:depth])
            limit, usage = _read_int(d / limit_file), _read_int(d / usage_file)
            if limit is None or usage is None or limit >= 2**60:  # no limit here
                continue
            room = limit - max(0, usage - _stat(d / "memory.stat").get(inactive, 0))
            if best is None or room < best[0]:
                best = (max(0, room), f"cgroup limit {limit / 1e9:.1f} GB ({d / limit_file})")
    return best


def available_bytes(proc: str | os.PathLike = "/proc",
                    cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> Optional[tuple[int, str]]:
    """What this machine can still give a process, in bytes, and where the figure comes from; None where it
    cannot be read (not Linux)."""
    proc, cgroup_root = Path(proc), Path(cgroup_root)
    try:
        info = _meminfo(proc)
    except OSError:
        return None
    if "MemAvailable" not in info:
        return None
    best = (info["MemAvailable"] + info.get("SwapFree", 0), "MemAvailable + SwapFree (/proc/meminfo)")
    room = _cgroup_room(proc, cgroup_root)
    return room if room is not None and room[0] < best[0] else best


def _need(trainer, micro: int, accum: int, seq_len: int, ckpt: Optional[bool] = None):
    """The rehearsed step's bytes beyond the weights, which are already in memory: (need, activations)."""
    r = rehearse_trainer_step(trainer, micro, accum, trainer.precision.amp_dtype, kernel=False, seq_len=seq_len,
                              grad_ckpt=ckpt)
    static = r.gradient_bytes + r.optimizer_bytes
    return r.peak_bytes - r.weight_bytes, r.peak_bytes - r.weight_bytes - static


def check_step_fits(trainer, notes: list) -> Optional[dict]:
    """None when this CPU training step fits the available memory (or that cannot be judged: then a line in
    `notes`); else what stops it: {"problem": one line, "need_bytes", "available_bytes", "suggestion": a micro
    batch that fits, as the dry run's out-of-memory search reports it}. Under torchrun, rank 0 judges for
    every process on its machine (each gets an equal share) and tells the others, so that all ranks agree."""
    from kaggletrain.model.model import is_sharded
    from kaggletrain.train.distributed import broadcast_object

    if os.environ.get(SKIP_ENV) == "0":
        return None
    result, said = None, []
    if trainer.dist.is_main:
        if is_sharded(trainer.model):
            said.append("this machine's memory was not checked before the steps (the rehearsal does not model "
                        "FSDP's sharding)")
        else:
            try:
                result = _check(trainer, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            except Exception as e:  # an estimate: never the reason a run fails
                said.append(f"this machine's memory was not checked before the steps: the rehearsal failed "
                            f"({type(e).__name__}: {first_line(e)})")
    if trainer.dist.enabled:
        result, said = broadcast_object((result, said), trainer.dist)
    notes += said
    return result


def _check(trainer, processes: int) -> Optional[dict]:
    avail = available_bytes()
    if avail is None:
        return None
    room, source = avail
    if processes > 1:
        room, source = room // processes, f"{source}, shared by {processes} processes"
    t = trainer.cfg.train
    micro, accum = trainer.micro, trainer.accum
    budget = FIT_SHARE * room / RESIDENT_FACTOR  # in rehearsed tensor bytes
    screen = SCREEN_SHARE * room / RESIDENT_FACTOR
    if _upper_bound(trainer) <= screen:
        return None
    screen_len = min(t.seq_len, SCREEN_TOKENS)
    need, act = _need(trainer, micro, accum, screen_len)
    if screen_len < t.seq_len:
        growth = t.seq_len / screen_len
        if _attention_blocks(trainer.model):
            growth *= growth
        if need - act + act * growth <= screen:
            return None
        need, act = _need(trainer, micro, accum, t.seq_len)
    if need <= budget:
        return None
    problem = (f"this machine's memory: a step at train.micro_batch_size={micro} x train.seq_len={t.seq_len} needs "
               f"~{need * RESIDENT_FACTOR / 1e9:.1f} GB beyond the weights (rehearsed on fake tensors: "
               f"{need / 1e9:.1f} GB, x{RESIDENT_FACTOR} for the C heap), {room / 1e9:.1f} GB is available "
               f"({source}); the step is not started, as Linux would kill the process part-way ({SKIP_ENV}=0 "
               f"skips this check)")
    return {"problem": problem, "need_bytes": need * RESIDENT_FACTOR, "available_bytes": room,
            "suggestion": _fitting_micro_batch(trainer, micro, accum, need, act, budget)}


def _attention_blocks(model) -> int:
    from kaggletrain.model.attention import AttentionBlock

    return sum(isinstance(blk, AttentionBlock) for blk in model.blocks)


def _upper_bound(trainer) -> int:
    """More than a step can need beyond the weights (see BOUND_*): gradients and AdamW's moments, 12 bytes per
    trainable parameter, and a generous bound on the activations."""
    model, t = trainer.model, trainer.cfg.train
    c = model.config
    tokens = trainer.micro * t.seq_len
    attention = _attention_blocks(model)
    heads = c.num_attention_heads or max(1, c.hidden_size // 64)
    act = tokens * (c.num_layers * c.hidden_size * BOUND_PER_LAYER_CHANNEL + c.vocab_size * BOUND_PER_VOCAB)
    act += attention * 16 * trainer.micro * heads * t.seq_len ** 2
    return 12 * model.num_parameters(trainable_only=True) + act + BOUND_FIXED


def _fitting_micro_batch(trainer, micro: int, accum: int, need: int, act: int, budget: float) -> dict:
    """The largest micro batch below `micro` that divides this process's batch and whose rehearsed step fits
    `budget` (tensor bytes; the `needs_gb` reported are resident bytes, times RESIDENT_FACTOR). The activations grow about linearly with the micro batch: each guess comes from a line through
    the rehearsals so far, and is rehearsed before it is offered (at most MAX_SEARCH_REHEARSALS). Failing
    that, micro batch 1 with gradient checkpointing."""
    t = trainer.cfg.train
    per_process = micro * accum
    sizes = [m for m in range(1, micro) if per_process % m == 0]
    points = [(micro, act)]  # (micro batch, activation bytes), rehearsed
    static, upper, tried = need - act, micro, []  # upper: the smallest micro batch known not to fit
    for _ in range(MAX_SEARCH_REHEARSALS):
        below = [m for m in sizes if m < upper]
        if not below:
            break
        if len(points) == 1:
            slope, base = points[0][1] / points[0][0], 0.0
        else:
            (m0, a0), (m1, a1) = points[-2:]
            slope = (a1 - a0) / (m1 - m0)
            base = a0 - slope * m0
        m = ([m for m in below if static + base + slope * m <= budget] or below[:1])[-1]
        need_m, act_m = _need(trainer, m, per_process // m, t.seq_len)
        fits = need_m <= budget
        tried.append({"micro_batch_size": m, "gradient_checkpointing": t.gradient_checkpointing, "fits": fits,
                      "needs_gb": need_m * RESIDENT_FACTOR / 1e9})
        if fits:
            return {"micro_batch_size": m, "gradient_checkpointing": t.gradient_checkpointing, "tried": tried,
                    "method": "rehearsed against this machine's available memory"}
        points.append((m, act_m))
        upper = m
    if not t.gradient_checkpointing:
        need_1, _ = _need(trainer, 1, per_process, t.seq_len, ckpt=True)
        fits = need_1 <= budget
        tried.append({"micro_batch_size": 1, "gradient_checkpointing": True, "fits": fits, "needs_gb": need_1 * RESIDENT_FACTOR / 1e9})
        if fits:
            return {"micro_batch_size": 1, "gradient_checkpointing": True, "tried": tried,
                    "method": "rehearsed against this machine's available memory"}
    return {"micro_batch_size": None, "tried": tried,
            "note": "no micro batch fits this machine's memory; a shorter train.seq_len, train.use_chunking or a "
                    "smaller model", "method": "rehearsed against this machine's available memory"}
