"""How a step's micro-batches go through the parallelised model, whatever the layout.

`parallelize` returns a runner; the trainer only ever talks to it: forward and backward over a
step's micro-batches, the losses of a validation batch, gradient clipping and the MoE statistics
of every layer. ModelRunner runs each micro-batch through the whole model (one process, FSDP,
TP/SP, EP); PipelineRunner (pipeline.py) hands them to a pipeline schedule. Results are the
same on every rank of a data-parallel replica, so the trainer needs no per-layout branches.

The loss is the caller's `loss_fn(logits_BSV, labels_BS, scale)`: summed cross-entropy times
`scale`. Under tensor parallelism with loss parallelism the logits are a vocab-sharded DTensor;
the loss and its backward then run inside torch's loss-parallel context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from scifm.parallel.grad_norm import clip_grad_norm

# (logits_BSV, labels_BS, scale) -> summed cross-entropy x scale
LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
# (logits_BSV, labels_BS) -> each target's loss [B, S]: validation's losses, summed by its caller
TargetLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MicroBatch(Protocol):
    """What a runner needs of a batch (scifm.data.packing.Batch is one)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def model_kwargs(self) -> dict: ...

    def to(self, device: torch.device) -> MicroBatch: ...


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (a replicated loss under loss parallelism) gathered whole."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def loss_parallel_for(logits: torch.Tensor):
    # vocab-sharded logits need the context around the loss and its backward
    return loss_parallel() if isinstance(logits, DTensor) else contextlib.nullcontext()


def reshard(module: nn.Module) -> None:
    """Ends a forward-only pass: FSDP2 keeps a root's (and, under a pipeline, every stage's) gathered
    parameters until a backward that will not come, and until then the module holds other parameter
    objects than the optimizer, which a checkpoint taken then could not match."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class ModelRunner:
    """Each micro-batch through the whole (sharded) model in turn."""

    pp_group = None  # no pipeline: every rank holds every layer
    applies_update = False  # True where clip_grad_norm also steps the optimizer (engines that own it)
    # True where an engine keeps weights and optimizer state in its own partitions: the checkpoint's
    # full tensors are gathered from them (checkpoint_states) and scattered back (load_checkpoint_states)
    gathers_checkpoint = False

    def __init__(self, model: nn.Module, loss_fn: LossFn, autocast, device: torch.device):
        self.model = model
        self.train_forward = model  # what training steps call (an engine may wrap the model)
        self.loss_fn = loss_fn
        self.autocast = autocast
        self.device = device

    def forward_backward(self, micro: list[MicroBatch], scale: float) -> torch.Tensor:
        """Backpropagates loss_fn(..., scale) of every micro-batch (gradients accumulate in .grad);
        returns the sum of those losses (float64, on the CPU)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # read once: no per-batch sync
        for batch in micro:
            batch = batch.to(self.device)
            with self.autocast:
                logits_BSV = self.train_forward(batch.input_ids, **batch.model_kwargs())
            with loss_parallel_for(logits_BSV):
                loss = self.loss_fn(logits_BSV, batch.labels, scale)
                del logits_BSV  # the loss keeps what its backward needs: the logits need not outlive it
                self.backward(loss)
            total += full_value(loss.detach()).double()
        return total.cpu()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def target_losses(self, batch: MicroBatch, loss_fn: TargetLossFn) -> torch.Tensor:
        """Forward only: `loss_fn`'s loss of each target of one batch, [B, S] float64 on the CPU."""
        batch = batch.to(self.device)
        with self.autocast:
            logits_BSV = self.model(batch.input_ids, **batch.model_kwargs())
        with loss_parallel_for(logits_BSV):
            losses = full_value(loss_fn(logits_BSV, batch.labels)).double().cpu()
        reshard(self.model)
        return losses

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clips when max_norm > 0; the total gradient norm, identical on every rank."""
        return float(clip_grad_norm(self.model.parameters(), max_norm, self.pp_group))

    def scheduler_state(self, scheduler) -> dict:
        """The schedule's state with one entry per param group of the native optimizer (the checkpoint's)."""
        return scheduler.state_dict()

    def load_scheduler_state(self, scheduler, state: dict) -> None:
        scheduler.load_state_dict(state)

    def gather_moe_stats(self, stats: list[dict]) -> list[dict]:
        """Every MoE layer's statistics in layer order, from this rank's (here: all of them)."""
        return stats
