"""Recurrent state of the model, per layer, and its compression.

RWKV layer:      att_shift [B, C] (last ln1 output), wkv [B, H, N, N] float32 ([value, key] layout, as the
                 rwkv pip package), ffn_shift [B, C] (last ln2 output).
Attention layer: k, v [B, heads, T_past, head_dim] and valid [B, T_past] (False at padded positions).
`position` [B] counts the real tokens consumed so far (continues learned position embeddings).

Compression (`compress(scheme)`) is for carried/stored states: bf16/fp16 halve memory, int8 with a
float32 scale per state row quarters it. Expanded back to float32 before use. Gradients pass through
(straight-through for int8) so compressed carrying still trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch


class _STEQuant(torch.autograd.Function):
    """int8 quantise/dequantise with per-row scales; identity gradient (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return dequantize_int8(*quantize_int8(x))

    @staticmethod
    def backward(ctx, g):
        return g


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per last-dim row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127.0
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


@dataclass
class CompressedTensor:
    """A tensor stored in a smaller dtype (or int8 + per-row scales). `expand()` gives float32."""

    data: torch.Tensor
    scale: Optional[torch.Tensor] = None
    dtype: torch.dtype = torch.float32

    @classmethod
    def compress(cls, x: torch.Tensor, scheme: str) -> "CompressedTensor":
        if scheme == "int8":
            q, s = quantize_int8(x.detach())
            return cls(q, s, x.dtype)
        small = {"bf16": torch.bfloat16, "fp16": torch.float16}[scheme]
        return cls(x.to(small), None, x.dtype)

    def expand(self) -> torch.Tensor:
        if self.scale is not None:
            return dequantize_int8(self.data, self.scale).to(self.dtype)
        return self.data.to(self.dtype)

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (self.scale.numel() * 4 if self.scale is not None else 0)


def roundtrip(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """Differentiable compress+expand, used when carrying states between chunks in training."""
    if scheme == "int8":
        return _STEQuant.apply(x)
    small = {"bf16": torch.bfloat16, "fp16": torch.float16}[scheme]
    return x.to(small).to(x.dtype)


@dataclass
class RWKVLayerState:
    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor


@dataclass
class AttentionLayerState:
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor


@dataclass
class ModelState:
    layers: list = field(default_factory=list)
    position: Optional[torch.Tensor] = None  # [B] long

    # ---- generic tensor maps ----
    def _map(self, fn) -> "ModelState":
        out = []
        for ls in self.layers:
            if ls is None:
                out.append(None)
                continue
            out.append(type(ls)(**{f.name: fn(f.name, getattr(ls, f.name)) for f in fields(ls)}))
        pos = self.position
        return ModelState(out, pos)

    def detach(self) -> "ModelState":
        return self._map(lambda n, t: t.detach() if isinstance(t, torch.Tensor) else t)

    def to(self, device) -> "ModelState":
        s = self._map(lambda n, t: t.to(device) if isinstance(t, (torch.Tensor,)) else t)
        s.position = None if self.position is None else self.position.to(device)
        return s

    def select(self, index) -> "ModelState":
        """Rows `index` of the batch (for batch generation bookkeeping)."""
        s = self._map(lambda n, t: t[index] if isinstance(t, torch.Tensor) else t)
        s.position = None if self.position is None else self.position[index]
        return s

    @property
    def batch_size(self) -> int:
        for ls in self.layers:
            if ls is not None:
                return (ls.att_shift if isinstance(ls, RWKVLayerState) else ls.valid).shape[0]
        return 0 if self.position is None else self.position.shape[0]

    def compress(self, scheme: str) -> "ModelState":
        """Compress RWKV states (WKV matrix and token shifts); attention KV caches are kept as they are."""
        def fn(name, t):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and name in ("wkv", "att_shift", "ffn_shift"):
                return CompressedTensor.compress(t, scheme)
            return t
        return self._map(fn)

    def expand(self) -> "ModelState":
        return self._map(lambda n, t: t.expand() if isinstance(t, CompressedTensor) else t)

    def nbytes(self) -> int:
        total = 0
        for ls in self.layers:
            if ls is None:
                continue
            for f in fields(ls):
                t = getattr(ls, f.name)
                total += t.nbytes() if isinstance(t, CompressedTensor) else t.numel() * t.element_size()
        return total

    # ---- files ----
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict of plain tensors (compressed entries stored as data + scale) for safetensors/torch.save."""
        out: dict[str, torch.Tensor] = {}
        for i, ls in enumerate(self.layers):
            if ls is None:
                continue
            kind = "rwkv" if isinstance(ls, RWKVLayerState) else "attn"
            for f in fields(ls):
                t = getattr(ls, f.name)
                key = f"layers.{i}.{kind}.{f.name}"
                if isinstance(t, CompressedTensor):
                    out[key + ".data"] = t.data.contiguous()
                    if t.scale is not None:
                        out[key + ".scale"] = t.scale.contiguous()
                else:
                    out[key] = t.contiguous()
        if self.position is not None:
            out["position"] = self.position
        return out

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], num_layers: int) -> "ModelState":
        layers: list = [None] * num_layers
        grouped: dict[int, dict] = {}
        for key, t in d.items():
            if key == "position":
                continue
            _, i, kind, name, *rest = key.split(".")
            g = grouped.setdefault(int(i), {"kind": kind})
            if rest:
                g.setdefault(name, {})[rest[0]] = t
            else:
                g[name] = t
        for i, g in grouped.items():
            kind = g.pop("kind")
            vals = {}
            for name, t in g.items():
                if isinstance(t, dict):
                    t = CompressedTensor(t["data"], t.get("scale"), torch.float32).expand()
                vals[name] = t.float() if name in ("wkv",) else t
            layers[i] = (RWKVLayerState if kind == "rwkv" else AttentionLayerState)(**vals)
        return cls(layers, d.get("position"))
