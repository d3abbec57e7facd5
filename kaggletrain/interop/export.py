"""`kaggletrain export`: write a checkpoint as an official RWKV-7 .pth or as a .safetensors file.

Both outputs hold the official tensors only. Learnable states (state tuning: `blocks.N.att.time_state`
[H, N, N] in [head, value, key] layout, i.e. the rwkv package's `state[3N+1]`, plus the two token-shift
states [C], which are its `state[3N]` and `state[3N+2]`) go to a file of their own next to it,
`<name>.states.pth` / `<name>.states.safetensors`, always float32. `load_checkpoint` picks that file up
again when it sits next to the weights. An export without states removes such a file left by an earlier export
to the same name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch

from kaggletrain.errors import CheckpointError
from kaggletrain.interop.files import write_safetensors, write_torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = {"rwkv": ".pth", "safetensors": ".safetensors"}


def states_path_for(path: Union[str, os.PathLike]) -> Path:
    """model.pth -> model.states.pth; model.safetensors -> model.states.safetensors."""
    p = Path(path)
    return p.with_name(f"{p.stem}.states{p.suffix}")


def export_checkpoint(source, output: Union[str, os.PathLike], format: str = "rwkv",
                      dtype: str = "bf16") -> list[Path]:
    """Export `source` (a checkpoint path or an RWKVModel) to `output`. Returns the files written.

    format "rwkv": an official .pth (the rwkv package loads it with RWKV_V7_ON=1); pure RWKV-7 only.
    format "safetensors": the same tensors in a .safetensors file, with the model config in its metadata.
    dtype: "bf16" (what official releases use), "fp16" or "fp32". Files are written atomically.
    """
    from kaggletrain.interop.checkpoint import META_CONFIG_KEY, load_checkpoint, model_metadata
    from kaggletrain.interop.official import official_state_dict, split_state_dict

    if format not in FORMATS:
        raise CheckpointError(f"export format must be one of {sorted(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise CheckpointError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(output)
    suffix = FORMATS[format]
    if out.suffix != suffix:
        why = " (the rwkv package appends .pth to the name it is given)" if format == "rwkv" else ""
        raise CheckpointError(f"--output for --format {format} must end in {suffix}{why}, got {out}")
    if out.is_dir():
        raise CheckpointError(f"{out} is a directory; give a file name ending in {suffix}")

    model = load_checkpoint(source, dtype=None)[0] if isinstance(source, (str, os.PathLike)) else source
    split = official_state_dict if format == "rwkv" else split_state_dict
    weights, states = split(model, DTYPES[dtype])

    # The states file beside `out` must always belong to the weights there: the new weights are written in full
    # first (under a temporary name: a failed write leaves the earlier export whole), then an earlier export's
    # states go, the weights take the name, and the new states (if any) follow. An export cut off part-way
    # leaves weights without states, never weights with another model's states.
    sp = states_path_for(out)
    staged = out.with_name(f".{out.name}.{os.getpid()}.staged")
    try:
        if format == "rwkv":
            write_torch(staged, weights)
        else:
            # The main file alone is a model without learnable states; the states file adds them back.
            cfg = {**model.config.to_dict(), "rwkv_use_learnable_states": False}
            write_safetensors(staged, weights, {**model_metadata(model), META_CONFIG_KEY: json.dumps(cfg)})
        sp.unlink(missing_ok=True)
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    written = [out]
    if states:
        (write_torch if format == "rwkv" else write_safetensors)(sp, states)
        written.append(sp)
    return written
