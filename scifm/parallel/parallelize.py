"""parallelize(model, ctx, cfg): the one place where a layout is applied to a built model.

The model arrives whole and identically initialised on every rank (init depends only on seed and
parameter names); each step below shards it from the outside, in torchtitan's order.
"""

from __future__ import annotations

import torch

from scifm.config import ParallelConfig
from scifm.model.multimodal import ScientificMoE
from scifm.parallel.distributed import DistContext
from scifm.parallel.fsdp import apply_activation_checkpointing, apply_compile, apply_fsdp
from scifm.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: ScientificMoE, ctx: DistContext, cfg: ParallelConfig) -> ScientificMoE:
    dims = ctx.dims
    if dims.tp > 1:
        apply_tensor_parallel(model, ctx.submesh("tp"), cfg.sequence_parallel, cfg.loss_parallel)
    if ctx.distributed and dims.dp_size > 1:
        from scifm.parallel.router_stats import apply_global_router_stats

        # router statistics over the whole global batch, as one process computes them
        apply_global_router_stats(model, ctx.dp_group)
    if dims.ep > 1:
        from scifm.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, ctx.submesh("ep"))
    if cfg.activation_checkpoint != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model)
    if dims.dp_size > 1:
        dp_mesh = ctx.submesh("dp_replicate", "dp_shard") if dims.dp_replicate > 1 else ctx.submesh("dp_shard")
        expert_mesh = None
        if dims.ep > 1:
            expert_mesh = (ctx.submesh("dp_replicate", "dp_shard_out") if dims.dp_replicate > 1
                           else ctx.submesh("dp_shard_out"))
        param_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        apply_fsdp(model, dp_mesh, param_dtype, expert_mesh)
    return model
