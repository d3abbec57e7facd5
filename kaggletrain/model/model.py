"""`RWKVModel`: embeddings, RWKV-7 / attention blocks, head; masking, chunking and state routing.

Blocks are routed by their class attribute `is_rwkv_block` (RWKV: token shifts + WKV state;
attention: key/value cache), never by isinstance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kaggletrain.model.attention import AttentionBlock
from kaggletrain.model.config import ModelConfig
from kaggletrain.model.head_loss import IGNORE_INDEX, head_loss, log_probs
from kaggletrain.model import cpu_memory
from kaggletrain.model.rwkv7 import RWKV7Block
from kaggletrain.model.state import AttentionLayerState, ModelState, RWKVLayerState, roundtrip


@dataclass
class ModelOutput:
    loss: Optional[torch.Tensor] = None      # mean next-token cross-entropy over counted targets
    logits: Optional[torch.Tensor] = None    # [B, T, V]
    state: Optional[ModelState] = None       # continue a sequence from here
    num_targets: int = 0                     # how many target tokens the loss averages over


class L2Wrap(torch.autograd.Function):
    """Official RWKV L2Wrap: adds 1e-4/(B*T) * max_logit gradient at each token's argmax logit.
    Multiplies by grad_output (the old form was wrong when grad_output != 1, spec section 1)."""

    @staticmethod
    def forward(ctx, loss, logits, factor=None):
        # factor: the gradient scale, when `loss` is one chunk's loss SUM rather than the mean over these
        # logits (chunked training passes 1e-4 * count / (B * T) of the whole sequence).
        ctx.save_for_backward(logits)
        ctx.factor = factor
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = ctx.factor if ctx.factor is not None else 1e-4 / max(1, logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, -1, keepdim=True)
        gy = torch.zeros_like(logits)
        gy.scatter_(-1, ids, maxx * factor)
        return grad_output, gy * grad_output, None


def _flat(states):
    out = []
    for s in states:
        out.extend(s if s is not None else (None, None, None))
    return out


def _unflat(flat):
    return [tuple(flat[i:i + 3]) if flat[i + 1] is not None else None for i in range(0, len(flat), 3)]


class _ChunkRecompute(torch.autograd.Function):
    """One chunk of `_forward_chunked`, run without keeping its autograd graph and recomputed in backward.

    apply(fn, n_states, release, *states, *params) -> fn(states), where fn(states) -> (loss_sum,
    *carried_states) and `params` are the trainable parameters fn uses; `release`: hand the CPU heap's free
    pages back before the recomputation (cpu_memory.py). As with reentrant checkpointing, the forward builds
    no graph: per chunk only its input states stay alive (non-reentrant checkpointing keeps each chunk's
    graph nodes, and on CPU those thousands of small allocations, interleaved with the freed activations,
    fragment the heap so the process RSS grows with the sequence length). Unlike reentrant checkpointing,
    the parameters are explicit inputs: their gradients for every chunk come back through these nodes and
    are summed by the engine, so each parameter's AccumulateGrad (and DDP's hook on it) runs once per
    backward. Backward recomputes fn under the forward's autocast settings (fn sets them itself)."""

    @staticmethod
    def forward(ctx, fn, n_states, release, *args):
        states, params = args[:n_states], args[n_states:]
        ctx.fn, ctx.n_states, ctx.params, ctx.release = fn, n_states, params, release
        ctx.device_type = next((t.device.type for t in args if isinstance(t, torch.Tensor)), "cpu")
        ctx.save_for_backward(*states)
        with torch.no_grad():
            return tuple(fn(list(states)))

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n_states
        need = ctx.needs_input_grad[3:]
        states = [s.detach().requires_grad_(need[i]) if s is not None and need[i] else s
                  for i, s in enumerate(ctx.saved_tensors)]
        if ctx.release:
            cpu_memory.release(ctx.device_type)  # CPU: hand the heap's free pages back first (cpu_memory.py)
        with torch.enable_grad():
            outs = ctx.fn(states)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt_idx = [i for i, s in enumerate(states) if s is not None and need[i]]
        wrt_idx += [n + i for i, p in enumerate(ctx.params) if need[n + i]]
        wrt = [states[i] if i < n else ctx.params[i - n] for i in wrt_idx]
        result = [None] * (n + len(ctx.params))
        if pairs and wrt:
            got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            for i, g in zip(wrt_idx, got):
                result[i] = g
        return (None, None, None, *result)


