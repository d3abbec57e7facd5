"""Transformer block for hybrid models: pre-norm causal self-attention (SDPA) + MLP.

No rotary/positional term inside attention: in a hybrid the RWKV blocks carry order information
(and `use_position_embeddings` adds absolute positions at the input). Outputs are zero-initialised
like RWKV's `att.output`/`ffn.value`, so a new block starts as the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kaggletrain.model.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.hidden_size
        self.n_head = cfg.attention_heads
        self.head_dim = C // self.n_head
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)

    def forward(self, x, past=None, valid=None):
        """x: [B, T, C]; past: (k, v, valid_past) with k, v [B, h, Tp, d]; valid: [B, T] bool or None.
        Returns (out [B, T, C], (k, v, valid_all))."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
            valid_all = torch.cat([past[2], valid], dim=1)
        else:
            valid_all = valid
        Tk = k.shape[2]
        if past is None and bool(valid.all()):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Query i (absolute index Tk - T + i) may see keys j <= that index that are real tokens;
            # it always sees itself so rows of padded queries never become all -inf (NaN).
            qi = torch.arange(T, device=x.device)[:, None] + (Tk - T)
            kj = torch.arange(Tk, device=x.device)[None, :]
            allowed = (kj <= qi)[None] & valid_all[:, None, :]
            allowed = allowed | (kj == qi)[None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        out = self.proj(y.transpose(1, 2).reshape(B, T, C))
        return out, (k, v, valid_all)


class AttentionBlock(nn.Module):
    """ln1 → causal self-attention → residual; ln2 → MLP (GELU) → residual. Block 0 also owns ln0."""

    is_rwkv_block = False

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.hidden_size
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_fc = nn.Linear(C, cfg.mlp_size, bias=False)
        self.mlp_proj = nn.Linear(cfg.mlp_size, C, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for ln in (getattr(self, "ln0", None), self.ln1, self.ln2):
            if ln is not None:
                nn.init.ones_(ln.weight)
                nn.init.zeros_(ln.bias)
        nn.init.normal_(self.attn.qkv.weight, std=0.02)
        nn.init.normal_(self.mlp_fc.weight, std=0.02)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.mlp_proj.weight)

    def forward(self, x, past=None, valid=None):
        dx, kv = self.attn(self.ln1(x), past, valid)
        x = x + dx
        x = x + self.mlp_proj(F.gelu(self.mlp_fc(self.ln2(x))))
        return x, kv
