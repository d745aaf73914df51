"""Router statistics over the global batch: MoE aux losses equal to the single-process ones under DP.

The load-balance loss E * sum_e f_e * P_e is a product of batch statistics, so the mean of per-rank
losses is not the loss of the whole batch. `apply_global_router_stats` makes every MoE sum its
statistics (routed counts, router-probability sums, z-loss sums, token counts) over the
data-parallel group with a differentiable all-reduce; every rank then holds the global loss.

Gradient scaling (why the trainer keeps aux_grad_scale = 1 / grad_accum):
the backward of a SUM all-reduce is a SUM all-reduce of the gradients. Each of the G ranks of the
group injects d(total)/d(aux) = s into the same global loss, so rank r's router receives
G * s * d(aux)/d(its own statistics). Averaging gradients over the G data-parallel ranks (FSDP/DDP)
gives s * d(aux)/d(all statistics): the single-process gradient for s = 1 / grad_accum. This
matches the LM loss convention ce_sum_local / global_target_count * dp_size, which averaging turns
into the single-process gradient too. It holds when `group` is the group gradients are averaged
over (the flattened "dp" mesh dimension: dp_replicate x dp_shard; tp and pp ranks are not in it).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from scifm.model.transformer import moe_layers


def apply_global_router_stats(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Every MoE in `model` sums its routing statistics over `group` (the data-parallel group).

    Afterwards last_stats and tokens_per_expert_acc hold global counts: feed
    pop_tokens_per_expert() to update_bias as it is, without another all-reduce. Every rank of
    `group` must run every forward (eval included), since each MoE forward now all-reduces.
    """
    reduce_stats = partial(_all_reduce_sum, group=group)
    for moe in moe_layers(model):
        moe.reduce_stats = reduce_stats


def _all_reduce_sum(stat: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    # functional collective: differentiable (backward = SUM all-reduce of the grads) and traceable
    return funcol.all_reduce(stat, "sum", group)
