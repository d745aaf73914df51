"""Bytes of parameters, gradients and optimizer state this rank holds (its shards only)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def memory_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.named_parameters())
    optim = sum(_local_bytes(v) for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {
        "param_bytes": sum(_local_bytes(p) for _, p in params),
        "grad_bytes": sum(_local_bytes(p.grad) for _, p in params if p.grad is not None),
        "optimizer_bytes": optim,
        "expert_param_bytes": sum(_local_bytes(p) for n, p in params if ".experts." in n),
    }
