"""`ModelConfig`: the architecture, validated on construction.

Every bad value raises `ConfigError` (a ValueError) naming the field, so a typo in a YAML file or in
Python code gets the same clear message.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from kaggletrain.errors import ConfigError

STATE_COMPRESSION_SCHEMES = ("bf16", "fp16", "int8")
WKV_IMPLS = ("auto", "sequential", "chunked", "cuda")


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def lora_dim(factor: float, power: float, hidden: int) -> int:
    """Official RWKV-7 LoRA size rule: max(32, round(factor * C**power / 32) * 32)."""
    return max(32, int(round(factor * hidden**power / 32) * 32))


@dataclass(init=False)
class ModelConfig:
    vocab_size: int = _f(65536, "Vocabulary size (65536 for the RWKV World tokenizer, 256 for bytes).")
    hidden_size: int = _f(768, "Model width C (n_embd). Must be a multiple of head_size.")
    num_layers: int = _f(12, "Number of blocks (RWKV-7 and attention together).")
    head_size: int = _f(64, "RWKV head size N (64 is the official size; 16/32/64/128 work in PyTorch).")
    num_attention_heads: int | None = _f(
        None, "Heads of the Transformer attention blocks (default: hidden_size // 64).")
    attention_layers: list[int] = _f([], "Indices of blocks that are Transformer attention blocks.")
    layer_pattern: str | None = _f(
        None, "Alternative to attention_layers: a string of 'R' (RWKV) and 'A' (attention), "
              "repeated to num_layers, e.g. 'RRRA'.")
    intermediate_size: int | None = _f(
        None, "Attention-block MLP width (default 4*hidden_size; RWKV FFN is always 4*C per the spec).")
    d_decay: int | None = _f(None, "Decay LoRA rank (default: official rule from hidden_size).")
    d_aaa: int | None = _f(None, "In-context learning-rate LoRA rank (default: official rule).")
    d_mv: int | None = _f(None, "Value-residual LoRA rank (default: official rule).")
    d_gate: int | None = _f(None, "Output-gate LoRA rank (default: official rule).")
    rwkv_chunk_size: int = _f(1024, "Tokens per chunk when forward(use_chunking=True).")
    rwkv_chunk_overlap: int = _f(
        0, "Tokens of the previous chunk re-processed so attention blocks see left context; < chunk size.")
    rwkv_use_learnable_states: bool = _f(False, "Trainable initial WKV and token-shift states per RWKV layer.")
    rwkv_state_compression: bool = _f(False, "Store carried states compressed (see state_compression).")
    state_compression: str = _f("bf16", "Compression scheme for carried states: bf16, fp16 or int8.")
    use_position_embeddings: bool = _f(False, "Add learned absolute position embeddings after ln0.")
    max_position_embeddings: int = _f(8192, "Maximum position for the learned position embeddings.")
    wkv_impl: str = _f("auto", "WKV implementation: auto, sequential, chunked or cuda.")

    def __init__(self, **kwargs: Any):
        names = {f.name: f for f in dataclasses.fields(self)}
        for key in kwargs:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(f"ModelConfig: unknown field '{key}'{extra}")
        for name, f in names.items():
            if name in kwargs:
                value = kwargs[name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, name, value)
        self._validate()

    # --- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(cond: bool, field_name: str, msg: str):
            if not cond:
                raise ConfigError(f"ModelConfig.{field_name}: {msg} (got {getattr(self, field_name)!r})")

        for name in ("vocab_size", "hidden_size", "num_layers", "head_size", "rwkv_chunk_size",
                     "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "expected a positive integer")
        for name in ("num_attention_heads", "intermediate_size", "d_decay", "d_aaa", "d_mv", "d_gate"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0), name,
                 "expected a positive integer or null")
        for name in ("rwkv_use_learnable_states", "rwkv_state_compression", "use_position_embeddings"):
            need(isinstance(getattr(self, name), bool), name, "expected true or false")
        need(self.head_size % 4 == 0, "head_size", "expected a multiple of 4")
        need(self.hidden_size % self.head_size == 0, "hidden_size",
             f"must be a multiple of head_size={self.head_size}")
        ov = self.rwkv_chunk_overlap
        need(isinstance(ov, int) and not isinstance(ov, bool) and 0 <= ov < self.rwkv_chunk_size,
             "rwkv_chunk_overlap", f"expected an integer in [0, rwkv_chunk_size={self.rwkv_chunk_size})")
        need(self.state_compression in STATE_COMPRESSION_SCHEMES, "state_compression",
             f"expected one of {STATE_COMPRESSION_SCHEMES}")
        need(self.wkv_impl in WKV_IMPLS, "wkv_impl", f"expected one of {WKV_IMPLS}")
        need(isinstance(self.attention_layers, (list, tuple))
             and all(isinstance(i, int) and not isinstance(i, bool) for i in self.attention_layers),
             "attention_layers", "expected a list of block indices")
        self.attention_layers = sorted(set(int(i) for i in self.attention_layers))
        need(all(0 <= i < self.num_layers for i in self.attention_layers), "attention_layers",
             f"indices must be in [0, num_layers={self.num_layers})")
        if self.layer_pattern is not None:
            p = self.layer_pattern
            need(isinstance(p, str) and len(p) > 0 and set(p.upper()) <= {"R", "A"}, "layer_pattern",
                 "expected a string of 'R' and 'A'")
            from_pattern = [i for i in range(self.num_layers) if p.upper()[i % len(p)] == "A"]
            need(not self.attention_layers or self.attention_layers == from_pattern, "layer_pattern",
                 f"disagrees with attention_layers={self.attention_layers}")
            self.attention_layers = from_pattern
        if self.attention_layers:
            heads = self.attention_heads
            need(self.hidden_size % heads == 0, "num_attention_heads",
                 f"hidden_size={self.hidden_size} must be divisible by it")

    # --- derived sizes ------------------------------------------------------------------------
    @property
    def n_head(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def attention_heads(self) -> int:
        return self.num_attention_heads or max(1, self.hidden_size // 64)

    @property
    def ffn_size(self) -> int:
        return 4 * self.hidden_size

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def lora_dims(self) -> dict[str, int]:
        C = self.hidden_size
        return {
            "w": self.d_decay or lora_dim(2.5, 0.5, C),
            "a": self.d_aaa or lora_dim(2.5, 0.5, C),
            "v": self.d_mv or lora_dim(1.7, 0.5, C),
            "g": self.d_gate or lora_dim(5, 0.5, C),
        }

    def is_attention_layer(self, i: int) -> bool:
        return i in self.attention_layers

    @property
    def is_pure_rwkv(self) -> bool:
        return not self.attention_layers

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(getattr(self, f.name)) if f.name == "attention_layers" else getattr(self, f.name))
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)
