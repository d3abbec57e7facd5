"""`train.distributed: fsdp`: PyTorch FSDP2 (`fully_shard`) for models whose weights + optimizer state do
not fit one GPU (e.g. a 1.5B RWKV-7 fine-tune on Kaggle T4 x2).

Sharding: every block (RWKV or attention) is its own FSDP unit, then the root (embedding, ln_out, head).
Parameters, gradients and AdamW state are sharded over all processes (dim 0 of each tensor); a block's
full weights exist only while that block runs. Parameters stay float32 (the model autocasts its matmuls
itself, exactly as under DDP, so FSDP and DDP runs compute the same thing); gradients are reduce-scattered
after every micro-step (no `set_requires_gradient_sync(False)` during accumulation: keeping unsharded
gradients would cost a full fp32 copy of the model per GPU, which is what FSDP is here to avoid).

Checkpoints (see loop.Trainer.save/load): the full state is gathered to rank 0 on CPU
(`get_model_state_dict(..., full_state_dict=True, cpu_offload=True)`, the same for the optimizer), and
written in the ordinary single-file format: `model.safetensors` (loads into a single-process model for
eval, generate and export) and `trainer_state.pt` whose optimizer state is keyed by parameter name
(FQN), so a checkpoint resumes under FSDP, DDP or one process with any number of processes. Loading
reads the files on rank 0 only and broadcasts (`broadcast_from_rank0=True`), so other nodes need no copy.
Cost: rank 0 needs host RAM for the full fp32 weights + optimizer state (16 bytes/parameter) while saving.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def apply_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard `model` in place over the default process group: one FSDP unit per block, then the root.

    The model may still be on CPU: `fully_shard` moves each unit to `device` as it shards it, so the
    full model never has to sit on one GPU at once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torch.distributed as dist

    # The blocks return views (state slices); FSDP2 warns that an in-place op on such a view would skip
    # its pre-backward hook. RWKVModel never modifies block outputs in place (and the 2-process tests
    # compare FSDP gradients with a single process), so the warning is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        # blocks[0].ln0 is called by the model's embedding step, outside block 0's forward (where block 0's
        # parameters are still sharded): it is its own unit, gathered when it runs.
        if isinstance(getattr(block, "ln0", None), nn.Module):
            fully_shard(block.ln0, mesh=mesh)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) model state on rank 0, on CPU; {} on other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: the full optimizer state keyed by parameter name on rank 0, on CPU; {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_model_state_from_rank0(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Collective: rank 0 passes the full state dict, the others {}; each rank keeps its shard (FSDP) or
    a full copy (DDP / plain module)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(broadcast_from_rank0=True))


def load_optimizer_state_from_rank0(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Collective: like load_model_state_from_rank0 for a name-keyed (FQN) optimizer state dict."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options(broadcast_from_rank0=True))
