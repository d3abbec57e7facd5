"""torchrun integration: process group set-up from the environment, rank helpers.

Under `torchrun`, RANK/WORLD_SIZE/LOCAL_RANK are set; we use NCCL on GPU and gloo on CPU.
A single process (no torchrun) is world size 1 and never initialises a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from kaggletrain.errors import RankFailed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(info: DistInfo, device: torch.device) -> None:
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kw["device_id"] = device  # binds NCCL to this GPU: barriers never guess the device
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kw)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world_size
    return x


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, info: DistInfo):
    if not (info.enabled and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_if_any_failed(error: Optional[BaseException], info: DistInfo) -> None:
    """Collective (every rank calls it): each rank passes the user error it hit (or None). If any rank
    failed, every rank raises it, so no rank is left waiting in a collective for a peer that has exited
    (which gloo/NCCL would answer with a traceback instead of the one-line error)."""
    if not (info.enabled and dist.is_initialized()):
        if error is not None:
            raise error
        return
    found = [None] * info.world_size
    dist.all_gather_object(found, None if error is None else str(error))
    if error is not None:
        raise error
    first = next((m for m in found if m is not None), None)
    if first is not None:
        raise RankFailed(first)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ---- optimizer state portable across 1 process, DDP and FSDP -------------------------------------
# torch's Optimizer.state_dict() numbers parameters 0..n-1 in param-group order; that numbering is only
# meaningful for one model layout. Checkpoints store the state keyed by parameter name (the FQN format of
# torch.distributed.checkpoint.state_dict), which FSDP, DDP and a single process all understand.

def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def is_fqn_optimizer_state(state: dict) -> bool:
    groups = state.get("param_groups") or []
    return any(isinstance(p, str) for g in groups for p in g.get("params", []))


def optimizer_state_mismatch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Optional[str]:
    """Why a saved optimizer state (name- or index-keyed) cannot be loaded into `optimizer`, or None: its parameter
    groups must hold the same parameters (by name, or by count for index-keyed states), group by group. Settings
    such as train.weight_decay=0 or train.state_tuning change the groups."""
    saved = state.get("param_groups") or []
    own = optimizer.param_groups
    names = _param_names(model, optimizer)
    if len(saved) != len(own):
        return f"{len(saved)} parameter groups saved, {len(own)} in this run"
    start = 0
    for i, (g_saved, g_own) in enumerate(zip(saved, own)):
        mine = names[start:start + len(g_own["params"])]
        start += len(g_own["params"])
        label = g_own.get("name", f"#{i}")
        if is_fqn_optimizer_state(state):
            if list(g_saved["params"]) != mine:
                extra = sorted(set(g_saved["params"]) ^ set(mine))[:2]
                return f"group {label} holds other parameters ({', '.join(extra) or 'another order'})"
        elif len(g_saved["params"]) != len(mine):
            return f"group {label}: {len(g_saved['params'])} parameters saved, {len(mine)} in this run"
    return None


def optimizer_state_to_fqn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An index-keyed Optimizer.state_dict() of (model, optimizer) → keyed by parameter name."""
    if is_fqn_optimizer_state(state):
        return state
    names = _param_names(model, optimizer)
    return {"state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def optimizer_state_from_fqn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A name-keyed optimizer state → index-keyed for Optimizer.load_state_dict (plain modules)."""
    if not is_fqn_optimizer_state(state):
        return state
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    missing = [n for g in state["param_groups"] for n in g["params"] if n not in index]
    if missing:
        raise KeyError(f"optimizer state names parameters this model does not train: {missing[:3]}")
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}
