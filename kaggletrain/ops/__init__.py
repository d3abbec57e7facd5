"""Numerical operators. `wkv` is the single dispatch point for the RWKV-7 WKV recurrence."""

from kaggletrain.ops.wkv import wkv, decay_log

__all__ = ["wkv", "decay_log"]
