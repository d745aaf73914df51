"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from scifm.config import TrainerConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    # norms, biases and other vectors are not decayed: shrinking them toward 0 only hurts
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # torch's fused kernel: 0.31x the default step's time on CPU for the tiny model
    # (`python bench/optimizer_step.py`)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)
    if len({_mesh_of(p) for p in decay + no_decay}) > 1:
        _step_one_call_per_mesh(optimizer)
    return optimizer


def _mesh_of(p: torch.Tensor):
    return p.device_mesh if isinstance(p, DTensor) else None


def _by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    on: dict = {}  # mesh (None: plain tensors) -> its parameters, in the group's order
    for p in params:
        on.setdefault(_mesh_of(p), []).append(p)
    return list(on.values())


def _step_one_call_per_mesh(optimizer: torch.optim.AdamW) -> None:
    """The fused kernel takes a param group's tensors in one call, which DTensor runs only when they
    are all plain tensors or all DTensors on one mesh (some torch releases also take several meshes,
    none a mix with plain tensors). TP without FSDP mixes plain tensors and DTensors, and expert
    parallelism puts the experts on a mesh of their own. Around each step, hooks split every group into
    one per mesh (plain tensors as one) and then put the groups back, so the groups that checkpoints
    and the schedule see stay the two built here; the state is keyed by parameter, so it is shared."""
    built: list[list[dict]] = []  # the groups as built, while a step runs on the split ones

    def split(opt: torch.optim.Optimizer, args, kwargs) -> None:
        if built:  # a step that raised ran no post-hook: its groups are still the split ones
            opt.param_groups = built.pop()
        built.append(opt.param_groups)
        opt.param_groups = [dict(group, params=params) for group in opt.param_groups
                            for params in _by_mesh(group["params"])]

    def restore(opt: torch.optim.Optimizer, args, kwargs) -> None:
        opt.param_groups = built.pop()

    optimizer.register_step_pre_hook(split)
    optimizer.register_step_post_hook(restore)


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
