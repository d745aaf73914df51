"""parallelize(model, ctx, cfg, loss_fn, autocast): the one place where a layout is applied to a
built model, returning the runner that trains and evaluates it (runner.py).

The model arrives whole and identically initialised on every rank (init depends only on seed and
parameter names); each step below shards it from the outside, in torchtitan's order. With pipeline
parallelism the model is first split into this rank's stages and each stage is sharded alike.
"""

from __future__ import annotations

import warnings

import torch

from scifm.parallel.config import ParallelConfig
from scifm.model.multimodal import ScientificMoE
from scifm.parallel.distributed import DistContext
from scifm.parallel.fsdp import apply_activation_checkpointing, apply_compile, apply_fsdp
from scifm.parallel.pipeline import build_pipeline
from scifm.parallel.runner import LossFn, ModelRunner
from scifm.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: ScientificMoE, ctx: DistContext, cfg: ParallelConfig, loss_fn: LossFn,
                autocast) -> ModelRunner:
    """`model` on ctx.device; `loss_fn(logits_BSV, labels_BS, scale)` the summed loss times scale;
    `autocast` the precision context of forward passes. With parallel.pp > 1 the runner is a
    PipelineRunner over this rank's stages."""
    if ctx.dims.pp == 1:
        return ModelRunner(_parallelize_module(model, ctx, cfg), loss_fn, autocast, ctx.device)

    def parallelize_stage(stage: ScientificMoE) -> None:
        with warnings.catch_warnings():
            # a stage lacks the embedding or the output layer that the tensor-parallel plan names
            warnings.filterwarnings("ignore", message="Parallelize plan key")
            _parallelize_module(stage, ctx, cfg)

    return build_pipeline(model, ctx, cfg, parallelize_stage, loss_fn, autocast)


def _parallelize_module(model: ScientificMoE, ctx: DistContext, cfg: ParallelConfig) -> ScientificMoE:
    dims = ctx.dims
    if dims.tp > 1:
        apply_tensor_parallel(model, ctx.submesh("tp"), cfg.sequence_parallel, cfg.loss_parallel)
    if ctx.distributed and dims.dp_size > 1:
        from scifm.parallel.router_stats import apply_global_router_stats

        # router statistics over the whole global batch, as one process computes them
        apply_global_router_stats(model, ctx.dp_group)
    if dims.ep > 1:
        from scifm.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, ctx.submesh("ep"), ctx.submesh("tp") if dims.tp > 1 else None)
    apply_recompute_and_compile(model, cfg)
    if dims.fsdp:
        dp_mesh = ctx.submesh("dp_replicate", "dp_shard") if dims.dp_replicate > 1 else ctx.submesh("dp_shard")
        expert_mesh = None
        if dims.ep > 1:
            expert_mesh = (ctx.submesh("dp_replicate", "dp_shard_out") if dims.dp_replicate > 1
                           else ctx.submesh("dp_shard_out"))
        param_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        apply_fsdp(model, dp_mesh, param_dtype, expert_mesh)
    return model


def apply_recompute_and_compile(model: torch.nn.Module, cfg: ParallelConfig) -> None:
    """What every engine applies to the blocks, after any tensor/expert sharding, before data parallelism."""
    if cfg.activation_checkpoint != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model)
