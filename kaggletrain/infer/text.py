"""Text side of generation: the tokenizer for a checkpoint, and streaming decoded text with stop strings.

Tokenizers come from kaggletrain.data (imported lazily; the model side of generation never needs them).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from kaggletrain.errors import KaggletrainError

# A token can end in the middle of a UTF-8 character (World tokens are byte strings); decoding such a
# prefix yields U+FFFD. Hold text back while it ends in one, for at most this many tokens.
_MAX_PENDING = 8


def tokenizer_for(meta: dict, vocab_size: int):
    """The checkpoint's own tokenizer (tokenizer.json), else World for vocab 65536, byte-level for 256."""
    try:
        from kaggletrain.data import build_tokenizer, tokenizer_from_dict
    except ImportError as e:
        raise KaggletrainError(f"text generation needs kaggletrain.data's tokenizers, which failed to import: {e}")
    saved = meta.get("tokenizer")
    if saved is not None:
        tok = tokenizer_from_dict(saved)
    elif vocab_size == 65536:
        tok = build_tokenizer("world")
    elif vocab_size == 256:
        tok = build_tokenizer("byte")
    else:
        raise KaggletrainError(
            f"{meta.get('path')}: no tokenizer.json in the checkpoint and vocab_size={vocab_size} matches no "
            f"built-in tokenizer (65536 = World, 256 = bytes)")
    if tok.vocab_size > vocab_size:
        raise KaggletrainError(f"tokenizer has {tok.vocab_size} ids but the model only {vocab_size}")
    return tok


class TextStream:
    """Turns one row's generated tokens into text as it grows, holding back what is not final yet:
    an unfinished UTF-8 character, and a tail that might be the start of a stop string.

        push(token) -> (new_text, stopped)     finish() -> remaining text
    `text` is the full output (cut before the stop string once one appears).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self.decode = decode
        self.stops = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending: list[int] = []
        self.text = ""          # decoded so far
        self.emitted = 0        # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending.append(token)
        chunk = self.decode(self.pending)
        if chunk.endswith("\ufffd") and len(self.pending) < _MAX_PENDING:
            return "", False
        self.pending = []
        self.text += chunk
        # Held-back text may hold the start of a stop string that `chunk` completes.
        cut = self._find_stop(self.emitted)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self.hold), False

    def finish(self) -> str:
        if self.pending and not self.stopped:
            self.text += self.decode(self.pending)
            self.pending = []
            cut = self._find_stop(self.emitted)
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
        return self._take(len(self.text))

    def _find_stop(self, start: int) -> Optional[int]:
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
