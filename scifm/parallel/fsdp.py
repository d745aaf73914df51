"""Activation checkpointing, per-block torch.compile and FSDP2 (`fully_shard`), HSDP included.

Order matters and follows torchtitan: tensor/expert parallelism first (parameters become
DTensors on their meshes), then checkpoint and compile wrappers around each block, then FSDP
per block, per encoder and at the root, so each block's parameters are gathered just in time.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from scifm.model.multimodal import ScientificMoE


def recomputes(mode: str, index: int) -> bool:
    """Whether parallel.activation_checkpoint=`mode` recomputes the block at `index` (within the model
    or pipeline stage part): full every block, selective every other one (half the memory saving for
    half the recompute)."""
    return mode == "full" or (mode == "selective" and index % 2 == 0)


def apply_activation_checkpointing(model: ScientificMoE, mode: str) -> None:
    for i, (name, block) in enumerate(list(model.layers.items())):
        if recomputes(mode, i):
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: ScientificMoE) -> None:
    # MoE routing has data-dependent shapes; without this, nonzero/argsort splits break the graph
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=False)


def apply_fsdp(model: ScientificMoE, dp_mesh: DeviceMesh, param_dtype: torch.dtype,
               expert_mesh: DeviceMesh | None = None) -> None:
    """`dp_mesh` is 1D (FSDP) or 2D (dp_replicate, dp_shard: HSDP). With expert parallelism the
    experts are already split over ep and are sharded further over `expert_mesh` only."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        inner = getattr(inner, "_orig_mod", inner)
        if expert_mesh is not None and getattr(inner, "is_moe", False):
            fully_shard(inner.moe.experts, mesh=expert_mesh, mp_policy=policy)
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    for encoder in (model.encoders or {}).values():  # a pipeline stage after the first has none
        fully_shard(encoder, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
