"""Weight initialization that depends only on (seed, parameter name).

Each full parameter is drawn from its own generator seeded by a hash of the run seed and the
parameter's name, so the same seed gives the same weights whatever else is built, in whatever
order, and however the parameter is later sharded. Matrices are normal(0, std); those that
write into the residual stream (attention `wo`, SwiGLU and expert `w2`) get std / sqrt(2 * n_layers)
so the residual's variance does not grow with depth; norms start at 1 and biases at 0.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1


def _is_norm(module: nn.Module) -> bool:
    # RMSNorm and LayerNorm variants: scale starts at 1, shift at 0
    return "norm" in type(module).__name__.lower()


def _writes_residual(full_name: str) -> bool:
    return full_name.endswith((".wo.weight", ".w2.weight", "experts.w2"))


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float, n_layers: int) -> None:
    residual_std = std / math.sqrt(2 * n_layers)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if _is_norm(module):
                param.fill_(1.0 if param_name == "weight" else 0.0)
            elif param_name == "bias" or param_name.endswith("_bias"):
                param.zero_()
            else:
                gen = torch.Generator().manual_seed(_seed_for(seed, full_name))
                scale = residual_std if _writes_residual(full_name) else std
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
