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


def train_step(model: RWKVModel, x) -> float:
    """One next-token loss on x (inputs x[:, :-1], labels x[:, 1:]) and its backward; returns the loss."""
    loss = model(x[:, :-1], labels=x[:, 1:], shift_labels=False, return_logits=False).loss
    loss.backward()
    return loss.item()


def make_chunked_model(seed=0, **kw) -> RWKVModel:
    """The chunking and checkpointing tests' model (train mode); `kw` overrides CHUNKED."""
    return _perturbed({**CHUNKED, **kw}, seed, 0.1)
