"""Optimizer parameter groups (the official RWKV-7 recipe) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from kaggletrain.model.model import is_sharded


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on 2-D `.weight` matrices (emb, head, Linear layers); `att.w0` at 2x lr.
    LoRA matrices (w1, w2, ...) are 2-D but are not `.weight`s and get no decay, as in RWKV-LM."""
    decay, no_decay, lr2x = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            lr2x.append(p)
        elif weight_decay > 0 and p.dim() == 2 and name.endswith(".weight"):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        {"params": lr2x, "weight_decay": 0.0, "lr_scale": 2.0, "name": "w0_2x"},
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model, lr: float, weight_decay: float, betas, eps: float, device: torch.device):
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    kw = {}
    if device.type in ("cuda", "cpu") and not is_sharded(model):  # FSDP's DTensors: the default AdamW
        kw["fused"] = True  # one kernel for all parameters; on CPU ~3x faster than the per-tensor loop
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to `lr`, then cosine/linear decay to `min_lr` at `total`, or constant."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
