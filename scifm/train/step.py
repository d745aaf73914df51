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
from torch.distributed.tensor import DTensor

from scifm.data.packing import IGNORE_INDEX, Batch
from scifm.model.cross_entropy import ChunkedCrossEntropy
from scifm.parallel.distributed import DistContext
from scifm.parallel.runner import ModelRunner


def scaled_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, scale: float) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets, times `scale`: the trainer's loss_fn. Logits
    sharded over the vocabulary (a DTensor, under parallel.loss_parallel) go through torch's
    cross-entropy, which loss_parallel implements for them; whole logits through the chunked one."""
    if isinstance(logits_BSV, DTensor):
        loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return loss * scale
    return ChunkedCrossEntropy.apply(logits_BSV.flatten(0, 1), labels_BS.flatten(), scale, IGNORE_INDEX)


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
    by_source: dict[str, float]  # the validation loss of each source's targets
    by_skill: dict[str, float]  # and of each skill's


def target_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Each target's next-token cross-entropy [B, S], 0 where no loss is taken: validation's loss_fn."""
    losses = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.view(labels_BS.shape)


def tag_index(batch: Batch, names: list[str], field: int) -> torch.Tensor:
    """[B, S]: the index in `names` of each position's chunk's source (field 0) or skill (field 1); -1 on padding."""
    index = {name: i for i, name in enumerate(names)}
    out = torch.full_like(batch.doc_ids, -1)
    for r, tags in enumerate(batch.chunk_tags):
        of_chunk = torch.tensor([index[tag[field]] for tag in tags], dtype=torch.long)
        real = batch.doc_ids[r] >= 0
        out[r, real] = of_chunk[batch.doc_ids[r, real]]
    return out


@torch.no_grad()
def evaluate(runner: ModelRunner, val_batches: list[Batch], unigram_counts: torch.Tensor, ctx: DistContext,
             sources: list[str], skills: list[str]) -> Evaluation:
    """Validation loss over this rank's rows of every validation batch, summed over dp ranks, in all and
    per source and skill (`sources`, `skills`: every name the batches hold, the same list on every rank);
    and the loss of a unigram model (add-one smoothed counts of the training targets) on the same targets."""
    runner.model.eval()
    log_p = torch.log((unigram_counts + 1.0) / (unigram_counts.sum() + unigram_counts.numel()))
    sums = torch.zeros(3, dtype=torch.float64)  # model loss, unigram loss, targets
    by_group = torch.zeros(2, len(sources) + len(skills), dtype=torch.float64)  # loss, targets; sources first
    for batch in val_batches:
        is_target = batch.labels != IGNORE_INDEX
        losses = runner.target_losses(batch, target_cross_entropy)[is_target]
        sums += torch.tensor([float(losses.sum()), float(-log_p[batch.labels[is_target]].sum()), losses.numel()],
                             dtype=torch.float64)
        groups = torch.cat([tag_index(batch, sources, 0)[is_target],
                            len(sources) + tag_index(batch, skills, 1)[is_target]])
        by_group[0].index_add_(0, groups, losses.repeat(2))
        by_group[1].index_add_(0, groups, torch.ones_like(groups, dtype=torch.float64))
    ctx.all_reduce_sum(sums)
    ctx.all_reduce_sum(by_group)
    runner.model.train()
    n = max(float(sums[2]), 1.0)
    mean = {i: float(by_group[0, i] / by_group[1, i]) for i in range(by_group.shape[1]) if by_group[1, i] > 0}
    return Evaluation(float(sums[0]) / n, float(sums[1]) / n,
                      {name: mean[i] for i, name in enumerate(sources) if i in mean},
                      {name: mean[i] for i, name in enumerate(skills, start=len(sources)) if i in mean})
