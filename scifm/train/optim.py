"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate

from scifm.config import TrainerConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    # norms, biases and other vectors are not decayed: shrinking them toward 0 only hurts
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=_fusable(decay + no_decay))


def _fusable(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (0.17x the default step's time on CPU for the tiny model:
    `python bench/optimizer_step.py`) takes a group's tensors in one call, so they must be all plain
    tensors or all DTensors. TP without FSDP mixes the two, and steps tensor by tensor. DTensors on
    several meshes (experts on their own mesh under ep, FSDP's over dp_shard) fuse where the
    installed torch can, which _fused_across_meshes asks it."""
    meshes = {p.device_mesh if isinstance(p, DTensor) else None for p in params}
    if len(meshes) <= 1:
        return True
    return None not in meshes and _fused_across_meshes(tuple(meshes), params[0].device)


def _fused_across_meshes(meshes: tuple, device: torch.device) -> bool:
    """One fused AdamW step over a replicated one-element DTensor on each mesh: whether this torch's
    DTensor can run the fused kernel over tensors of several meshes (later releases can). Pointwise
    on replicated tensors, so it runs no collective and every rank answers alike."""
    probe = [torch.nn.Parameter(DTensor.from_local(torch.zeros(1, device=device), mesh,
                                                   [Replicate()] * mesh.ndim, run_check=False))
             for mesh in meshes]
    for p in probe:
        p.grad = torch.ones_like(p)
    try:
        torch.optim.AdamW(probe, lr=1e-3, fused=True).step()
    except (RuntimeError, NotImplementedError):
        return False
    return True


# how torch's AdamW runs, not what it computes: a checkpoint's choice never overrides this process's
IMPLEMENTATION_FLAGS = ("params", "fused", "foreach", "capturable", "differentiable")


def saved_hyperparameters(param_groups: list[dict]) -> list[dict]:
    """A checkpoint's optimizer param groups without their parameters and implementation flags."""
    return [{k: v for k, v in g.items() if k not in IMPLEMENTATION_FLAGS} for g in param_groups]


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Multiplier of trainer.lr for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
