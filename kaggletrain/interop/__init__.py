"""Checkpoints in and out: official RWKV-7 .pth, kaggletrain directories, safetensors.

    model, meta = load_checkpoint(path)     # .pth / kaggletrain dir / .safetensors
    save_pretrained(model, directory)       # kaggletrain checkpoint directory
    save_weights(model, "model.safetensors")
    export_checkpoint(src, out, format="rwkv", dtype="bf16")
"""

from kaggletrain.interop.checkpoint import (build_model, detect_format, load_checkpoint, load_state_dict_any,
                                            read_checkpoint, save_pretrained, save_weights)
from kaggletrain.interop.export import export_checkpoint, states_path_for
from kaggletrain.interop.official import config_from_state_dict, official_state_dict

__all__ = ["load_checkpoint", "load_state_dict_any", "read_checkpoint", "save_pretrained", "save_weights", "detect_format", "build_model",
           "export_checkpoint", "states_path_for", "config_from_state_dict", "official_state_dict"]
