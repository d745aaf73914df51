"""One optimizer step's forward/backward and the validation pass, under any layout.

The loss of a step is sum(token cross-entropy) / (target tokens of the whole global step), so
neither gradient accumulation nor the data-parallel split changes it. FSDP averages gradients
over the dp ranks, hence each rank backpropagates its share times dp_size. Under pipeline
parallelism the schedule runs the micro-batches and the last stage takes the same loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from scifm.data.packing import IGNORE_INDEX, Batch
from scifm.parallel.distributed import DistContext
from scifm.parallel.grad_norm import clip_grad_norm
from scifm.parallel.pipeline import PipelinedModel


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast where asked (or, with auto, on a GPU that supports it); fp32 otherwise."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def scaled_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, scale: float) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets, times `scale`. Vocab-sharded (DTensor)
    logits need the loss-parallel context open around this call and its backward; it is the
    pipeline's last-stage loss with scale = dp_size / global targets (1 in evaluation)."""
    loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss * scale


def lm_loss_sum(model, batch: Batch, autocast) -> torch.Tensor:
    """Summed cross-entropy over the batch's targets; with loss parallelism the logits are a
    vocab-sharded DTensor and the loss is computed without gathering them."""
    with autocast:
        logits_BSV = model(batch.input_ids, batch.positions, batch.doc_ids, batch.items, batch.slot_index)
    sharded = isinstance(logits_BSV, DTensor)
    with torch.distributed.tensor.parallel.loss_parallel() if sharded else contextlib.nullcontext():
        return scaled_cross_entropy(logits_BSV, batch.labels, 1.0)


def _loss_parallel_for(ctx: DistContext):
    # the pipeline's last stage computes and backpropagates its loss inside the schedule, so the
    # context spans the whole step (it leaves plain tensors alone)
    return torch.distributed.tensor.parallel.loss_parallel() if ctx.dims.tp > 1 else contextlib.nullcontext()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def forward_backward(model, micro: list[Batch], ctx: DistContext, autocast) -> float:
    """Backward over the step's micro-batches; returns the step's global mean loss (every rank)."""
    n_targets = ctx.all_reduce_sum(torch.tensor(float(sum(b.n_targets for b in micro)), dtype=torch.float64))
    n_global = max(float(n_targets), 1.0)
    if isinstance(model, PipelinedModel):
        return _pipeline_forward_backward(model, micro, ctx, autocast, n_global)
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)  # read once: no per-micro-batch sync
    for batch in micro:
        loss = lm_loss_sum(model, batch.to(ctx.device), autocast) / n_global
        sharded = isinstance(loss, DTensor)  # vocab-sharded logits: backward needs the same context
        with torch.distributed.tensor.parallel.loss_parallel() if sharded else contextlib.nullcontext():
            (loss * ctx.dims.dp_size).backward()
        total += _local(loss.detach()).double()
    return float(ctx.all_reduce_sum(total.cpu()))


def _pipeline_forward_backward(model: PipelinedModel, micro: list[Batch], ctx: DistContext, autocast,
                               n_global: float) -> float:
    with autocast, _loss_parallel_for(ctx):
        losses = model.step([b.to(ctx.device) for b in micro], ctx.dims.dp_size / n_global)
    # only the last stage has losses, each x dp_size; tp ranks of a stage hold the same ones
    total = torch.tensor(sum(float(_local(loss.detach())) for loss in losses) / ctx.dims.dp_size,
                         dtype=torch.float64)
    ctx.all_reduce_sum(total, group=model.pp_group)
    return float(ctx.all_reduce_sum(total))


def train_step(model, micro: list[Batch], ctx: DistContext, autocast, grad_clip: float) -> tuple[float, float]:
    """Forward/backward and clipping; the gradients stay in .grad. Returns (loss, grad norm)."""
    loss = forward_backward(model, micro, ctx, autocast)
    pp_group = model.pp_group if isinstance(model, PipelinedModel) else None
    return loss, float(clip_grad_norm(model.parameters(), grad_clip, pp_group))


def apply_update(optimizer, scheduler, moes: list) -> list[dict]:
    """Optimizer and schedule step, then the MoE bias update from the step's (global) expert load;
    returns each MoE layer's statistics of the last micro-batch."""
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stats = [dict(m.last_stats) for m in moes]
    for m in moes:
        m.update_bias(m.pop_tokens_per_expert())
    return stats


def _val_loss_sum(model, batch: Batch, autocast, ctx: DistContext) -> torch.Tensor:
    if not isinstance(model, PipelinedModel):
        return lm_loss_sum(model, batch, autocast)
    with autocast, _loss_parallel_for(ctx):
        return model.loss_sum(batch)


@dataclass
class Evaluation:
    val_loss: float
    unigram_val_loss: float


@torch.no_grad()
def evaluate(model, val_batches: list[Batch], unigram_counts: torch.Tensor, autocast, ctx: DistContext) -> Evaluation:
    """Validation loss over this rank's rows of every validation batch, summed over dp ranks; and the
    loss of a unigram model (add-one smoothed counts of the training targets) on the same targets."""
    model.eval()
    log_p = torch.log((unigram_counts + 1.0) / (unigram_counts.sum() + unigram_counts.numel()))
    sums = torch.zeros(3, dtype=torch.float64)  # model loss, unigram loss, targets
    for batch in val_batches:
        targets = batch.labels[batch.labels != IGNORE_INDEX]
        sums[0] += float(_local(_val_loss_sum(model, batch.to(ctx.device), autocast, ctx)))
        sums[1] += float(-log_p[targets].sum())
        sums[2] += targets.numel()
    if isinstance(model, PipelinedModel):  # only the last stage holds the model loss
        ctx.all_reduce_sum(sums[0:1], group=model.pp_group)
    ctx.all_reduce_sum(sums)
    model.train()
    n = max(float(sums[2]), 1.0)
    return Evaluation(float(sums[0]) / n, float(sums[1]) / n)
