"""Real out-of-memory failures on a machine with plenty of memory: caps on the process's address space
(RLIMIT_AS), so that an allocation or a file mapping really fails with ENOMEM. Imported by the scripts that the
tests run in subprocesses (the cap is per process)."""

import resource


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{key}:"))


def vm_size() -> int:
    """The process's address space now, in bytes."""
    return _status_bytes("VmSize")


def vm_peak() -> int:
    """The largest the process's address space has been, in bytes."""
    return _status_bytes("VmPeak")


def cap_above_now(headroom: int) -> None:
    """From now on the address space may grow by `headroom` bytes only."""
    limit = vm_size() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def capped(fn, headroom: int):
    """`fn` run with the address space allowed to grow by `headroom` bytes only; the cap goes after the call."""
    def call(*args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + headroom, hard))
        try:
            return fn(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return call


def cap_checkpoint_reads(headroom: int) -> None:
    """While a checkpoint or weights file is opened, the address space may grow by `headroom` bytes only: mapping
    a larger file then really fails (ENOMEM), as when a checkpoint does not fit in a machine's memory."""
    import safetensors
    import safetensors.torch
    import torch

    safetensors.torch.load_file = capped(safetensors.torch.load_file, headroom)  # run checkpoints (train, dry run)
    safetensors.safe_open = capped(safetensors.safe_open, headroom)  # eval, generate, export (interop/files.py)
    torch.load = capped(torch.load, headroom)                        # .pth files (mapped too)
