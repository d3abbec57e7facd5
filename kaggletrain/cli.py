"""The `kaggletrain` command line: parse, call one function, render. No logic of its own.

Each command lives in kaggletrain/commands/<name>.py and registers itself on `app`.
User errors (KaggletrainError) print one red line and exit 2; `--debug` keeps tracebacks.
So do failures that are the machine's doing rather than the program's (disk full, file size limit,
read-only or permission-denied paths: `environment_error`). See docs/reliability.md.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from typing import Optional

import typer
from rich.console import Console

from kaggletrain.errors import KaggletrainError, RankFailed
from kaggletrain.train.out_of_memory import describe, is_out_of_memory

app = typer.Typer(
    name="kaggletrain",
    help="Train RWKV-7 language models from one YAML config: CPU, GPU, torchrun or Kaggle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _register_commands() -> None:
    # Importing a command module registers its command(s) on `app`; heavy imports stay inside commands.
    import importlib
    import pkgutil

    import kaggletrain.commands as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        importlib.import_module(f"kaggletrain.commands.{mod}")


# errno values that mean "the machine refused": space, quota, size limit, read-only, permissions, I/O.
_ENV_ERRNOS = {errno.ENOSPC: "", errno.EDQUOT: "", errno.EFBIG: "file size limit (ulimit -f) or disk full",
               errno.EROFS: "", errno.EACCES: "", errno.EPERM: "", errno.EIO: ""}


def environment_error(e: BaseException) -> Optional[str]:
    """One line for what failed by the machine's doing (disk full, read-only, no permission, out of memory, an
    emulated kernel build: the one build that raises rather than falls back), or None for anything else (a
    bug: it keeps its traceback). Also recognises the non-OSError exceptions that
    safetensors ("... (os error 28)") and torch.save ("unexpected pos", "failed writing") raise."""
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if code is None and type(e).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)", text)
        code = int(m.group(1)) if m else None
    if code in _ENV_ERRNOS:
        where = getattr(e, "filename", None)
        what = getattr(e, "strerror", None) or os.strerror(code)
        hint = _ENV_ERRNOS[code]
        return f"{str(where) + ': ' if where else ''}{what}" + (f" ({hint})" if hint else "")
    if isinstance(e, RuntimeError) and re.search(r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing", text):
        return f"writing a PyTorch file failed ({text[:160]}): out of disk space or a file size limit?"
    if type(e).__name__ == "BuildError":  # rwkv_cuda's: the kernel could not be built or loaded (says why)
        return f"rwkv_cuda: {text}"
    if is_out_of_memory(e):  # (training says more: see Trainer._out_of_memory_as_error)
        line = describe(e)
        return line if line.startswith("out of memory") else f"out of memory: {line}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KAGGLETRAIN_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    _register_commands()
    try:
        result = app(args=argv, prog_name="kaggletrain", standalone_mode=False)
        # In non-standalone mode click returns typer.Exit's code instead of exiting.
        if isinstance(result, int):
            return result
    except KaggletrainError as e:
        if debug:
            raise
        if isinstance(e, RankFailed) and os.environ.get("RANK", "0") != "0":
            return 2  # another rank's error, which rank 0 prints
        err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except SystemExit as e:  # typer/click exits (e.g. --help)
        return int(e.code or 0)
    except Exception as e:
        # Usage errors come from click, which typer may vendor (typer._click): match by interface.
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return e.exit_code
        if type(e).__name__ == "Abort":
            return 1
        line = None if debug else environment_error(e)
        if line is None:
            raise
        err_console.print(f"[bold red]error:[/] {line}", markup=True, highlight=False, soft_wrap=True)
        return 2
    return 0


def entry() -> None:
    """The console script and `python -m kaggletrain`: main(), then end the process (see process.py)."""
    from kaggletrain.process import exit_process

    exit_process(main())


if __name__ == "__main__":
    entry()
