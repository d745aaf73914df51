"""Pipeline parallelism: ScientificMoE split into stages that a torch.distributed.pipelining schedule runs.

Stages: pp x pp_virtual_stages of them, each a contiguous block of decoder layers (an even split, or
parallel.pp_split). Stage 0 also owns the token embeddings, the encoders and the splice; the last
stage owns the final norm and the output layer. Stage s sits on pp rank s % pp, except under ZBV,
whose V puts pp rank r's two stages at r and 2 pp - 1 - r. Modules keep the full model's names
(`layers.5.attention.wq.weight`), so checkpoints and gradients line up by name with any layout.

Micro-batches: the loader already yields the step's trainer.grad_accum micro-batches, each a
collated Batch whose items and slot_index cannot be split by rows, so the schedule is handed them
pre-split (`_step_microbatches`). input_ids is the first stage's positional input; positions,
doc_ids, items and slot_index travel as keyword arguments, which every schedule passes to every
stage: all stages need positions and doc_ids (RoPE, document mask), only stage 0 reads the items.

Static shapes: every stage is given its input and output shapes, so no stage infers them by running
on uninitialised tensors (under TP the MoE router would route those differently on each rank and
the collectives would not match). Stages exchange full sequences [rows, S, D] even under sequence
parallelism: a stage's last block gathers its sequence shards and the next stage's first block
takes its shard again, as the first block does after the embedding.

Loss: the last stage computes cross-entropy summed over the micro-batch times dp_size / (targets of
the global step), the trainer's convention, and schedules run with scale_grads=False (True would
also divide every gradient by the number of micro-batches), so gradients equal one process's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    _PipelineSchedule,
    get_schedule_class,
)
from torch.distributed.tensor import DTensor, Shard
from torch.utils._pytree import tree_map_only

from scifm.config import ParallelConfig
from scifm.data.packing import Batch
from scifm.model.attention import document_causal_mask
from scifm.model.layers import rope_cos_sin
from scifm.model.multimodal import ScientificMoE
from scifm.parallel.distributed import DistContext

# (logits_BSV, labels_BS, scale) -> summed cross-entropy x scale
LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class MicroBatches:
    """What a schedule must know of every step before it runs: the loader's micro-batches."""

    count: int  # trainer.grad_accum
    rows: int  # rows of one micro-batch on this data-parallel rank
    seq_len: int
    loss_fn: LossFn


