"""The official RWKV-7 ("x070") state dict: recognise it, read the architecture off its shapes, write it.

kaggletrain's parameter names *are* the official names (spec section 2), so import and export need no
renaming: a kaggletrain state dict of a pure RWKV-7 model without learnable states is an official one.
What this module adds is judgement about foreign files and the shape-to-config inference.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from kaggletrain.errors import CheckpointError, ConfigError
from kaggletrain.model.config import ModelConfig

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Learnable states (state tuning) are parameters here but not part of the official model file.
STATE_SUFFIXES = ("att.time_state", "att.shift_state", "ffn.shift_state")
# Present in train-code checkpoints, unused by the model, missing from some early releases (spec section 2).
UNUSED_FIRST_BLOCK = ("att.v0", "att.v1", "att.v2")


def is_state_key(key: str) -> bool:
    return key.startswith("blocks.") and key.endswith(STATE_SUFFIXES)


def unwrap_state_dict(obj: dict, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside what torch.load returned (accepts {"state_dict": ...}/{"model": ...} wrappers
    and a DDP/compile "module."/"_orig_mod." prefix)."""
    for wrapper in ("state_dict", "model", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(sorted(map(str, obj))[:6]) or "nothing"
        raise CheckpointError(f"{source}: no tensors found (top-level keys: {keys})")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def check_rwkv7(sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming what the file is when it is not an RWKV-7 state dict."""
    keys = list(sd)
    def has(part: str) -> Optional[str]:
        return next((k for k in keys if part in k), None)

    for marker, version in (("time_maa", "RWKV-6 (x060)"), ("time_faaaa", "RWKV-5 (x052)"),
                            ("time_first", "RWKV-4"), ("time_decay", "RWKV-4/5/6"), ("time_mix_", "RWKV-4/5")):
        found = has(marker)
        if found:
            raise CheckpointError(
                f"{source}: this is an {version} checkpoint (found key '{found}'); kaggletrain reads RWKV-7 "
                f"(x070) checkpoints only")
    if "emb.weight" not in sd or (has(".att.r_k") is None and has(".attn.qkv.weight") is None):
        sample = ", ".join(keys[:4])
        hint = ""
        if has("model.layers.") or has("attn.r_proj"):
            hint = " (this looks like a Hugging Face / fla model; convert it to the official .pth first)"
        raise CheckpointError(
            f"{source}: not an RWKV-7 checkpoint: expected keys 'emb.weight' and 'blocks.N.att.r_k', "
            f"found {len(keys)} tensors such as {sample}{hint}")


def _shape(sd, key, source, ndim=None):
    t = sd.get(key)
    if t is None:
        raise CheckpointError(f"{source}: missing tensor '{key}'")
    if ndim is not None and t.dim() != ndim:
        raise CheckpointError(f"{source}: '{key}' has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return tuple(t.shape)


def config_from_state_dict(sd: dict[str, torch.Tensor], source: str,
                           overrides: Optional[dict] = None) -> ModelConfig:
    """ModelConfig from tensor shapes: V, C from emb; H, N from r_k; L from the block indices; LoRA ranks
    from w1/a1/v1/g1; attention blocks, learnable states and position embeddings from their keys.
    `overrides` (e.g. a saved config's non-shape fields such as num_attention_heads) win."""
    check_rwkv7(sd, source)
    V, C = _shape(sd, "emb.weight", source, 2)
    layers = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    if not layers:
        raise CheckpointError(f"{source}: no 'blocks.N.*' tensors found")
    L = layers[-1] + 1
    if layers != list(range(L)):
        missing = sorted(set(range(L)) - set(layers))
        raise CheckpointError(f"{source}: blocks {missing} are missing (found blocks up to {L - 1}); truncated?")
    attn = [i for i in range(L) if f"blocks.{i}.attn.qkv.weight" in sd]
    rwkv = [i for i in range(L) if i not in attn]
    kw: dict = {"vocab_size": V, "hidden_size": C, "num_layers": L, "attention_layers": attn}
    if rwkv:
        H, N = _shape(sd, f"blocks.{rwkv[0]}.att.r_k", source, 2)
        if H * N != C:
            raise CheckpointError(f"{source}: r_k shape {(H, N)} does not match width {C} (H*N must equal C)")
        kw["head_size"] = N
        for name, lora in (("d_decay", "w1"), ("d_aaa", "a1"), ("d_mv", "v1"), ("d_gate", "g1")):
            # Block 0's v1 may be absent (and is unused), so take each rank from any block that has it.
            key = next((f"blocks.{i}.att.{lora}" for i in rwkv if f"blocks.{i}.att.{lora}" in sd), None)
            if key is not None:
                kw[name] = _shape(sd, key, source, 2)[1]
        kw["rwkv_use_learnable_states"] = f"blocks.{rwkv[0]}.att.time_state" in sd
    if attn:
        mlp = _shape(sd, f"blocks.{attn[0]}.mlp_fc.weight", source, 2)[0]
        if mlp != 4 * C:
            kw["intermediate_size"] = mlp
    if "pos_emb.weight" in sd:
        kw["use_position_embeddings"] = True
        kw["max_position_embeddings"] = _shape(sd, "pos_emb.weight", source, 2)[0]
    if overrides:
        kw = {**overrides, **kw}
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{source}: tensor shapes give an invalid model: {e}") from None


def fill_unused(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Add zero `blocks.0.att.v0/v1/v2` when a release left them out (the model never reads them)."""
    first = next((i for i in range(config.num_layers) if not config.is_attention_layer(i)), None)
    if first is None:
        return sd
    C, Dv = config.hidden_size, config.lora_dims["v"]
    shapes = {"att.v0": (1, 1, C), "att.v1": (C, Dv), "att.v2": (Dv, C)}
    out = dict(sd)
    dtype = sd["emb.weight"].dtype
    for suffix in UNUSED_FIRST_BLOCK:
        out.setdefault(f"blocks.{first}.{suffix}", torch.zeros(shapes[suffix], dtype=dtype))
    return out


def check_official_compatible(cfg: ModelConfig) -> None:
    """Raise CheckpointError when the official format cannot represent a model of `cfg`."""
    if cfg.attention_layers:
        raise CheckpointError(
            f"cannot export to the official RWKV format: blocks {cfg.attention_layers} are Transformer "
            f"attention blocks (a hybrid model), which the rwkv package cannot run; use --format safetensors")
    if cfg.use_position_embeddings:
        raise CheckpointError(
            "cannot export to the official RWKV format: the model uses learned position embeddings, which "
            "the rwkv package does not have; use --format safetensors")
    if cfg.head_size != 64:
        # The package hard-codes ln_x eps 64e-5 (= 1e-5 * 64) and its kernels assume N = 64 (spec 5, 6).
        raise CheckpointError(
            f"cannot export to the official RWKV format: head_size is {cfg.head_size}, but the rwkv package "
            f"and RWKV kernels assume 64; use --format safetensors")


def split_state_dict(model, dtype: Optional[torch.dtype] = None) -> tuple[dict, dict]:
    """(weights, learnable_states) of `model`; floating weights cast to `dtype`, states kept float32."""
    weights, states = {}, {}
    for k, t in model.state_dict().items():
        t = t.detach()
        if is_state_key(k):
            states[k] = t.float()
        else:
            weights[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return weights, states


def official_state_dict(model, dtype: Optional[torch.dtype] = None) -> tuple[dict, dict]:
    """(weights, learnable_states) of `model` in the official layout; CheckpointError if it has none."""
    check_official_compatible(model.config)
    return split_state_dict(model, dtype)
