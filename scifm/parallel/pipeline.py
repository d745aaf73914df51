"""Pipeline parallelism: ScientificMoE split into stages that a torch.distributed.pipelining schedule runs.

Stages: pp x pp_virtual_stages of them, each a contiguous block of decoder layers (an even split, or
parallel.pp_split). A stage is a part of the same ScientificMoE class (`model_part`): it shares the
whole model's modules under their full names (`layers.5.attention.wq.weight`), so checkpoints and
gradients line up by name with any layout. Stage 0 also holds the token embeddings and encoders,
the last stage the final norm and output layer; the others lack them, and the model's own forward
then takes or returns hidden states. Stage s sits on pp rank s % pp, except under ZBV, whose V puts
pp rank r's two stages at r and 2 pp - 1 - r.

Micro-batches: the loader already yields the step's trainer.grad_accum micro-batches, each a
collated batch whose items and slot_index cannot be split by rows, so the schedule is handed them
pre-split (`_step_microbatches`). input_ids is the first stage's positional input; the rest of
`model_kwargs()` travels as keyword arguments, which every schedule passes to every stage: all
stages need positions and doc ids (RoPE, document mask), only stage 0 reads the items.

Static shapes: every stage is given its input and output shapes, taken from the first step's
micro-batches, so no stage infers them by running on uninitialised tensors (under TP the MoE
router would route those differently on each rank and the collectives would not match). Stages
exchange full sequences [rows, S, D] even under sequence parallelism: a stage's last block gathers
its sequence shards and the next stage's first block takes its shard again, as the first block
does after the embedding.

Loss: the last stage computes the caller's loss with the step's scale, and schedules run with
scale_grads=False (True would also divide every gradient by the number of micro-batches), so
gradients equal one process's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

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
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._pytree import tree_map_only

from scifm.model.multimodal import ScientificMoE
from scifm.parallel.config import ParallelConfig
from scifm.parallel.distributed import DistContext
from scifm.parallel.runner import LossFn, MicroBatch, ModelRunner, TargetLossFn, full_value, reshard


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


def model_part(model: ScientificMoE, layer_ids: list[int], first: bool, last: bool) -> ScientificMoE:
    """A ScientificMoE holding some of `model`'s modules, shared and not copied, under their full
    names: the layers `layer_ids`, the embeddings and encoders if `first`, the final norm and the
    output layer if `last`. The modules it lacks are None, which its forward skips."""
    part = ScientificMoE.__new__(ScientificMoE)
    nn.Module.__init__(part)
    part.cfg = model.cfg
    part.tok_embeddings = model.tok_embeddings if first else None
    part.encoders = model.encoders if first else None
    part.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
    part.norm = model.norm if last else None
    part.output = model.output if last else None
    return part


class PipelineRunner(ModelRunner):
    """This pp rank's stages and the schedule that runs them. `model`, what the optimizer, clipping
    and checkpoints see, is the part holding all of this rank's stages; it is never called itself."""

    def __init__(self, model: ScientificMoE, stages: dict[int, ScientificMoE], stage_owner: list[int],
                 pp_mesh: DeviceMesh, ctx: DistContext, cfg: ParallelConfig, vocab_local: int,
                 loss_fn: LossFn, autocast):
        super().__init__(model, loss_fn, autocast, ctx.device)
        self.stages = stages  # stage index -> part, this rank's only
        self.stage_owner = stage_owner  # pp rank of every stage
        self.pp_group = pp_mesh.get_group()
        self.schedule_name = cfg.pp_schedule
        self.act_dtype = activation_dtype(cfg, ctx.dims.dp_size)
        self.vocab_local = vocab_local  # the last stage's logits: this tp rank's vocabulary shard
        self.tp = ctx.dims.tp
        self.moe_layer_ids = [int(i) for i, block in model.layers.items() if block.is_moe]
        # made at the first step from its micro-batches (their count and shapes), see _schedule_for
        self.pipeline_stages: list[PipelineStage] = []
        self.schedule: _PipelineSchedule | None = None
        self._schedule_key: tuple[int, int, int] | None = None

    def _loss_context(self):
        # the last stage computes and backpropagates its loss inside the schedule, so the context
        # spans the whole step (it leaves plain tensors alone)
        return loss_parallel() if self.tp > 1 else contextlib.nullcontext()

    def _schedule_for(self, micro: list[MicroBatch]) -> _PipelineSchedule:
        rows, seq_len = micro[0].input_ids.shape
        key = (len(micro), rows, seq_len)
        if key == self._schedule_key:
            return self.schedule

        def example(*shape: int, dtype: torch.dtype = self.act_dtype) -> torch.Tensor:
            # requires_grad marks activations whose gradients travel back between stages
            return torch.empty(*shape, dtype=dtype, device=self.device, requires_grad=dtype.is_floating_point)

        hidden = (rows, seq_len, self.model.cfg.d_model)
        n_stages = len(self.stage_owner)
        self.pipeline_stages = [
            PipelineStage(
                stage, s, n_stages, self.device,
                input_args=example(rows, seq_len, dtype=torch.long) if s == 0 else example(*hidden),
                # the last stage's output is never sent
                output_args=example(rows, seq_len, self.vocab_local) if s == n_stages - 1 else example(*hidden),
                group=self.pp_group,
            )
            for s, stage in self.stages.items()
        ]
        schedule_cls = get_schedule_class(self.schedule_name)
        single = issubclass(schedule_cls, PipelineScheduleSingle)
        self.schedule = schedule_cls(self.pipeline_stages[0] if single else self.pipeline_stages, len(micro),
                                     loss_fn=self.loss_fn, scale_grads=False)
        self._schedule_key = key
        return self.schedule

    def forward_backward(self, micro: list[MicroBatch], scale: float) -> torch.Tensor:
        micro = [b.to(self.device) for b in micro]
        schedule = self._schedule_for(micro)
        for stage in self.pipeline_stages:  # what the schedules' own step() does first
            stage.has_backward = True
            stage.clear_runtime_states()
        losses: list[torch.Tensor] = []
        with self.autocast, self._loss_context():
            schedule._step_microbatches(
                [(b.input_ids,) for b in micro], [b.model_kwargs() for b in micro], [b.labels for b in micro],
                losses, return_outputs=False, loss_kwargs={"scale": scale},
            )
        # tp ranks of the last stage hold the same losses
        mine = sum(float(full_value(loss.detach())) for loss in losses)
        return sum_over_stages(torch.tensor(mine, dtype=torch.float64), self.device, self.pp_group)

    @torch.no_grad()
    def target_losses(self, batch: MicroBatch, loss_fn: TargetLossFn) -> torch.Tensor:
        """Forward only, one stage after the other (no schedule: validation has its own number of
        batches), sending hidden states between pp ranks."""
        batch = batch.to(self.device)
        x, kwargs = batch.input_ids, batch.model_kwargs()
        n_stages = len(self.stage_owner)
        mine = torch.zeros(batch.labels.shape, dtype=torch.float64)
        with self.autocast, self._loss_context():
            for s, stage in sorted(self.stages.items()):
                if s > 0 and s - 1 not in self.stages:
                    x = torch.empty(*batch.input_ids.shape, self.model.cfg.d_model, dtype=self.act_dtype,
                                    device=self.device)
                    dist.recv(x, group=self.pp_group, group_src=self.stage_owner[s - 1])
                x = stage(x, **kwargs)
                if s == n_stages - 1:
                    mine = full_value(loss_fn(x, batch.labels))
                elif s + 1 not in self.stages:
                    dist.send(x.contiguous(), group=self.pp_group, group_dst=self.stage_owner[s + 1])
        for stage in self.stages.values():
            reshard(stage)
        return sum_over_stages(mine, self.device, self.pp_group)

    def gather_moe_stats(self, stats: list[dict]) -> list[dict]:
        return merge_stage_moe_stats(stats, self.moe_layer_ids, self.pp_group)


