"""One optimizer step's forward/backward and the validation pass, through the layout's runner.

The loss of a step is sum(token cross-entropy) / (target tokens of the whole global step), so
neither gradient accumulation nor the data-parallel split changes it. FSDP averages gradients
over the dp ranks, hence each rank backpropagates its share times dp_size: the loss scale handed
to the runner is dp_size / (global targets), under every layout, pipelines included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scifm.data.packing import IGNORE_INDEX, Batch
from scifm.parallel.distributed import DistContext
from scifm.parallel.runner import ModelRunner


def scaled_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, scale: float) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets, times `scale`: the trainer's loss_fn."""
    loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss * scale


def train_step(runner: ModelRunner, micro: list[Batch], ctx: DistContext, grad_clip: float) -> tuple[float, float]:
    """Forward/backward over the step's micro-batches and clipping; the gradients stay in .grad.
    Returns (the step's global mean loss, the gradient norm), the same on every rank."""
    n_targets = ctx.all_reduce_sum(torch.tensor(float(sum(b.n_targets for b in micro)), dtype=torch.float64))
    scale = ctx.dims.dp_size / max(float(n_targets), 1.0)
    loss = runner.forward_backward(micro, scale) / ctx.dims.dp_size
    return float(ctx.all_reduce_sum(loss)), runner.clip_grad_norm(grad_clip)


def apply_update(optimizer, scheduler, moes: list, applied: bool = False) -> list[dict]:
    """Optimizer and schedule step (unless the engine `applied` it already), then the MoE bias update
    from the step's (global) expert load; returns each MoE layer's statistics of the last micro-batch."""
    if not applied:
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    stats = [dict(m.last_stats) for m in moes]
    for m in moes:
        m.update_bias(m.pop_tokens_per_expert())
    return stats


def discard_update(optimizer, moes: list) -> list[dict]:
    """A step whose loss or gradients are not finite changes nothing: gradients and the step's
    expert counts are dropped, the optimizer, schedule and biases stay as they are."""
    optimizer.zero_grad(set_to_none=True)
    stats = [dict(m.last_stats) for m in moes]
    for m in moes:
        m.pop_tokens_per_expert()
    return stats


@dataclass
class Evaluation:
    val_loss: float
    unigram_val_loss: float


@torch.no_grad()
def evaluate(runner: ModelRunner, val_batches: list[Batch], unigram_counts: torch.Tensor,
             ctx: DistContext) -> Evaluation:
    """Validation loss over this rank's rows of every validation batch, summed over dp ranks; and the
    loss of a unigram model (add-one smoothed counts of the training targets) on the same targets."""
    runner.model.eval()
    log_p = torch.log((unigram_counts + 1.0) / (unigram_counts.sum() + unigram_counts.numel()))
    sums = torch.zeros(3, dtype=torch.float64)  # model loss, unigram loss, targets
    for batch in val_batches:
        targets = batch.labels[batch.labels != IGNORE_INDEX]
        sums[0] += runner.loss_sum(batch)
        sums[1] += float(-log_p[targets].sum())
        sums[2] += targets.numel()
    ctx.all_reduce_sum(sums)
    runner.model.train()
    n = max(float(sums[2]), 1.0)
    return Evaluation(float(sums[0]) / n, float(sums[1]) / n)
