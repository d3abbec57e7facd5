"""kaggletrain: train RWKV-7 (and RWKV/attention hybrids) from one YAML config.

Public API: `ModelConfig`, `RWKVModel`. Imports are lazy so that `kaggletrain --help` stays fast and
nothing (no kernel build, no torch import) happens at import time.
"""

__version__ = "0.1.0"
__all__ = ["ModelConfig", "RWKVModel", "ModelOutput", "ModelState", "__version__"]


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
    raise AttributeError(f"module 'kaggletrain' has no attribute {name!r}")
