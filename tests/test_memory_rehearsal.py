"""The memory rehearsal behind the dry run's T4 projection (kaggletrain/train/memory_rehearsal.py): fake tensors
against the same step run for real, the WKV kernel's operators against the emulated kernel, and the model
against CUDA autocast's float32 lists (what lets CPU autocast stand in for it)."""

from __future__ import annotations

import shutil

import pytest
import torch

from kaggletrain.model.config import ModelConfig
from kaggletrain.model.model import RWKVModel
from kaggletrain.train.memory_rehearsal import (LiveBytes, kernel_backward_scratch_bytes, real_step_peak,
                                                 rehearse_step, rounded)

MiB = 2**20


def test_live_bytes_counts_what_is_alive_at_the_peak():
    tr = LiveBytes()
    with tr:
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        view = b[10:]  # a view: the same storage, not counted again
        b.add_(1)      # in place: nothing new
        del a
        c = torch.empty(3 * MiB // 2, dtype=torch.uint8)
        d = torch.empty(100, dtype=torch.uint8)  # rounded to an allocator block
        del c, d
        e = torch.empty(MiB // 2, dtype=torch.uint8)
    assert tr.peak == 2 * MiB + 3 * MiB // 2 + 512  # b + c + d; a was freed before c
    assert rounded(100) == 512 and rounded(512) == 512 and rounded(513) == 1024
    del view, e


def _model(amp=None, attention=(), ckpt=False, seed=0):
    torch.manual_seed(seed)
    m = RWKVModel(ModelConfig(vocab_size=1024, hidden_size=128, num_layers=3, attention_layers=list(attention),
                              rwkv_chunk_size=128))
    m.enable_mixed_precision(amp)
    m.enable_gradient_checkpointing(ckpt)
    return m


@pytest.mark.parametrize("name,amp,attention,ckpt", [
    ("fp32", None, (), False),
    ("fp16 hybrid attention", torch.float16, (1,), False),
    ("bf16 gradient checkpointing", torch.bfloat16, (1,), True),
])
def test_rehearsal_matches_the_real_step(name, amp, attention, ckpt):
    m = _model(amp, attention, ckpt)
    B, T = 2, 256
    x = torch.randint(0, 1024, (B, T), generator=torch.Generator().manual_seed(1))
    real = real_step_peak(m, x, l2wrap=True)
    r = rehearse_step(m, micro_batch=B, seq_len=T, amp_dtype=amp, kernel=False)
    # Never more than 1% under the real step (the safe side: a T4 projection that is too low costs a failed
    # Kaggle session); checkpointing's recomputation frees a little later on fake tensors.
    assert 0.99 * real <= r.peak_bytes <= 1.03 * real, (name, r.peak_bytes, real)
    n = sum(rounded(p.untyped_storage().nbytes()) for p in m.parameters())
    trainable = sum(rounded(p.untyped_storage().nbytes()) for p in m.parameters() if p.requires_grad)
    assert trainable < n  # (the first block's v0, v1, v2 are frozen)
    assert r.weight_bytes == n and r.optimizer_bytes == 2 * trainable and r.gradient_bytes == trainable
    assert r.peak_bytes > r.weight_bytes + r.gradient_bytes + r.optimizer_bytes
    # The model is left as it was: its autocast dtype and training mode.
    assert m._amp_dtype is amp and m.training


def test_peak_grows_with_the_micro_batch_and_accumulation_keeps_gradients():
    m = _model(torch.float16)
    one = rehearse_step(m, micro_batch=1, seq_len=256, amp_dtype=torch.float16, kernel=False).peak_bytes
    four = rehearse_step(m, micro_batch=4, seq_len=256, amp_dtype=torch.float16, kernel=False).peak_bytes
    assert four > one
    accum = rehearse_step(m, micro_batch=1, seq_len=256, amp_dtype=torch.float16, accum=4, kernel=False)
    assert accum.peak_bytes >= one and "two micro-batches" in accum.method


emulated = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                              reason="needs a C++ compiler")


@emulated
def test_kernel_operators_rehearse_what_the_emulated_kernel_allocates(monkeypatch):
    """The rehearsal's WKV is the kernel's two operators (their fake functions) plus the backward's scratch; the
    real step runs the kernel's sources through the CPU emulator, whose allocations (outputs, saved checkpoints,
    scratch) the tracker sees as they happen."""
    from rwkv_cuda.emulated import ENV, load_emulated

    monkeypatch.setenv(ENV, "1")
    ext = load_emulated()
    for B, T, H in ((1, 64, 2), (2, 100, 1), (3, 16, 2), (1, 1000, 1)):
        assert ext.bwd_scratch_floats(B, T, H, 64) * 4 == kernel_backward_scratch_bytes(B, T, H, 64)
    torch.manual_seed(0)
    m = RWKVModel(ModelConfig(vocab_size=512, hidden_size=128, num_layers=2))
    m.enable_mixed_precision(torch.float16)
    x = torch.randint(0, 512, (2, 96))
    real = real_step_peak(m, x, l2wrap=True)
    r = rehearse_step(m, micro_batch=2, seq_len=96, amp_dtype=torch.float16, kernel=True)
    assert "CUDA kernel" in r.wkv
    assert r.peak_bytes == pytest.approx(real, rel=0.01)
    monkeypatch.delenv(ENV)
    chunked = rehearse_step(m, micro_batch=2, seq_len=96, amp_dtype=torch.float16, kernel=False)
    assert chunked.peak_bytes != r.peak_bytes  # the rehearsal did take the kernel's route


# CUDA autocast's float32 policies (PyTorch's aten/src/ATen/autocast_mode.h, AT_FORALL_FP32 and
# AT_FORALL_FP32_SET_OPT_DTYPE): on half-precision inputs these run, and return, float32 on a GPU, while CPU
# autocast leaves most of them in half precision. The model must not call them on half tensors under autocast,
# or the GPU would hold float32 copies the CPU rehearsal never sees (and move twice the bytes).
CUDA_FP32 = {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
             "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "native_group_norm",
             "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
             "nll_loss", "nll_loss2d", "nll_loss_forward", "hinge_embedding_loss", "kl_div", "l1_loss",
             "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
             "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits",
             "dist", "pdist", "cdist", "renorm", "logsumexp"}
CUDA_FP32_UNLESS_DTYPE = {"prod", "softmax", "_softmax", "log_softmax", "_log_softmax", "cumprod", "cumsum",
                          "linalg_vector_norm", "linalg_matrix_norm", "sum", "norm"}


class _AutocastFlag(torch.overrides.TorchFunctionMode):
    """Autocast reads as off inside a dispatch mode: this records, at each torch function the Python code calls,
    whether autocast is on, for the operators that call dispatches."""

    def __init__(self):
        super().__init__()
        self.on = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        before, self.on = self.on, torch.is_autocast_enabled("cpu")
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.on = before


class _CudaAutocastAudit(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits, self.seen = [], 0
        self.autocast = _AutocastFlag()

    def __enter__(self):
        self.autocast.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.autocast.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.autocast.on:
            self.seen += 1
            half = any(isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16)
                       for a in torch.utils._pytree.tree_leaves((args, kwargs)))
            if half and (name in CUDA_FP32 or (name in CUDA_FP32_UNLESS_DTYPE and kwargs.get("dtype") is None)):
                self.hits.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_the_forward_never_runs_a_cuda_autocast_float32_operator_on_half_inputs(amp):
    """Every RWKV and attention path of the training forward: plain, chunked training, gradient checkpointing
    (its recomputation in the backward is not audited; it runs the forward's code). Found this way: the channel-mix's
    relu(k) ** 2 (a float32 [B, T, 4C] tensor per layer on a GPU) and the time-mix's bonus sum (which made
    bonus * v, y and the gate float32)."""
    for chunking, ckpt in ((False, False), (True, False), (False, True)):
        m = _model(amp, attention=(1,), ckpt=ckpt)
        x = torch.randint(0, 1024, (2, 256))
        audit = _CudaAutocastAudit()
        with audit:
            out = m(x, labels=x, shift_labels=False, return_logits=False, l2wrap=True, use_chunking=chunking)
            out.loss.backward()
        assert audit.hits == [], (chunking, ckpt, sorted(set(audit.hits)))
        assert audit.seen > 100  # operators ran under autocast, and the audit looked at them


def test_the_audit_sees_such_an_operator():
    """The check above can fail: pow on a half tensor under autocast is what the channel-mix used to call."""
    audit = _CudaAutocastAudit()
    with audit, torch.autocast("cpu", dtype=torch.float16):
        h = torch.nn.functional.linear(torch.randn(4, 8), torch.randn(8, 8))
        (h ** 2).sum(dtype=torch.float32)
        h.sum(-1)
    assert audit.hits == ["aten.pow.Tensor_Scalar", "aten.sum.dim_IntList"]


def test_the_model_may_live_on_another_device():
    """A GPU dry run rehearses the model it trains, whose weights are on the GPU; the rehearsal only reads their
    shapes (a model on the meta device stands in for that here)."""
    m = _model(torch.float16, attention=(1,))
    on_cpu = rehearse_step(m, micro_batch=2, seq_len=256, amp_dtype=torch.float16)
    m.to("meta")
    assert rehearse_step(m, micro_batch=2, seq_len=256, amp_dtype=torch.float16).peak_bytes == on_cpu.peak_bytes


FSDP_SCRIPT = r"""
import os, socket, torch, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
dist.init_process_group("gloo", rank=0, world_size=1)
from kaggletrain.model.config import ModelConfig
from kaggletrain.model.model import RWKVModel
from kaggletrain.train.fsdp import apply_fsdp
from kaggletrain.train.memory_rehearsal import rehearse_step
m = RWKVModel(ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, head_size=16))
apply_fsdp(m, torch.device("cpu"))
try:
    rehearse_step(m, micro_batch=1, seq_len=32, amp_dtype=None)
    print("rehearsed")
except ValueError as e:
    print("refused:", e)
print("grads left:", any(p.grad is not None for p in m.parameters()))
dist.destroy_process_group()
"""


def test_an_fsdp_sharded_model_is_refused_and_left_as_it_was():
    """FSDP's hooks would put the real (unsharded) weights back in place of the fake ones: the rehearsal would
    count the wrong memory and leave gradients on the real parameters. It refuses such a model (the dry run then
    falls back to its measured estimate). A one-process gloo group in a child process."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "refused: rehearse_step: an FSDP-sharded model cannot be rehearsed" in proc.stdout, proc.stdout
    assert "grads left: False" in proc.stdout, proc.stdout
