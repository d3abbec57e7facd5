"""Batch text generation for RWKVModel: prefill all prompts at once, then decode one token per step.

Prompts of different lengths are left-padded with an attention mask. The model treats masked positions
as exact identity steps (state untouched), so each row's state after prefill equals running that prompt
alone, and every row then decodes in lock-step (one-token steps: infer/fast.py). A row that finishes (stop sequence, EOS, callback) either
leaves the batch (state rows dropped) or, when the final state is wanted, keeps stepping on a masked
dummy token, which again leaves its state untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from kaggletrain.errors import KaggletrainError
from kaggletrain.infer.fast import DecodeStep
from kaggletrain.infer.runner import run_last
from kaggletrain.infer.sampling import SamplingParams, select_next
from kaggletrain.model.state import ModelState

# stream(new_tokens) is called once per step with one entry per prompt: the token just generated, or
# None for a row that had already finished. It may return row indices (or True for all rows) to stop.
StreamCallback = Callable[[list], Union[None, bool, Iterable[int]]]


@dataclass
class GenerationOutput:
    tokens: list[list[int]]                      # generated ids per prompt (a matched stop sequence included)
    finish_reasons: list[str] = field(default_factory=list)   # "length", "stop", "eos" or "callback"
    state: Optional[ModelState] = None           # after prompt + all generated tokens (return_state=True)


def _as_prompts(input_ids, attention_mask) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise KaggletrainError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        rows = input_ids.tolist()
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise KaggletrainError("attention_mask must have the shape of input_ids")
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, attention_mask.tolist())]
        return rows
    if attention_mask is not None:
        raise KaggletrainError("attention_mask is only accepted with a tensor of input_ids")
    seq = list(input_ids)
    if seq and all(isinstance(t, int) for t in seq):
        return [seq]
    return [list(p) for p in seq]


def _check_prompts(prompts: list[list[int]], vocab: int) -> None:
    if not prompts:
        raise KaggletrainError("generate: no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise KaggletrainError(f"generate: prompt {i} is empty (give at least one token)")
        bad = [t for t in p if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise KaggletrainError(f"generate: prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def _batch_state(state: Optional[ModelState], B: int) -> Optional[ModelState]:
    if state is None:
        return None
    n = state.batch_size
    if n == B:
        return state
    if n == 1:  # one saved state (e.g. a shared system prompt) for every prompt
        return state.select([0] * B)
    raise KaggletrainError(f"generate: the state has batch size {n}, but {B} prompts were given")


def _ends_with(seq: list[int], stops: Sequence[Sequence[int]]) -> bool:
    return any(len(s) <= len(seq) and seq[len(seq) - len(s):] == list(s) for s in stops)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, repetition_penalty: float = 1.0,
             stop_token_sequences: Optional[Sequence[Sequence[int]]] = None,
             eos_token_id: Optional[int] = None, seed: Optional[int] = None,
             state: Optional[ModelState] = None, return_state: bool = False,
             stream: Optional[StreamCallback] = None,
             attention_mask: Optional[torch.Tensor] = None) -> GenerationOutput:
    """Generate continuations of one or several prompts.

    input_ids: a list of token ids (one prompt), a list of such lists (a batch, any lengths), or a tensor
    [B, T] / [T] (with attention_mask [B, T] marking real tokens when rows are padded).
    Sampling: repetition penalty (over prompt and output), then temperature (0 = greedy), top-k, top-p.
    stop_token_sequences: a row stops once its output ends with one of them. eos_token_id: stop token.
    seed: makes sampling reproducible (a private torch.Generator; the global RNG is not touched).
    state: continue from a saved ModelState (batch 1 = shared by all prompts, or one row per prompt).
    return_state: also return the state after each prompt + its generated tokens (one extra step).
    stream: see StreamCallback.
    """
    params = SamplingParams(float(temperature), float(top_p), int(top_k), float(repetition_penalty))
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise KaggletrainError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    stops = [list(s) for s in (stop_token_sequences or []) if len(s) > 0]
    V = model.config.vocab_size
    prompts = _as_prompts(input_ids, attention_mask)
    _check_prompts(prompts, V)
    B = len(prompts)
    device = model.emb.weight.device
    was_training = model.training
    model.eval()
    try:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(seed))
        ids, mask = _left_pad(prompts, device)
        logits, st = run_last(model, ids, mask, _batch_state(state, B))
        decode = DecodeStep(model)

        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, V, dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                seen[i, torch.tensor(p, device=device)] = True

        out: list[list[int]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        done = [False] * B
        rows = list(range(B))       # original index of each batch row still in the computation
        for step in range(max_new_tokens):
            nxt = select_next(logits, params, seen, gen)
            # While the state must stay full-size, finished rows stay in the batch; their pick is ignored.
            new = nxt.tolist()
            report: list = [None] * B
            for r, orig in enumerate(rows):
                if done[orig]:
                    continue
                tok = new[r]
                out[orig].append(tok)
                report[orig] = tok
                if eos_token_id is not None and tok == eos_token_id:
                    done[orig], reasons[orig] = True, "eos"
                elif stops and _ends_with(out[orig], stops):
                    done[orig], reasons[orig] = True, "stop"
            if stream is not None:
                asked = stream(report)
                if asked is True:
                    asked = range(B)
                for orig in asked or ():
                    if not done[orig]:
                        done[orig], reasons[orig] = True, "callback"
            if all(done) or step == max_new_tokens - 1:
                break
            if seen is not None:
                seen[torch.arange(len(rows), device=device), nxt] = True
            if return_state:
                step_mask = torch.tensor([0 if done[o] else 1 for o in rows], device=device)
                logits, st = decode(nxt, st, None if bool(step_mask.all()) else step_mask)
            else:
                keep = [r for r, o in enumerate(rows) if not done[o]]
                if len(keep) < len(rows):  # drop finished rows: the rest decode as a smaller batch
                    idx = torch.tensor(keep, device=device)
                    st, nxt = st.select(idx), nxt[idx]
                    seen = None if seen is None else seen[idx]
                    rows = [rows[r] for r in keep]
                logits, st = decode(nxt, st)
        if return_state:
            # Every row has exactly one token not yet fed (its last); feed them all in one step.
            last = [o[-1] if o else None for o in out]
            if any(t is not None for t in last):
                feed = torch.tensor([t if t is not None else 0 for t in last], device=device)
                m = torch.tensor([1 if t is not None else 0 for t in last], device=device)
                _, st = decode(feed, st, None if bool(m.all()) else m)
        return GenerationOutput(out, reasons, st if return_state else None)
    finally:
        model.train(was_training)
