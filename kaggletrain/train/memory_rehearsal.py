"""A training step's GPU memory, rehearsed without the GPU.

The model's own forward and backward run on fake tensors (torch's FakeTensorMode: shapes, dtypes and
storage sizes, no data and no arithmetic) at the configured micro batch and sequence length, under the
target GPU's autocast dtype, with the WKV as the CUDA kernel's operators (their fake functions return what
the kernel returns and keeps for backward). `LiveBytes` adds up the storages alive after every operation,
each rounded as the CUDA caching allocator rounds blocks (512 bytes), plus the kernel backward's scratch
while it runs. Weights, gradients and AdamW's two moments are fake tensors alive throughout, as in a
steady-state step. So a laptop can say whether a config fits a 16 GB T4, and which micro batch does,
before anything is pushed; on a GPU the dry run compares the same rehearsal with the allocator's peak.

CPU autocast stands in for CUDA autocast. They agree for this model because it never calls an operator
that CUDA autocast runs in float32 on half-precision inputs (tests/test_memory_rehearsal.py checks every
forward operator against CUDA's float32 lists).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BLOCK = 512  # the CUDA caching allocator's rounding of every block
KERNEL_CKPT_LEN = 16  # == wkv7::kCkptLen
KERNEL_SEG_CHUNKS = 4  # == wkv7::kBwdSegChunks (the default backward's segment of chunks)

METHOD = ("rehearsed: the model's forward and backward on fake tensors (no data, no arithmetic) at the per-GPU "
          "micro batch and sequence length, {dtype} autocast, WKV {wkv}; peak of the live storages rounded to "
          "512-byte blocks, with fp32 weights, gradients and AdamW moments alive throughout{accum}. Not "
          "included: the CUDA context (~0.3-0.5 GB, outside the allocator) and fragmentation, which the 92% "
          "threshold leaves room for; DDP's gradient buckets (+4 B per trainable parameter) on 2 GPUs")


def rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


def kernel_backward_scratch_bytes(B: int, T: int, H: int, N: int) -> int:
    """The float32 scratch the default (two-kernel) backward allocates while it runs: dsa [B, T, H, N] and a dS
    checkpoint per segment of KERNEL_SEG_CHUNKS chunks per head (wkv7.cu bwd_scratch_floats; the extension's
    `bwd_scratch_floats` gives the same for the backward it runs)."""
    chunks = -(-T // KERNEL_CKPT_LEN)
    segments = -(-chunks // KERNEL_SEG_CHUNKS)
    return 4 * (B * T * H * N + B * H * segments * N * N)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created under it and still alive, each rounded to an allocator block.
    `pin` adds storages that live throughout (weights, optimizer state); they are never swept.

    Frees are found by sweeping the tracked storages: a weak reference each, which also keeps a freed
    storage's address from going to a new one while it is tracked. The sweep is lazy: between sweeps
    `current` can only overstate the live bytes, so a sweep is needed only when it would set a new peak."""

    def __init__(self):
        super().__init__()
        self.pinned = 0
        self.current = 0  # tracked storages since the last sweep (alive or not)
        self.peak = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._pinned: dict[int, StorageWeakRef] = {}

    def pin(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        ref = StorageWeakRef(st)
        if ref.cdata not in self._pinned:
            if ref.cdata in self._live:  # created under this mode a moment ago
                self.current -= self._live.pop(ref.cdata)[1]
            self._pinned[ref.cdata] = ref
            self.pinned += rounded(st.nbytes())
        self.peak = max(self.peak, self.pinned + self.current)

    def _sweep(self) -> None:
        expired = torch.UntypedStorage._expired
        dead = [key for key in self._live if expired(key)]
        for key in dead:
            self.current -= self._live.pop(key)[1]

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        ref = StorageWeakRef(st)
        if ref.cdata in self._live or ref.cdata in self._pinned:
            return
        n = rounded(st.nbytes())
        self._live[ref.cdata] = (ref, n)
        self.current += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._add(t)
        extra = _transient_bytes(func, args)
        if self.pinned + self.current + extra > self.peak:
            self._sweep()
            self.peak = max(self.peak, self.pinned + self.current + extra)
        return out


def _transient_bytes(func, args) -> int:
    """Memory an operator allocates and frees inside itself, on top of its outputs."""
    if getattr(func, "name", lambda: "")() == "kaggletrain::wkv7_backward":
        B, T, H, N = args[0].shape
        return rounded(kernel_backward_scratch_bytes(int(B), int(T), int(H), int(N)))
    return 0


class _StandInScalars(TorchDispatchMode):
    """Fake tensors have no values: a read of one (a token count, a mask check) gets a stand-in. The step's
    memory does not depend on those values (no shape in the training path does)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        return func(*args, **(kwargs or {}))


@dataclass
class Rehearsal:
    peak_bytes: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    micro_batch: int
    seq_len: int
    dtype: str
    wkv: str
    method: str


@contextlib.contextmanager
def _eager_training(model, amp_dtype):
    """The model as a training step runs it, in eager mode (compiled blocks would trace under the fake mode)
    and with the target autocast dtype; restored afterwards."""
    saved = (model._amp_dtype, model._compiled, [blk._compiled_call_impl for blk in model.blocks], model.training)
    model._amp_dtype, model._compiled = amp_dtype, None
    for blk in model.blocks:
        blk._compiled_call_impl = None
    model.train()
    try:
        yield
    finally:
        model._amp_dtype, model._compiled = saved[0], saved[1]
        for blk, impl in zip(model.blocks, saved[2]):
            blk._compiled_call_impl = impl
        model.train(saved[3])


@contextlib.contextmanager
def _swapped(model, named: dict, state: dict, fakes: dict):
    """The model's parameters and buffers replaced by their fake copies, module by module (shared tensors stay
    shared), and put back afterwards."""
    by_id = {id(t): fakes[n] for n, t in (*named.items(), *state.items())}
    undo = []
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is not None and id(t) in by_id:
                    undo.append((table, key, t))
                    table[key] = by_id[id(t)]
    try:
        yield
    finally:
        for table, key, t in undo:
            table[key] = t


def rehearse_step(model, *, micro_batch: int, seq_len: int, amp_dtype: Optional[torch.dtype], accum: int = 1,
                  use_chunking: bool = False, bptt: str = "full", l2wrap: bool = True,
                  kernel: bool = True) -> Rehearsal:
    """Peak GPU memory of one optimizer step of `model` (any device; it is not run, only read for shapes):
    `accum` micro-batches of micro_batch x seq_len tokens under `amp_dtype` autocast (None: fp32), the WKV as
    the CUDA kernel where `kernel` and it has one for the head size (else the PyTorch chunked form)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kaggletrain.model.model import is_sharded
    from kaggletrain.ops.wkv import rehearse_kernel_operators

    if is_sharded(model):  # FSDP's hooks would put the real (unsharded) weights back in place of the fakes
        raise ValueError("rehearse_step: an FSDP-sharded model cannot be rehearsed")
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = LiveBytes()
    named = dict(model.named_parameters())
    state = dict(model.named_buffers())
    weights = grads = moments = 0
    with fake, tracker, _StandInScalars(), _eager_training(model, amp_dtype):
        fakes = {}
        for name, p in named.items():  # fake CPU copies: CPU autocast stands in for CUDA's (see above)
            f = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu")
            fakes[name] = f.requires_grad_(p.requires_grad)
            tracker.pin(f)
            weights += rounded(f.untyped_storage().nbytes())
        for name, b in state.items():
            fakes[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu")
            tracker.pin(fakes[name])
        optimizer_state = []
        for name, p in named.items():
            if p.requires_grad:  # AdamW's exp_avg and exp_avg_sq, float32 like the weights
                optimizer_state += [torch.zeros_like(fakes[name]), torch.zeros_like(fakes[name])]
                for s in optimizer_state[-2:]:
                    tracker.pin(s)
                moments += 2 * rounded(fakes[name].untyped_storage().nbytes())
        ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        kernel_ctx = rehearse_kernel_operators() if kernel else contextlib.nullcontext()
        with kernel_ctx:
            # Two micro-steps show the peak of gradient accumulation: the second forward runs beside the
            # gradients the first backward left.
            with _swapped(model, named, state, fakes):  # through the backward: checkpointing recomputes there
                for _ in range(min(accum, 2)):
                    out = model(ids, labels=ids, shift_labels=False, use_chunking=use_chunking, return_logits=False,
                                bptt=bptt, l2wrap=l2wrap)
                    out.loss.backward()
                    del out
        grads = sum(rounded(f.grad.untyped_storage().nbytes()) for f in fakes.values() if f.grad is not None)
        peak = tracker.peak
        del optimizer_state, fakes
    from kaggletrain.ops.wkv import kernel_applies

    kernel = kernel and kernel_applies(model.config.wkv_impl, model.config.head_size)
    wkv = "as the CUDA kernel's operators" if kernel else \
        f"as PyTorch's {'sequential' if model.config.wkv_impl == 'sequential' else 'chunked'} form"
    dtype = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp_dtype]
    return Rehearsal(peak_bytes=peak, weight_bytes=weights, gradient_bytes=grads, optimizer_bytes=moments,
                     micro_batch=micro_batch, seq_len=seq_len, dtype=dtype, wkv=wkv,
                     method=METHOD.format(dtype=dtype, wkv=wkv,
                                          accum="; two micro-batches when accumulating" if accum > 1 else ""))


