"""Data pipeline: sources -> tokenizer -> cached memmap tokens -> deterministic windows.

    from kaggletrain.data import prepare_data, WindowSampler, build_tokenizer, tokenizer_from_dict
    prepared = prepare_data(cfg.data, seq_len=cfg.train.seq_len, progress=True)
    sampler = WindowSampler(prepared.train_tokens, seq_len, global_batch=B, seed=S, rank=r, world_size=W)
    x, y = sampler.batch(step)        # int64 [B // W, seq_len]

Importing this package is cheap (numpy only); torch is imported when the first batch is built.
"""

from kaggletrain.data.prepare import PreparedData, check_vocab, prepare_data
from kaggletrain.data.sampler import WindowSampler, eval_batches, eval_offsets, window_offsets
from kaggletrain.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    WorldTokenizer,
    build_tokenizer,
    tokenizer_from_dict,
)

__all__ = [
    "prepare_data",
    "PreparedData",
    "check_vocab",
    "WindowSampler",
    "eval_batches",
    "eval_offsets",
    "window_offsets",
    "build_tokenizer",
    "tokenizer_from_dict",
    "Tokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "WorldTokenizer",
]
