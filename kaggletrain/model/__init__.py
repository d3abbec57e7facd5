"""The model: RWKV-7 blocks, optional Transformer blocks, state routing."""

from kaggletrain.model.config import ModelConfig
from kaggletrain.model.model import ModelOutput, RWKVModel
from kaggletrain.model.state import ModelState

__all__ = ["ModelConfig", "RWKVModel", "ModelOutput", "ModelState"]
