"""The training loss's chunked cross-entropy against torch's, in value and gradient, and what it keeps
between forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scifm.model import cross_entropy
from scifm.model.cross_entropy import ChunkedCrossEntropy
from scifm.train.step import scaled_cross_entropy

IGNORE = -100
N, V = 10, 48


def _logits_and_labels(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(N, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 6, 7, 8]] = IGNORE  # rows 6-8: a whole chunk of three rows without targets
    return logits, labels


def _torchs(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum") * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_give_torchs_loss_and_gradient(dtype, monkeypatch):
    """Chunks of 3 rows (the last one short). fp32: loss and gradient to 1e-6 relative (the same
    fp32 sums, in another order). bf16 logits: both compute in fp32 from the same values; torch's
    gradient is rounded to bf16 once, this one twice here (the loss's gradient of 3 multiplies it in
    bf16), so they may differ by two bf16 steps (2**-7 relative)."""
    monkeypatch.setattr(cross_entropy, "CHUNK_LOGITS", 3 * V)
    chunk_rows = []
    log_softmax = F.log_softmax
    monkeypatch.setattr(cross_entropy.F, "log_softmax",
                        lambda x, **kwargs: chunk_rows.append(x.shape[0]) or log_softmax(x, **kwargs))
    logits, labels = _logits_and_labels(dtype)
    got_logits, want_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = scaled_cross_entropy(got_logits.view(2, N // 2, V), labels.view(2, N // 2), 0.25)
    want = _torchs(want_logits, labels, 0.25)
    (3 * got).backward()  # a gradient other than 1 reaches the loss
    (3 * want).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert chunk_rows == [3, 3, 3, 1]  # the fp32 temporaries never span more than a chunk
    tolerance = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got_logits.grad, want_logits.grad, rtol=tolerance, atol=1e-7)
    assert got_logits.grad.dtype == dtype
    assert (got_logits.grad[[1, 6, 7, 8]] == 0).all()  # no loss taken there


def test_between_forward_and_backward_it_keeps_one_tensor_of_the_logits_size_and_dtype():
    """torch's keeps an fp32 log-softmax (and the fp32 copy's graph); this keeps the gradient, in the
    logits' dtype, and under no_grad nothing."""
    logits, labels = _logits_and_labels(torch.bfloat16)
    logits.requires_grad_()

    def saved_bytes(loss_fn) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss_fn()
        return sum(saved)

    assert saved_bytes(lambda: ChunkedCrossEntropy.apply(logits, labels, 1.0, IGNORE)) == N * V * 2
    assert saved_bytes(lambda: _torchs(logits, labels, 1.0)) >= N * V * 4
    with torch.no_grad():
        assert saved_bytes(lambda: ChunkedCrossEntropy.apply(logits, labels, 1.0, IGNORE)) == 0
        torch.testing.assert_close(ChunkedCrossEntropy.apply(logits, labels, 1.0, IGNORE),
                                   _torchs(logits, labels, 1.0), rtol=1e-6, atol=0)


def test_a_second_backward_is_refused_not_wrong():
    logits, labels = _logits_and_labels(torch.float32)
    logits.requires_grad_()
    loss = ChunkedCrossEntropy.apply(logits, labels, 1.0, IGNORE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward through the same loss is not supported"):
        loss.backward()
