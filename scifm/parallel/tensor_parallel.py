"""Tensor (+ sequence) parallelism with DTensor, applied to ScientificMoE from outside.

Attention q/k/v and the SwiGLU w1/w3 are column-parallel, attention wo and SwiGLU w2 row-parallel.
The vocabulary-parallel embedding gathers its output (the encoders splice their slots into the
full sequence) and, with sequence parallelism, the first block takes its sequence shard; norms
then run on sequence shards and attention/FFN inputs are all-gathered on entry. Attention and the
FFNs take their input as one replicated DTensor, so the backward reduces its gradient once per
module (a reduce-scatter under sequence parallelism), not once per projection that reads it. Routed experts
run replicated on every tp rank (their router is a plain Linear), so the MoE block takes a
replicated input and returns a sequence-sharded output. With loss parallelism the output layer
keeps logits sharded on the vocabulary and the loss is computed without gathering them.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from scifm.core.errors import ConfigError
from scifm.model.multimodal import ScientificMoE


def _as_replicated_input(input_layout, n_args: int = 1) -> PrepareModuleInput:
    """The module's input as one replicated DTensor (gathered first where `input_layout` is a shard):
    the column-parallel projections that read it then add their partial input gradients as DTensors,
    and the sum is reduced once, at this input, instead of once per projection (three all-reduces
    of the residual for q, k and v)."""
    rest = (None,) * (n_args - 1)  # the module's other arguments stay as they are
    return PrepareModuleInput(input_layouts=(input_layout, *rest), desired_input_layouts=(Replicate(), *rest),
                              use_local_output=False)


def _swiglu_plan(prefix: str, residual) -> dict:
    return {
        prefix: _as_replicated_input(residual),
        f"{prefix}.w1": ColwiseParallel(),
        f"{prefix}.w3": ColwiseParallel(),
        f"{prefix}.w2": RowwiseParallel(output_layouts=residual),
    }


def apply_tensor_parallel(model: ScientificMoE, tp_mesh: DeviceMesh, sequence_parallel: bool,
                          loss_parallel: bool) -> None:
    if model.cfg.tie_embeddings:
        raise ConfigError("model.tie_embeddings: not supported with parallel.tp > 1")
    # the layout of the residual stream between modules
    residual = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(
            input_layouts=residual,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
        **({"norm": SequenceParallel()} if sequence_parallel else {}),
    })
    for block in model.layers.values():
        plan = {
            "attention": _as_replicated_input(residual, n_args=4),  # x, cos, sin, mask
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
        }
        if block.attention.q_norm is not None:
            # each rank normalises its own heads (dim 2) with a replicated weight whose gradient
            # DTensor sums over the ranks' heads, as one process gets it
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if block.is_moe:
            if block.moe.shared_experts is not None:
                # the MoE hands its experts a plain tensor, the same on every tp rank
                plan.update(_swiglu_plan("moe.shared_experts", Replicate()))
        else:
            plan.update(_swiglu_plan("feed_forward", residual))
        if sequence_parallel:
            plan.update(_sequence_parallel_plan(block.is_moe))
        parallelize_module(block, tp_mesh, plan)
    if sequence_parallel:
        # the spliced embeddings are full sequences; the first block takes its sequence shard
        parallelize_module(model.layers[next(iter(model.layers))], tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(), None, None, None),
            desired_input_layouts=(Shard(1), None, None, None),
            use_local_output=True,
        ))


def _sequence_parallel_plan(is_moe: bool) -> dict:
    """Norms on sequence shards (attention's and the dense FFN's inputs are gathered on entry, by
    _as_replicated_input)."""
    plan = {
        "attention_norm": SequenceParallel(),
        "ffn_norm": SequenceParallel(),
    }
    if is_moe:
        # the router and the replicated experts see the whole sequence; the output goes back
        # to the residual stream as this rank's sequence shard
        plan["moe"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True,
        )
    return plan
