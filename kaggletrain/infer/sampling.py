"""Next-token selection: repetition penalty, temperature, top-k, top-p, then a draw (or argmax).

All functions work on a batch of logits [B, V] at once, so batch decoding costs one call per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kaggletrain.errors import KaggletrainError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy (argmax)
    top_p: float = 1.0                # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0                    # 0 = no limit
    repetition_penalty: float = 1.0   # CTRL-style: seen tokens' logits divided (>0) or multiplied (<0) by it

    def __post_init__(self):
        def bad(name, expected):
            raise KaggletrainError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if not (self.temperature >= 0):
            bad("temperature", "a number >= 0 (0 = greedy)")
        if not (0 < self.top_p <= 1):
            bad("top_p", "in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad("top_k", "an integer >= 0 (0 = off)")
        if not (self.repetition_penalty > 0):
            bad("repetition_penalty", "a number > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V] float32; seen [B, V] bool (tokens already in the prompt or the output)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. The most likely token always survives."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_next(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, V] → next token ids [B] (long)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
