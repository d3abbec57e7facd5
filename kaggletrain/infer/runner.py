"""Model calls for generation: prefill a prompt and step one token, returning only last-position logits.

`RWKVModel.forward` computes logits for every position, and the head (V x C, 65536 x 768 for World 0.1B)
is a third of the work per token; a prompt only needs the logits of its last token. So these helpers run
the model's blocks through its own routing helpers (`_split_state`, `_forward_tokens`, `_join_state`) and
apply the head to one position per row. Everything else (masking, state routing, learnable initial
states, position ids) is the model's code, so results equal `model(...)` to float rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from kaggletrain.model.state import ModelState


def head_logits(model, x: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32 of final hidden states x [B, C] (ln_out, then the head).

    For B > 1 this computes (W x^T)^T instead of x W^T: on CPU, MKL's small-M path for x W^T is several
    times slower than for W x^T with the large (V x C) matrix on the left (benchmarks/bench_infer_cpu.py,
    batch 8: the head dominated the step). Same values up to summation order.
    """
    h = model.ln_out(x)
    if h.shape[0] == 1 or model.head.bias is not None:
        return model.head(h).float()
    return torch.mm(model.head.weight, h.t()).t().float().contiguous()


def _position_ids(state: Optional[ModelState], valid: Optional[torch.Tensor], B: int, T: int, device):
    """Same rule as RWKVModel.forward: continue from state.position, count real tokens only."""
    pos0 = state.position if state is not None and state.position is not None else \
        torch.zeros(B, dtype=torch.long, device=device)
    if valid is None:
        return pos0, pos0[:, None] + torch.arange(T, device=device)[None]
    return pos0, pos0[:, None] + (valid.long().cumsum(1) - 1).clamp_min(0)


@torch.no_grad()
def run_last(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             state: Optional[ModelState] = None) -> tuple[torch.Tensor, ModelState]:
    """input_ids [B, T] (left-padded when lengths differ; attention_mask [B, T], 1 = real token).

    Returns (logits [B, V] float32 of the last position, state after the real tokens).
    With left padding the last position is real for every row that has any real token.
    """
    B, T = input_ids.shape
    valid = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        valid = attention_mask.bool()
    if state is not None:
        state = state.expand()
    pos0, position_ids = _position_ids(state, valid, B, T, input_ids.device)
    if hasattr(model, "pos_emb") and int(position_ids.max()) >= model.config.max_position_embeddings:
        from kaggletrain.errors import KaggletrainError

        raise KaggletrainError(f"position {int(position_ids.max())} exceeds the model's "
                               f"max_position_embeddings={model.config.max_position_embeddings}")
    layer_states = model._split_state(state, B)
    x, new_states, _ = model._forward_tokens(input_ids, valid, position_ids, layer_states, None)
    logits = head_logits(model, x[:, -1])
    consumed = valid.long().sum(1) if valid is not None else torch.full((B,), T, device=input_ids.device)
    out = model._join_state(new_states, pos0 + consumed)
    if model.config.rwkv_state_compression:
        out = out.compress(model.config.state_compression)
    return logits, out