# For the torch.utils.checkpoint regions (selective mode, attention blocks, FSDP): trim the CPU heap before
# the checkpointed forward of each region only, not before its recomputation in the backward pass.
# Measured (benchmarks/bench_context_memory.py, 12 layers, C=64, T=2048, one CPU thread, whole blocks as
# non-reentrant checkpoints): trimming before both gave 6.6x less activation memory for 2.1x the step time;
# before the forward only 4.9x for 1.6x (the graph-free blocks of "full" mode now: 4.8x for 1.36x). The
# forward is where the heap fragments (each block's transients are freed around the small long-lived
# allocations of the checkpoint's graph, so the next block grows the heap by ~13 MB of a 64-wide model);
# the backward recomputes one block at a time in the same space and grows it no more, while every trim
# there only makes the next block page all its buffers in again (~3 us a page here).


def is_sharded(model) -> bool:
    """Whether FSDP has sharded the model's parameters (DTensors): they must then flow through the ordinary
    autograd graph (see _forward_chunked), and the optimizer cannot use its fused kernel."""
    return any(c.__name__ == "FSDPModule" for c in type(model).__mro__) or \
        any(type(p).__name__ == "DTensor" for p in model.parameters())


_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)  # private API: -1 outside a backward pass


def _in_backward() -> bool:
    return _graph_task_id is not None and _graph_task_id() != -1


def _checkpointed(fn, *args, release: bool = True):
    """Non-reentrant checkpoint of one block (or, in selective mode, one region of an RWKV block). With
    `release`, its forward first hands the CPU heap's free pages back to the OS (cpu_memory.py; not its
    recomputation, see the note above): otherwise the blocks' transient activations fragment the heap
    and the resident memory saved by checkpointing is mostly lost again."""
    if release:
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")

        def run(*a):
            if not _in_backward():
                cpu_memory.release(device_type)
            return _compact(fn(*a))
    else:
        def run(*a):
            return _compact(fn(*a))
    return checkpoint(run, *args, use_reentrant=False)


def _compact(out):
    """A block's carried states (token shifts) are [B, C] views of [B, T, C] activations: returned as they
    are, each would keep a whole recomputable activation alive past the checkpoint (memory, and on CPU
    long-lived buffers scattered through the heap that fragment it). Return compact copies instead."""
    if isinstance(out, torch.Tensor):
        return out.clone() if out._base is not None and out.dim() == 2 else out
    if isinstance(out, (tuple, list)):
        return type(out)(_compact(o) for o in out)
    return out


GRAD_CKPT_MODES = ("full", "selective")


def _recompute_rwkv_block(blk, x, v_first, st, valid, split):
    """One RWKV block through `_ChunkRecompute`: the forward keeps no autograd graph (only the block's
    inputs), the backward recomputes the block and hands gradients to its inputs and parameters.

    This is "full" gradient checkpointing without torch.utils.checkpoint's per-block graph: on CPU, those
    long-lived graph nodes, scattered between the freed activations, fragment glibc's heap so that the
    process keeps most of the memory checkpointing frees (hence the heap trims of `_checkpointed`, whose
    page faults cost step time); with no graph there is nothing to fragment and nothing to trim."""
    dev = x.device.type
    amp, amp_dtype = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
    first = v_first is None
    no_state = st is None or all(t is None for t in st)  # the block then starts from its initial state
    st = (None, None, None) if no_state else tuple(st)
    params = [p for p in blk.parameters() if p.requires_grad]

    def fn(ins):
        xi, vf, *si = ins
        with torch.autocast(device_type=dev, dtype=amp_dtype, enabled=amp):
            out, vf_new, st_new, mid = _compact(blk(xi, vf, None if no_state else tuple(si), valid, split))
        mid = mid if mid is not None else (None, None, None)
        return (out, vf_new if first else None, *st_new, *mid)

    # release=False: no graph, no fragmentation; trimming would only cost page faults.
    outs = _ChunkRecompute.apply(fn, 5, False, x, v_first, *st, *params)
    x_out, vf_out, n0, n1, n2, m0, m1, m2 = outs
    mid = (m0, m1, m2) if m1 is not None else None
    return x_out, (vf_out if first else v_first), (n0, n1, n2), mid


class RWKVModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError("RWKVModel expects a kaggletrain ModelConfig")
        self.config = config
        C, V = config.hidden_size, config.vocab_size
        self.emb = nn.Embedding(V, C)
        first_rwkv = next((i for i in range(config.num_layers) if not config.is_attention_layer(i)), None)
        self.blocks = nn.ModuleList(
            AttentionBlock(config, i) if config.is_attention_layer(i) else RWKV7Block(config, i, i == first_rwkv)
            for i in range(config.num_layers)
        )
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        if config.use_position_embeddings:
            self.pos_emb = nn.Embedding(config.max_position_embeddings, C)
        self._grad_ckpt = False
        self._grad_ckpt_mode = "full"
        self._amp_dtype: Optional[torch.dtype] = None
        self._inference = False
        self._compiled: Optional[str] = None  # the torch.compile backend of compile_for_training
        self.reset_parameters()

    # ---- initialisation and switches --------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official RWKV-7 initialisation (spec section 3)."""
        C, V = self.config.hidden_size, self.config.vocab_size
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        for b in self.blocks:
            b.reset_parameters()
        nn.init.ones_(self.ln_out.weight)
        nn.init.zeros_(self.ln_out.bias)
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        if hasattr(self, "pos_emb"):
            nn.init.zeros_(self.pos_emb.weight)  # starts inert: keeps the official init's behaviour

    def enable_gradient_checkpointing(self, enabled: bool = True, mode: Optional[str] = None) -> "RWKVModel":
        """Recompute activations in the backward pass: less activation memory. Gradients are bit-identical
        to no checkpointing in both modes. `mode` (None: keep the current one, initially "full"):

        "full" (the default): each block is recomputed whole in the backward pass. RWKV blocks go through
            `_recompute_rwkv_block` (no autograd graph kept per block, parameters as explicit inputs);
            attention blocks, and every block under FSDP, through non-reentrant torch.utils.checkpoint.
        "selective": an RWKV block is two non-reentrant checkpoints around the WKV (everything before it:
            ln1, token shift, lerps, projections, LoRAs; everything after it: ln_x, bonus, gate, output,
            ln2, channel-mix); the WKV runs outside them, keeps what it saved and is never recomputed.

        Measured (benchmarks/bench_context_memory.py, 12 layers, vocab 256, B=1, one CPU thread on 2 shared
        cores, 9 alternating steps; activation-memory reduction / step-time ratio):
            C=64,  T=2048: full 4.8x / 1.36x, selective 1.8x / 1.88x
            C=256, T=1024: full 5.5x / 1.34x, selective 1.8x-2.3x / 1.60x
        "selective" keeps too much (the chunked WKV op saves ~25 [T, C] tensors of a block's ~62), so "full"
        is the default (benchmarks/results/context_ckpt_c{64,256}_{full,selective}.json)."""
        if mode is not None:
            if mode not in GRAD_CKPT_MODES:
                raise ValueError(f"gradient checkpointing mode must be one of {GRAD_CKPT_MODES}, got {mode!r}")
            self._grad_ckpt_mode = mode
        self._grad_ckpt = bool(enabled)
        return self

    def enable_mixed_precision(self, dtype: Optional[torch.dtype] = torch.bfloat16) -> "RWKVModel":
        """Autocast the matmuls to fp16/bf16; decay, kk, norms and the WKV state stay float32."""
        if dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"enable_mixed_precision: dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self._amp_dtype = dtype
        return self

    def compile_for_training(self, backend: str = "inductor") -> "RWKVModel":
        """torch.compile each block (Module.compile: parameter names and checkpoints stay as they are) and the
        training head's per-slice softmax, loss and gradient (model/head_loss.py). What compiling buys is
        the fused elementwise work; the Python chunk loop and the head's matrix products stay eager."""
        # Dynamo keeps up to `recompile_limit` (8) versions of the blocks' shared forward, then runs eager. A
        # plain step needs 2 (block 0 starts v_first), chunked training up to 16 (v_first x carried state or
        # not x grad mode, for the chunks' no-grad pass and their recomputation x the overlap split or not).
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 32))
        for blk in self.blocks:
            blk.compile(backend=backend)
        self._compiled = backend
        return self

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def uncompile(self) -> "RWKVModel":
        """Back to eager mode (undoes compile_for_training)."""
        for blk in self.blocks:
            blk._compiled_call_impl = None  # what Module.compile set
        self._compiled = None
        return self

    def enable_state_compression(self, scheme: Optional[str] = None) -> "RWKVModel":
        """Carry and return RWKV states compressed (bf16, fp16 or int8 with per-row scales)."""
        if scheme is not None:
            if scheme not in ("bf16", "fp16", "int8"):
                raise ValueError(f"state compression scheme must be bf16, fp16 or int8, got {scheme!r}")
            self.config.state_compression = scheme
        self.config.rwkv_state_compression = True
        return self

    def train(self, mode: bool = True):
        if mode:
            if getattr(self, "_inference", False):  # optimize_for_inference re-laid the FFN key weights
                for blk in self.blocks:
                    w = blk.ffn.key.weight if blk.is_rwkv_block else None
                    if w is not None and not w.is_contiguous():
                        w.data = w.data.contiguous()
            self._inference = False
            saved = getattr(self, "_saved_requires_grad", None)
            if saved:  # undo optimize_for_inference's freezing (keeping intentionally frozen tensors frozen)
                for n, p in self.named_parameters():
                    p.requires_grad_(saved.get(n, p.requires_grad))
                self._saved_requires_grad = None
        return super().train(mode)

    @torch.no_grad()
    def optimize_for_inference(self, dtype: Optional[torch.dtype] = None) -> "RWKVModel":
        """Eval mode, ln0 folded into the embedding table, optional half-precision weights.
        Results change only by float rounding. Calling .train() undoes the folding."""
        self.eval()
        if dtype is not None:
            self.to(dtype)
        # A non-persistent buffer: follows .to()/.cuda(), stays out of the state dict.
        self.register_buffer("_emb_folded", self.blocks[0].ln0(self.emb.weight).detach(), persistent=False)
        from kaggletrain.infer.cpu_linear import weights_prefer_transposed

        if self.emb.weight.device.type == "cpu" and weights_prefer_transposed():
            # Without oneDNN, decoding runs MKL's gemv, which streams the FFN key [4C, C] ~1.5x faster
            # stored as [C, 4C] (long contiguous rows). Same shape and values, other strides
            # (kaggletrain/infer/cpu_linear.py).
            for blk in self.blocks:
                w = blk.ffn.key.weight if blk.is_rwkv_block else None
                if w is not None and w.is_contiguous():
                    w.data = w.data.t().contiguous().t()
        self._inference = True
        if getattr(self, "_saved_requires_grad", None) is None:
            self._saved_requires_grad = {n: p.requires_grad for n, p in self.named_parameters()}
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def learnable_state_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.endswith(("time_state", "shift_state"))]

    # ---- the forward pass -------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                state: Optional[ModelState] = None, use_chunking: bool = False, return_logits: bool = True,
                shift_labels: bool = True, bptt: str = "full", l2wrap: bool = False) -> ModelOutput:
        """input_ids [B, T] → ModelOutput(loss, logits [B, T, V], state).

        attention_mask [B, T] (1 = real token): padded positions (left or right) do not touch the state
        or the real tokens' logits and are excluded from the loss. labels [B, T] are aligned with
        input_ids and shifted inside (`shift_labels=False` if they are already next-token targets);
        -100 is ignored. `use_chunking` processes `rwkv_chunk_size` tokens at a time carrying the RWKV
        state (bptt="full": exact gradients, one chunk of activations in memory; "truncated": state
        detached between chunks)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        if bptt not in ("full", "truncated"):
            raise ValueError(f"bptt must be 'full' or 'truncated', got {bptt!r}")
        B, T = input_ids.shape
        device = input_ids.device
        valid = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError("attention_mask must have the shape of input_ids")
            if not bool(attention_mask.bool().all()):
                valid = attention_mask.bool()
        if state is not None:
            state = state.expand()
        pos0 = state.position if state is not None and state.position is not None else \
            torch.zeros(B, dtype=torch.long, device=device)
        if position_ids is None:
            if valid is None:
                position_ids = pos0[:, None] + torch.arange(T, device=device)[None]
            else:
                position_ids = pos0[:, None] + (valid.long().cumsum(1) - 1).clamp_min(0)
        if hasattr(self, "pos_emb") and T > 0 and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        targets = self._targets(labels, valid, shift_labels) if labels is not None else None
        layer_states = self._split_state(state, B)

        amp = self._amp_dtype is not None and not self._inference
        with torch.autocast(device_type=device.type, dtype=self._amp_dtype or torch.bfloat16, enabled=amp):
            chunked = use_chunking and T > self.config.rwkv_chunk_size
            loss_mean = None  # set when the head and loss run fused (training without returned logits)
            # Chunked: L2Wrap goes on each chunk's logits inside the chunk (they are not kept otherwise).
            l2_factor = None
            if chunked and l2wrap and targets is not None and torch.is_grad_enabled():
                l2_factor = 1e-4 * int((targets != IGNORE_INDEX).sum()) / max(1, B * T)
            if chunked:
                loss_sum, count, logits, new_states = self._forward_chunked(
                    input_ids, valid, position_ids, targets, layer_states, return_logits, bptt, l2_factor)
            else:
                x, new_states, _ = self._forward_tokens(input_ids, valid, position_ids, layer_states, None)
                h = self.ln_out(x)
                if targets is not None and not return_logits:
                    # Training and evaluation: the logits are never kept (model/head_loss.py); L2Wrap is folded
                    # into training's gradient. (Evaluation's full logits would outgrow a training step's
                    # activations with a large vocabulary and micro batch.)
                    dt = self._amp_dtype if amp else self.head.weight.dtype
                    loss_mean, count = head_loss(h.reshape(B * T, -1), self.head.weight, targets.reshape(-1), dt,
                                                 1e-4 / max(1, B * T) if l2wrap else None, self._compiled)
                    logits = None
                else:
                    logits = self.head(h)
                    loss_sum, count = self._loss_sum(logits, targets)
        loss = loss_mean
        if targets is not None and loss is None:
            loss = loss_sum / max(count, 1)
            if l2wrap and logits is not None and torch.is_grad_enabled() and not chunked:
                loss = L2Wrap.apply(loss, logits)
        consumed = valid.long().sum(1) if valid is not None else torch.full((B,), T, device=device)
        out_state = self._join_state(new_states, pos0 + consumed)
        if self.config.rwkv_state_compression:
            out_state = out_state.compress(self.config.state_compression)
        return ModelOutput(loss=loss, logits=logits if return_logits else None, state=out_state,
                           num_targets=int(count))

    # ---- pieces -------------------------------------------------------------------------------
    @staticmethod
    def _targets(labels, valid, shift):
        t = labels.clone().long()
        if valid is not None:
            t[~valid] = IGNORE_INDEX
        if shift:
            t = torch.cat([t[:, 1:], t.new_full((t.shape[0], 1), IGNORE_INDEX)], dim=1)
            if valid is not None:
                t[~valid] = IGNORE_INDEX
        return t

    @staticmethod
    def _loss_sum(logits, targets):
        if targets is None:
            return None, 0
        count = int((targets != IGNORE_INDEX).sum())
        # Same values as cross_entropy on upcast logits, without a float32 copy of them (the largest tensors
        # of a step with a 50k vocabulary).
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logp = log_probs(logits.reshape(-1, logits.shape[-1]))
            loss_sum = F.nll_loss(logp, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, count

    def _split_state(self, state: Optional[ModelState], B: int):
        """ModelState → per-layer tuples: RWKV (att_shift, wkv, ffn_shift), attention (k, v, valid)."""
        if state is None:
            return [None] * len(self.blocks)
        if len(state.layers) != len(self.blocks):
            raise ValueError(f"state has {len(state.layers)} layers, model has {len(self.blocks)}")
        out = []
        for blk, ls in zip(self.blocks, state.layers):
            if ls is None:
                out.append(None)
            elif blk.is_rwkv_block:
                out.append((ls.att_shift, ls.wkv, ls.ffn_shift))
            else:
                out.append((ls.k, ls.v, ls.valid))
        return out

    def _join_state(self, states, position) -> ModelState:
        layers = []
        for blk, s in zip(self.blocks, states):
            if s is None:
                layers.append(None)
            elif blk.is_rwkv_block:
                layers.append(RWKVLayerState(*s))
            else:
                layers.append(AttentionLayerState(*s))
        return ModelState(layers, position)

    def _embed(self, input_ids, position_ids):
        if self._inference:
            x = self._emb_folded[input_ids]
        else:
            x = self.blocks[0].ln0(self.emb(input_ids))
        if hasattr(self, "pos_emb"):
            x = x + self.pos_emb(position_ids)
        return x

    def _forward_tokens(self, input_ids, valid, position_ids, layer_states, split):
        """All blocks over one span of tokens. Returns hidden [B, T, C], new per-layer states and,
        when `split` is given, the RWKV states after the first `split` tokens."""
        x = self._embed(input_ids, position_ids)
        v_first = None
        new_states, mid_states = [], []
        ckpt = self._grad_ckpt and torch.is_grad_enabled()
        graph_free = ckpt and self._grad_ckpt_mode == "full" and not is_sharded(self)
        for blk, st in zip(self.blocks, layer_states):
            if blk.is_rwkv_block:
                args = (x, v_first, st, valid, split)
                if ckpt and self._grad_ckpt_mode == "selective":
                    x, v_first, st_new, mid = blk(*args, checkpoint=_checkpointed)
                elif graph_free:
                    x, v_first, st_new, mid = _recompute_rwkv_block(blk, *args)
                else:
                    x, v_first, st_new, mid = _checkpointed(blk, *args) if ckpt else blk(*args)
            else:
                args = (x, st, valid)
                x, st_new = _checkpointed(blk, *args) if ckpt else blk(*args)
                mid = None
            new_states.append(st_new)
            mid_states.append(mid)
        return x, new_states, mid_states

    def _forward_chunked(self, input_ids, valid, position_ids, targets, layer_states, return_logits, bptt,
                         l2_factor=None):
        """Chunks of `rwkv_chunk_size` tokens; each re-reads `rwkv_chunk_overlap` tokens of the previous
        chunk (attention context) while the RWKV state enters at the start of that overlap, so no token
        enters the state twice and each token's loss is counted once.

        With gradients and return_logits=False (training), every chunk but the last runs through
        `_ChunkRecompute`: no graph is kept for it, only its input states, and it is recomputed in the
        backward pass, so memory holds one chunk of activations whatever the sequence length, and the
        gradients are exact (bptt="full") or stop at chunk boundaries (bptt="truncated")."""
        cfg = self.config
        T, cs, ov = input_ids.shape[1], cfg.rwkv_chunk_size, cfg.rwkv_chunk_overlap
        starts = list(range(0, T, cs))
        rwkv_idx = [i for i, b in enumerate(self.blocks) if b.is_rwkv_block]
        carry = [layer_states[i] for i in rwkv_idx]        # RWKV states only; attention restarts per chunk
        first_attn = [layer_states[i] if not self.blocks[i].is_rwkv_block else None for i in range(len(self.blocks))]
        loss_total, count_total, logits_parts = None, 0, []
        final_states = None
        recompute = torch.is_grad_enabled() and not return_logits
        params = [p for p in self.parameters() if p.requires_grad] if recompute else []
        # _ChunkRecompute hands gradients to the parameters it is given. Under FSDP (sharded DTensor
        # parameters, unsharded copies swapped in per block) they must instead flow through the ordinary
        # graph: use non-reentrant checkpointing there (exact too; it keeps each chunk's graph nodes).
        plain_params = bool(params) and not is_sharded(self)
        scheme = cfg.state_compression if cfg.rwkv_state_compression else None
        amp = self._amp_dtype is not None and not self._inference
        amp_dtype, dev_type = self._amp_dtype or torch.bfloat16, input_ids.device.type

        def compact(t):
            # A token-shift state is a view (x[:, -1]) of a whole [B, T, C] LayerNorm output: carried or
            # returned as it is, it would keep that chunk's activations alive. Keep a compact copy.
            return t.clone() if t is not None and t._base is not None else t

        for ci, s in enumerate(starts):
            lo = max(0, s - ov) if ci > 0 else 0
            hi = min(T, s + cs)
            next_lo = max(0, hi - ov) if hi < T else None     # where the next chunk's overlap starts
            split = (next_lo - lo) if next_lo is not None else None
            skip = s - lo                                      # overlap positions: outputs discarded
            attn_states = first_attn if ci == 0 else [None] * len(self.blocks)
            if recompute and ci > 0:
                cpu_memory.release(dev_type)  # CPU: the previous chunk's freed buffers (cpu_memory.py)

            def run(rwkv_states, _lo=lo, _hi=hi, _split=split, _skip=skip, _attn=attn_states):
                states = list(_attn)
                for j, st in zip(rwkv_idx, rwkv_states):
                    states[j] = st
                sl = slice(_lo, _hi)
                v_c = valid[:, sl] if valid is not None else None
                x, new, mid = self._forward_tokens(input_ids[:, sl], v_c, position_ids[:, sl], states, _split)
                logits = self.head(self.ln_out(x))
                tg = None
                if targets is not None:
                    tg = targets[:, sl]
                    if _skip:
                        tg = tg.clone()
                        tg[:, :_skip] = IGNORE_INDEX
                ls, _ = self._loss_sum(logits, tg)
                ls = logits.new_zeros((), dtype=torch.float32) if ls is None else ls
                if l2_factor is not None and torch.is_grad_enabled():
                    ls = L2Wrap.apply(ls, logits[:, _skip:], l2_factor)
                nxt = [tuple(compact(t) for t in (mid[j] if _split is not None else new[j])) for j in rwkv_idx]
                new = [tuple(compact(t) for t in st) if st is not None and self.blocks[j].is_rwkv_block else st
                       for j, st in enumerate(new)]
                return ls, (logits[:, _skip:] if return_logits else None), new, nxt

            if recompute and next_lo is not None:
                def chunk_fn(flat, _run=run):
                    with torch.autocast(device_type=dev_type, dtype=amp_dtype, enabled=amp):
                        ls, _, _, nxt = _run(_unflat(list(flat)))
                    return (ls, *_flat(nxt))

                flat_in = _flat(carry)
                if plain_params:
                    ls, *flat_next = _ChunkRecompute.apply(chunk_fn, len(flat_in), True, *flat_in, *params)
                else:
                    ls, *flat_next = checkpoint(lambda *flat, _fn=chunk_fn: _fn(flat), *flat_in,
                                                use_reentrant=False)
                carry, lg = _unflat(flat_next), None
            else:
                ls, lg, new, carry = run(carry)
                if next_lo is None:
                    final_states = new
            loss_total = ls if loss_total is None else loss_total + ls
            if targets is not None:
                count_total += int((targets[:, s:hi] != IGNORE_INDEX).sum())
            if lg is not None:
                logits_parts.append(lg)
            if next_lo is not None:
                if bptt == "truncated":
                    carry = [tuple(t.detach() for t in c) for c in carry]
                if scheme is not None:
                    carry = [tuple(roundtrip(t, scheme) for t in c) for c in carry]
        logits = torch.cat(logits_parts, dim=1) if return_logits else None
        if targets is None:
            loss_total = None
        return loss_total, count_total, logits, final_states

    # ---- checkpoints and generation (implemented in kaggletrain.interop / kaggletrain.infer) -------
    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = torch.float32, device=None) -> "RWKVModel":
        """Load an official RWKV-7 .pth, a kaggletrain checkpoint directory or a .safetensors file."""
        from kaggletrain.interop import load_checkpoint

        return load_checkpoint(path, dtype=dtype, device=device)[0]

    def save_pretrained(self, directory, tokenizer=None, states=None, extra=None):
        """Write a kaggletrain checkpoint directory (model.safetensors + config.json [+ tokenizer.json])."""
        from kaggletrain.interop import save_pretrained

        return save_pretrained(self, directory, tokenizer=tokenizer, states=states, extra=extra)

    def generate(self, input_ids, **kwargs):
        """Sample continuations; see kaggletrain.infer.generate for the arguments."""
        from kaggletrain.infer import generate

        return generate(self, input_ids, **kwargs)
