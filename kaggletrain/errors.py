"""One error type for user mistakes.

Anything raised as `KaggletrainError` is a problem with the user's input (config, data, checkpoint,
Kaggle credentials...). The CLI prints it as one line and exits with code 2. Every other exception
is a bug and keeps its traceback.
"""


def first_line(e: BaseException) -> str:
    """An error's first line, at most 200 characters (for a one-line warning that quotes it)."""
    return str(e).splitlines()[0][:200] if str(e) else ""


class KaggletrainError(Exception):
    """A user-facing error: the message names the file/key/value and what was expected."""


class ConfigError(KaggletrainError, ValueError):
    """Invalid configuration. Also a ValueError so `ModelConfig(...)` misuse raises ValueError."""


class DataError(KaggletrainError):
    """Unreadable or unsuitable training data."""


class CheckpointError(KaggletrainError):
    """Missing, truncated, foreign or incompatible checkpoint."""


class KaggleError(KaggletrainError):
    """Kaggle metadata, credentials or API failure."""


class RankFailed(KaggletrainError):
    """Under torchrun: another rank's user error, raised on this rank too (the CLI prints it on rank 0 only)."""
