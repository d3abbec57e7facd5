"""Deterministic training windows and fixed validation windows.

The batch of optimizer step `s` is a pure function of (seed, s, the token stream, seq_len,
global_batch): the GLOBAL batch's start offsets come from a counter-based hash of (seed, s, row), and
rank r of W processes takes the contiguous rows [r*B/W, (r+1)*B/W). Consequences:

* 1 process and 2 processes see the same global batch at every step (and, with the same
  micro_batch_size, the same micro-batches), so their losses agree;
* resuming at step s, with any number of processes, continues the same data stream: the only
  position to save is the step;
* no RNG state, no epoch bookkeeping, and no dependence on numpy's RNG stream policy (the hash is
  SplitMix64, written out below).

Windows are sampled with replacement, uniformly over all start offsets (as nanoGPT and RWKV-LM do).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from kaggletrain.errors import ConfigError, DataError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def window_offsets(seed: int, step: int, count: int, num_starts: int) -> np.ndarray:
    """`count` start offsets in [0, num_starts) for (seed, step): int64 [count]."""
    s = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    s = _splitmix64(s ^ np.uint64(step & 0xFFFFFFFFFFFFFFFF))
    rows = _splitmix64(s ^ np.arange(count, dtype=np.uint64))
    return (rows % np.uint64(num_starts)).astype(np.int64)


def _gather(tokens: np.ndarray, offsets: np.ndarray, seq_len: int):
    """x, y int64 tensors [len(offsets), seq_len]; y is x shifted left by one token."""
    import torch

    idx = offsets[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    windows = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _need_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"{what} has {len(tokens)} tokens, but one sequence needs train.seq_len + 1 = {seq_len + 1}"
        )


class WindowSampler:
    """Random windows of `seq_len + 1` tokens, deterministic per optimizer step.

    `batch(step)` returns this rank's share of the global batch: x, y int64 [global_batch // world_size,
    seq_len]. `next_batch()` does the same for `self.step` and advances it.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1 or global_batch < 1:
            raise ConfigError(f"seq_len and global_batch must be >= 1, got {seq_len} and {global_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch % world_size:
            raise ConfigError(
                f"train.batch_size={global_batch} cannot be split evenly over {world_size} processes"
            )
        _need_length(tokens, seq_len, "the training data")
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_batch = self.global_batch // self.world_size
        self.step = 0

    @property
    def num_starts(self) -> int:
        return len(self.tokens) - self.seq_len

    def global_offsets(self, step: int) -> np.ndarray:
        """Start offsets of the whole global batch of `step` (the same on every rank)."""
        return window_offsets(self.seed, step, self.global_batch, self.num_starts)

    def batch(self, step: int):
        """(x, y) for this rank at optimizer step `step`."""
        lo = self.rank * self.local_batch
        return _gather(self.tokens, self.global_offsets(step)[lo : lo + self.local_batch], self.seq_len)

    def next_batch(self):
        out = self.batch(self.step)
        self.step += 1
        return out

    def __iter__(self) -> Iterator:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The data position; world size and rank are deliberately absent (they may change on resume)."""
        return {
            "version": 1,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "num_tokens": int(len(self.tokens)),
        }

    def state_mismatch(self, state: dict[str, Any]) -> str | None:
        """Why a saved stream cannot be continued (the data, seq_len or global batch changed), or None."""
        if "num_tokens" in state and int(state["num_tokens"]) != len(self.tokens):
            return (f"cannot continue the saved data stream: it was drawn from {int(state['num_tokens']):,} training "
                    f"tokens and the data now gives {len(self.tokens):,} (the data files changed, or a setting "
                    "that shapes the tokens: data.tokenizer, data.separator, data.document_end, data.max_tokens, "
                    "data.val_fraction)")
        for key, mine in (("seq_len", self.seq_len), ("global_batch", self.global_batch)):
            if key in state and int(state[key]) != int(mine):
                what = {"seq_len": "train.seq_len", "global_batch": "train.batch_size"}[key]
                return (f"cannot continue the saved data stream: {what} was {state[key]} and is now {mine} "
                        "(the config changed since the checkpoint)")
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved stream; refuses if the data, seq_len or global batch changed."""
        problem = self.state_mismatch(state)
        if problem:
            raise DataError(problem)
        self.seed = int(state.get("seed", self.seed))  # the stream is defined by the saved seed
        self.step = int(state.get("step", 0))


def eval_offsets(num_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """Fixed validation windows: non-overlapping, evenly spread over the split, at most `count`."""
    total = (num_tokens - 1) // seq_len  # windows of seq_len + 1 tokens, stride seq_len
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    if count >= total:
        picks = np.arange(total, dtype=np.int64)
    else:
        picks = (np.arange(count, dtype=np.int64) * total) // count
    return picks * seq_len


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None):
    """Deterministic validation batches: list of (x, y) int64 tensors [<= batch_size, seq_len].

    The same windows every time (so validation losses are comparable across steps and runs); with
    `max_batches=None` they cover the whole validation split.
    """
    _need_length(tokens, seq_len, "the validation data")
    limit = (max_batches * batch_size) if max_batches else (len(tokens) - 1) // seq_len
    offsets = eval_offsets(len(tokens), seq_len, limit)
    return [_gather(tokens, offsets[i : i + batch_size], seq_len) for i in range(0, len(offsets), batch_size)]
