"""The training loss's cross-entropy, computed a chunk of rows at a time with its gradient.

torch's cross-entropy on a step's logits (cast to fp32 first) keeps, until backward, an fp32
log-softmax of every token over the whole vocabulary, and its backward adds fp32 tensors of the
same size (a zero-filled gradient, the log-softmax's) and the cast back to the logits' dtype:
several times the logits' own bytes. Here each chunk's log-softmax gives its share of the loss and,
straight away, its share of the gradient (scale x (softmax - one-hot of the target), zero where no
loss is taken), written into one buffer of the logits' dtype; backward hands that buffer on. What
stays between forward and backward is that buffer, and a chunk's fp32 temporaries are all the
forward adds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# logits per chunk: its fp32 temporaries (a cast copy of bf16 logits, the log-softmax) 256 MB each
CHUNK_LOGITS = 1 << 26


def chunk_rows(vocab: int) -> int:
    """Rows of the logits each chunk takes (the planner counts the chunk's temporaries with it)."""
    return max(1, CHUNK_LOGITS // vocab)


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum over rows whose label is not `ignore_index` of -log softmax(logits)[label], times `scale`."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor, scale: float, ignore_index: int):
        grad_NV = torch.empty_like(logits_NV) if ctx.needs_input_grad[0] else None
        loss = torch.zeros((), dtype=torch.float32, device=logits_NV.device)
        rows = chunk_rows(logits_NV.shape[1])
        for start in range(0, logits_NV.shape[0], rows):
            labels = labels_N[start : start + rows]
            valid = labels != ignore_index
            targets = torch.where(valid, labels, 0)[:, None]
            # always a new fp32 tensor (bf16 logits are cast as they are read), so it can be reused in place
            logp = F.log_softmax(logits_NV[start : start + rows], dim=-1, dtype=torch.float32)
            loss -= (logp.gather(1, targets).squeeze(1) * valid).sum()
            if grad_NV is not None:
                probs = logp.exp_()
                probs.scatter_add_(1, targets, -valid[:, None].to(probs.dtype))
                probs.mul_((valid * scale)[:, None])
                grad_NV[start : start + rows] = probs
        if grad_NV is not None:
            ctx.save_for_backward(grad_NV)
        ctx.used = False
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:  # the buffer was scaled in place by the first backward
            raise RuntimeError("ChunkedCrossEntropy: a second backward through the same loss is not supported")
        ctx.used = True
        (grad_NV,) = ctx.saved_tensors
        # in place: a second logits-sized tensor would undo half the saving (grad_loss is 1 in training)
        return grad_NV.mul_(grad_loss.to(grad_NV.dtype)), None, None, None
