"""Saving and loading a generation state (`ModelState`) as a .safetensors file.

A state saved after a long prompt (a document, a system prompt) is reused to continue from it without
re-reading the prompt. The file holds `ModelState.to_tensors()`; loading checks it fits the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from kaggletrain.errors import KaggletrainError
from kaggletrain.model.state import AttentionLayerState, ModelState, RWKVLayerState


def save_state(state: ModelState, path: str | os.PathLike) -> Path:
    from kaggletrain.interop.files import write_safetensors

    write_safetensors(path, state.to_tensors(), {"format": "kaggletrain-state", "version": "1"})
    return Path(path)


def load_state(path: str | os.PathLike, model) -> ModelState:
    """Read a state file and check that its layers and sizes match `model`."""
    from kaggletrain.interop.files import read_safetensors

    p = Path(path)
    if not p.is_file():
        raise KaggletrainError(f"{p}: state file not found")
    tensors, meta = read_safetensors(p)
    if meta.get("format") != "kaggletrain-state":
        raise KaggletrainError(f"{p}: not a kaggletrain state file (metadata format={meta.get('format')!r})")
    cfg = model.config
    try:
        state = ModelState.from_tensors(tensors, cfg.num_layers)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise KaggletrainError(f"{p}: malformed state file ({e})") from None
    C, H, N = cfg.hidden_size, cfg.n_head, cfg.head_size
    for i, (blk, ls) in enumerate(zip(model.blocks, state.layers)):
        if ls is None:
            continue
        if blk.is_rwkv_block != isinstance(ls, RWKVLayerState):
            raise KaggletrainError(f"{p}: layer {i} state is for a different block type; saved from another model?")
        if isinstance(ls, RWKVLayerState):
            ok = ls.wkv.shape[1:] == (H, N, N) and ls.att_shift.shape[1:] == (C,) and ls.ffn_shift.shape[1:] == (C,)
        else:
            ok = isinstance(ls, AttentionLayerState) and ls.k.shape[-1] * ls.k.shape[1] == C
        if not ok:
            raise KaggletrainError(f"{p}: layer {i} state shapes do not fit this model (width {C}, heads {H}x{N}); "
                                   "saved from another model?")
    if state.batch_size == 0:
        raise KaggletrainError(f"{p}: the state file holds no layers")
    return state.to(model.emb.weight.device)
