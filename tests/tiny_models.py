"""A small random RWKV-7 model shared by the generation and interop tests."""

import torch

from kaggletrain.model import ModelConfig, RWKVModel

TINY = dict(vocab_size=256, hidden_size=128, num_layers=2)


def make_model(seed=0, **kw) -> RWKVModel:
    """Official init plus noise everywhere, so every parameter influences the logits."""
    torch.manual_seed(seed)
    model = RWKVModel(ModelConfig(**{**TINY, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()