def sum_over_stages(mine: torch.Tensor, device: torch.device, pp_group: dist.ProcessGroup) -> torch.Tensor:
    """Only the last stage has losses (the others hold zeros): after this, every pp rank has them
    (float64, on the CPU)."""
    t = mine.to(device, torch.float64)  # nccl takes no CPU tensors
    dist.all_reduce(t, group=pp_group)
    return t.cpu()


def merge_stage_moe_stats(stats: list[dict], layer_ids: list[int], pp_group: dist.ProcessGroup) -> list[dict]:
    """Collective over the pp ranks: every stage's MoE statistics in layer order, from this rank's
    `stats` of its MoE layers `layer_ids` (the model's layer indices)."""
    mine = {i: tree_map_only(torch.Tensor, torch.Tensor.cpu, s) for i, s in zip(layer_ids, stats)}
    parts: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, mine, group=pp_group)
    merged = {i: s for part in parts for i, s in part.items()}
    return [merged[i] for i in sorted(merged)]


def _gather_sequence_on_exit(stage: ScientificMoE, tp_mesh: DeviceMesh) -> None:
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


def build_pipeline(model: ScientificMoE, ctx: DistContext, cfg: ParallelConfig,
                   parallelize_stage: Callable[[ScientificMoE], None], loss_fn: LossFn, autocast) -> PipelineRunner:
    """This pp rank's stages of `model` (whole and identically initialised on every rank), each
    parallelised by `parallelize_stage` (TP, EP, FSDP, ...), and the runner of their schedule."""
    dims = ctx.dims
    n_stages = dims.pp * cfg.pp_virtual_stages
    stage_owner = [0] * n_stages
    for rank in range(dims.pp):
        for s in stages_of_rank(rank, dims.pp, cfg.pp_virtual_stages, cfg.pp_schedule):
            stage_owner[s] = rank
    pp_mesh = ctx.submesh("pp")
    ranges = layer_ranges(model.cfg.n_layers, n_stages, cfg.pp_split)
    mine = [s for s in range(n_stages) if stage_owner[s] == pp_mesh.get_local_rank()]
    stages = {s: model_part(model, list(ranges[s]), s == 0, s == n_stages - 1) for s in mine}
    rank_part = model_part(model, [i for s in mine for i in ranges[s]], 0 in mine, n_stages - 1 in mine)
    vocab = model.output.out_features
    vocab_local = vocab // dims.tp if dims.tp > 1 and cfg.loss_parallel else vocab
    for s, stage in stages.items():
        if dims.tp > 1 and cfg.sequence_parallel and s != n_stages - 1:
            _gather_sequence_on_exit(stage, ctx.submesh("tp"))
        parallelize_stage(stage)
        if isinstance(stage, FSDPModule):
            # blocks keep their gathered weights from forward to backward (torchtitan does the same
            # under PP): one all-gather per step, not per micro-batch, and zero-bubble schedules'
            # weight pass finds the weights the forward used (else those gradients go missing)
            stage.set_reshard_after_forward(False)
    return PipelineRunner(rank_part, stages, stage_owner, pp_mesh, ctx, cfg, vocab_local, loss_fn, autocast)
