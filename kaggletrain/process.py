"""How a kaggletrain process ends (no torch import: the CLI entry point uses it).

Objects that own a torch.distributed process group (the Trainer, through DDP's Reducer) are never freed in a
distributed process: freeing the last reference runs ProcessGroupGloo's destructor with the GIL held, and it
joins a gloo worker thread that may be freeing a finished work's tensors, which needs the GIL -- a deadlock
seen at the end of a finished two-process CPU run. `exit_process` ends such a process with os._exit instead.
"""

from __future__ import annotations

import os
import sys

_held: list = []


def hold_until_exit(obj) -> None:
    """Keep `obj` alive until `exit_process` (only matters in a distributed run)."""
    _held.append(obj)


def exit_process(code: int) -> None:
    """sys.exit(code), or, after a distributed run held objects, flush and os._exit(code) (no destructors)."""
    if _held:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
