"""Gradient-norm clipping over parameters that may be DTensors on different meshes.

torch's clip_grad_norm_ needs every gradient on one mesh (or none); with tensor, expert and
data parallelism the model mixes plain tensors with DTensors on several meshes. Norms are taken
per group of equal (mesh, placements), completed with one reduction each, then combined; under
pipeline parallelism the squares are then summed over the pp ranks, which hold different layers.
Gradients left as partial sums over the tp ranks are first summed once, in place (see
_reduce_partial_grads).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def _group_key(g: torch.Tensor):
    return (g.device_mesh, g.placements) if isinstance(g, DTensor) else None


def _reduce_partial_grads(parameters: list) -> None:
    """A replicated weight that DTensor ran on sharded inputs (a norm under sequence parallelism) gets
    its gradient as partial sums over the tp ranks; every operation that reads it whole all-reduces it
    anew (the norm here, then AdamW three times). Summed once here, in place of the gradient, instead."""
    for p in parameters:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, pp_group: dist.ProcessGroup | None = None,
                   counted=None) -> torch.Tensor:
    """Clips in place when max_norm > 0; returns the total 2-norm (identical on every rank).
    `pp_group`: the group over which the ranks hold different parameters (pipeline stages; an
    engine's tensor-parallel slices), whose squares are summed. `counted`: the parameters the norm
    counts when not all (a tensor replicated over that group counted on one rank only)."""
    parameters = list(parameters)
    _reduce_partial_grads(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict = {}
    for g in grads if counted is None else [p.grad for p in counted if p.grad is not None]:
        groups.setdefault(_group_key(g), []).append(g)
    total_sq = torch.zeros((), dtype=torch.float64)
    for key, members in groups.items():
        norm = torch.nn.utils.get_total_norm(members, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # sums the squares of the shards across the mesh
        total_sq += norm.double().cpu() ** 2
    if pp_group is not None:
        on_device = total_sq.to(grads[0].device)  # the group's backend may not take CPU tensors
        dist.all_reduce(on_device, group=pp_group)
        total_sq = on_device.cpu()
    total = total_sq.sqrt().float()
    coef = max_norm / (float(total) + 1e-6)
    if max_norm > 0 and coef < 1.0:
        for g in grads:  # a Python scalar multiplies plain tensors and DTensors alike
            g.mul_(coef)
    return total
