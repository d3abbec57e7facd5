"""Small random RWKV-7 models shared by the tests."""

import torch

from kaggletrain.model import ModelConfig, RWKVModel

TINY = dict(vocab_size=256, hidden_size=128, num_layers=2)
# Chunking and checkpointing tests: 8-token chunks, the chunked WKV.
CHUNKED = dict(hidden_size=32, num_layers=2, head_size=16, rwkv_chunk_size=8, rwkv_chunk_overlap=0,
               wkv_impl="chunked")


def _perturbed(cfg: dict, seed: int, noise: float) -> RWKVModel:
    """Official init plus noise everywhere (the init zeroes every output projection), so every parameter
    influences the logits."""
    torch.manual_seed(seed)
    model = RWKVModel(ModelConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


def make_model(seed=0, **kw) -> RWKVModel:
    """The generation and interop tests' model, in eval mode."""
    return _perturbed({**TINY, **kw}, seed, 0.05).eval()


def make_chunked_model(seed=0, **kw) -> RWKVModel:
    """The chunking and checkpointing tests' model (train mode); `kw` overrides CHUNKED."""
    return _perturbed({**CHUNKED, **kw}, seed, 0.1)