def layer_ranges(n_layers: int, n_stages: int, split: list[int]) -> list[range]:
    """The decoder layers of every stage; `split` as validated by ParallelConfig ([] = even)."""
    counts = list(split) or [n_layers // n_stages] * n_stages
    starts = [sum(counts[:s]) for s in range(n_stages)]
    return [range(start, start + n) for start, n in zip(starts, counts)]


def stages_of_rank(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Stage indices on a pp rank, as torch's schedules place them."""
    if schedule == "ZBVZeroBubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


class ModelPart(nn.Module):
    """Some of a ScientificMoE's modules, shared with it, under the full model's names."""

    def __init__(self, model: ScientificMoE, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.cfg = model.cfg
        self.is_first, self.is_last = first, last
        self.tok_embeddings = model.tok_embeddings if first else None
        self.encoders = model.encoders if first else nn.ModuleDict()
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None


def stage_kwargs(batch: Batch) -> dict:
    return {"positions_BS": batch.positions, "doc_ids_BS": batch.doc_ids, "items": batch.items,
            "slot_index": batch.slot_index}


class StageModel(ModelPart):
    """One pipeline stage: [embed and splice] -> its layers -> [norm and output]."""

    embed = ScientificMoE.embed  # the whole model's splice, on the modules the first stage owns

    def forward(self, x: torch.Tensor, positions_BS: torch.Tensor, doc_ids_BS: torch.Tensor,
                items: dict[str, dict[str, torch.Tensor]], slot_index: dict[str, torch.Tensor]) -> torch.Tensor:
        """x: input_ids_BS on the first stage, else the previous stage's h_BSD; returns h_BSD, or
        logits_BSV on the last stage."""
        h_BSD = self.embed(x, items, slot_index) if self.is_first else x
        cos, sin = rope_cos_sin(positions_BS, self.cfg.dim_per_head, self.cfg.rope_theta)
        mask_B1SS = document_causal_mask(doc_ids_BS)
        for layer in self.layers.values():
            h_BSD = layer(h_BSD, cos, sin, mask_B1SS)
        return self.output(self.norm(h_BSD)) if self.is_last else h_BSD


class PipelinedModel(ModelPart):
    """This pp rank's stages as one module under the full model's names, which is what the optimizer,
    gradient clipping and checkpoints see, with the schedule that runs them. Never called itself:
    `step` trains on a step's micro-batches and `loss_sum` evaluates a batch."""

    def __init__(self, model: ScientificMoE, stages: dict[int, StageModel], stage_owner: list[int],
                 pp_mesh: DeviceMesh, act_dtype: torch.dtype, loss_fn: LossFn):
        layer_ids = sorted(int(i) for stage in stages.values() for i in stage.layers)
        super().__init__(model, layer_ids, 0 in stages, len(stage_owner) - 1 in stages)
        # plain attributes, not submodules: the stages' parameters are this module's already
        self.stage_models = stages
        self.stage_owner = stage_owner  # pp rank of every stage
        self.pp_group = pp_mesh.get_group()
        self.act_dtype = act_dtype
        self.loss_fn = loss_fn
        self.moe_layer_ids = [int(i) for i, block in self.layers.items() if block.is_moe]
        # set by build_pipeline once the stages are parallelised
        self.pipeline_stages: list[PipelineStage] = []
        self.schedule: _PipelineSchedule | None = None

    def train(self, mode: bool = True) -> PipelinedModel:
        for stage in self.stage_models.values():
            stage.train(mode)
        return super().train(mode)

    def step(self, micro: list[Batch], loss_scale: float) -> list[torch.Tensor]:
        """Forward and backward over the step's micro-batches; the last stage's losses (each summed
        cross-entropy x loss_scale), an empty list on ranks without the last stage."""
        for stage in self.pipeline_stages:  # what the schedules' own step() does first
            stage.has_backward = True
            stage.clear_runtime_states()
        losses: list[torch.Tensor] = []
        self.schedule._step_microbatches(
            [(b.input_ids,) for b in micro], [stage_kwargs(b) for b in micro], [b.labels for b in micro],
            losses, return_outputs=False, loss_kwargs={"scale": loss_scale},
        )
        return losses

    @torch.no_grad()
    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy of one batch, forward only, one stage after the other (no schedule:
        validation has its own number of batches); zero on ranks without the last stage."""
        x, kwargs = batch.input_ids, stage_kwargs(batch)
        n_stages = len(self.stage_owner)
        for s, stage in sorted(self.stage_models.items()):
            if s > 0 and s - 1 not in self.stage_models:
                x = torch.empty(*batch.input_ids.shape, self.cfg.d_model, dtype=self.act_dtype, device=x.device)
                dist.recv(x, group=self.pp_group, group_src=self.stage_owner[s - 1])
            x = stage(x, **kwargs)
            if s == n_stages - 1:
                return self.loss_fn(x, batch.labels, 1.0)
            if s + 1 not in self.stage_models:
                dist.send(x.contiguous(), group=self.pp_group, group_dst=self.stage_owner[s + 1])
        return torch.zeros((), device=x.device)

    def gather_layer_stats(self, stats: list[dict]) -> list[dict]:
        """Every stage's MoE statistics in layer order, from this rank's (in moe_layers order)."""
        mine = {i: tree_map_only(torch.Tensor, torch.Tensor.cpu, s) for i, s in zip(self.moe_layer_ids, stats)}
        parts: list = [None] * dist.get_world_size(self.pp_group)
        dist.all_gather_object(parts, mine, group=self.pp_group)
        merged = {i: s for part in parts for i, s in part.items()}
        return [merged[i] for i in sorted(merged)]


def _gather_sequence_on_exit(stage: StageModel, tp_mesh: DeviceMesh) -> None:
    """Under sequence parallelism a block returns its sequence shard; stages exchange whole sequences.
    The backward of the gather takes this rank's shard of the (replicated) incoming gradient."""

    def gather(module: nn.Module, args: tuple, h_BsD: torch.Tensor) -> torch.Tensor:
        h_BSD = DTensor.from_local(h_BsD, tp_mesh, (Shard(1),), run_check=False).full_tensor()
        return h_BSD.clone()  # not a view: zero-bubble schedules detach stage outputs in place

    stage.layers[list(stage.layers)[-1]].register_forward_hook(gather)


def activation_dtype(cfg: ParallelConfig, dp_size: int) -> torch.dtype:
    # the residual stream has the parameters' dtype: bf16 only where FSDP casts the parameters
    # (autocast leaves the embedding, hence the residual stream, in fp32)
    return torch.bfloat16 if cfg.mixed_precision == "bf16" and dp_size > 1 else torch.float32


def build_pipeline(model: ScientificMoE, ctx: DistContext, cfg: ParallelConfig, micro: MicroBatches,
                   parallelize_stage: Callable[[StageModel], None]) -> PipelinedModel:
    """This pp rank's stages of `model` (whole and identically initialised on every rank), each
    parallelised by `parallelize_stage` (TP, EP, FSDP, ...), and the schedule that runs them."""
    dims = ctx.dims
    n_stages = dims.pp * cfg.pp_virtual_stages
    stage_owner = [0] * n_stages
    for rank in range(dims.pp):
        for s in stages_of_rank(rank, dims.pp, cfg.pp_virtual_stages, cfg.pp_schedule):
            stage_owner[s] = rank
    pp_mesh = ctx.submesh("pp")
    ranges = layer_ranges(model.cfg.n_layers, n_stages, cfg.pp_split)
    stages = {s: StageModel(model, list(ranges[s]), s == 0, s == n_stages - 1)
              for s in range(n_stages) if stage_owner[s] == pp_mesh.get_local_rank()}
    act_dtype = activation_dtype(cfg, dims.dp_size)
    pipelined = PipelinedModel(model, stages, stage_owner, pp_mesh, act_dtype, micro.loss_fn)

    vocab = model.output.out_features
    vocab_local = vocab // dims.tp if dims.tp > 1 and cfg.loss_parallel else vocab

    def example(*shape: int, dtype: torch.dtype = act_dtype) -> torch.Tensor:
        # requires_grad marks activations whose gradients travel back between stages
        return torch.empty(*shape, dtype=dtype, device=ctx.device, requires_grad=dtype.is_floating_point)

    hidden = (micro.rows, micro.seq_len, model.cfg.d_model)
    pipeline_stages = []
    for s, stage in stages.items():
        if dims.tp > 1 and cfg.sequence_parallel and not stage.is_last:
            _gather_sequence_on_exit(stage, ctx.submesh("tp"))
        parallelize_stage(stage)
        if isinstance(stage, FSDPModule):
            # blocks keep their gathered weights from forward to backward (torchtitan does the same
            # under PP): one all-gather per step, not per micro-batch, and zero-bubble schedules'
            # weight pass finds the weights the forward used (else those gradients go missing)
            stage.set_reshard_after_forward(False)
        pipeline_stages.append(PipelineStage(
            stage, s, n_stages, ctx.device,
            input_args=example(micro.rows, micro.seq_len, dtype=torch.long) if stage.is_first else example(*hidden),
            # the last stage's output is never sent; under loss parallelism it is this rank's vocab shard
            output_args=example(micro.rows, micro.seq_len, vocab_local) if stage.is_last else example(*hidden),
            group=pipelined.pp_group,
        ))
    schedule_cls = get_schedule_class(cfg.pp_schedule)
    single = issubclass(schedule_cls, PipelineScheduleSingle)
    pipelined.pipeline_stages = pipeline_stages
    pipelined.schedule = schedule_cls(pipeline_stages[0] if single else pipeline_stages, micro.count,
                                      loss_fn=micro.loss_fn, scale_grads=False)
    return pipelined
