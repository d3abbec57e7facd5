"""The model: RWKV-7 blocks, optional Transformer blocks, state routing.

Lazy exports: `kaggletrain.model.config` (ModelConfig) must stay importable without torch, so that
loading a YAML config (and `kaggletrain push`) does not pay torch's import time.
"""

__all__ = ["ModelConfig", "RWKVModel", "ModelOutput", "ModelState"]


def __getattr__(name):
    if name == "ModelConfig":
        from kaggletrain.model.config import ModelConfig

        return ModelConfig
    if name in ("RWKVModel", "ModelOutput"):
        from kaggletrain.model import model as _m

        return getattr(_m, name)
    if name == "ModelState":
        from kaggletrain.model.state import ModelState

        return ModelState
    raise AttributeError(f"module 'kaggletrain.model' has no attribute {name!r}")