def rehearse_trainer_step(trainer, micro: int, accum: int, amp_dtype: Optional[torch.dtype], *, kernel: bool = True,
                          seq_len: Optional[int] = None, grad_ckpt: Optional[bool] = None) -> Rehearsal:
    """`rehearse_step` for a set-up Trainer: its model and train settings (sequence length, chunking, BPTT,
    L2Wrap), at `seq_len` tokens instead if given, and with gradient checkpointing switched to `grad_ckpt` for
    the rehearsal if given (the model's own mode is put back)."""
    t, model = trainer.cfg.train, trainer.model
    was = model._grad_ckpt
    if grad_ckpt is not None:
        model._grad_ckpt = grad_ckpt
    try:
        return rehearse_step(model, micro_batch=micro, seq_len=seq_len or t.seq_len, amp_dtype=amp_dtype,
                             accum=accum, use_chunking=t.use_chunking, bptt=t.bptt, l2wrap=t.l2wrap, kernel=kernel)
    finally:
        model._grad_ckpt = was


def real_step_peak(model, ids: torch.Tensor, **forward_kwargs) -> int:
    """The rehearsal's reference: one real step of `model` on `ids` (labels = ids), its storages counted by the
    same tracker, with the weights and AdamW's moments alive throughout as in `rehearse_step`. A warm-up step
    runs first, untracked. For tests and benchmarks (tests/test_memory_rehearsal.py,
    benchmarks/bench_memory_rehearsal.py); leaves the gradients of the tracked step in place."""
    kw = dict(labels=ids, shift_labels=False, return_logits=False, **forward_kwargs)
    model(ids, **kw).loss.backward()
    params = list(model.parameters())
    tracker = LiveBytes()
    with tracker:
        for p in params:
            tracker.pin(p)
        moments = [torch.zeros_like(p) for p in params if p.requires_grad for _ in range(2)]
        for m in moments:
            tracker.pin(m)
        model.zero_grad(set_to_none=True)
        model(ids, **kw).loss.backward()
    return tracker.peak
