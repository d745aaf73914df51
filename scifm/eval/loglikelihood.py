"""Log-likelihood of a continuation given a (multimodal) context, batched through the model.

Each request is a context (segments of the document format, docs/architecture.md: text, molecule, protein, table, figure, latex) and a
continuation string. The context is laid out exactly as in training ([BOS], markers, slots) without
its [EOS]; the continuation's tokens follow, and their log-probabilities are summed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scifm.data.documents import Document
from scifm.data.encode import EncodedDocument, encode_document
from scifm.data.packing import Chunk, Row, collate_rows, placeholder_features
from scifm.core.errors import DataError
from scifm.eval.fit import check_fits
from scifm.core.encoders_config import EncodersConfig


@dataclass(frozen=True)
class Request:
    context: list[dict]  # segments
    continuation: str


@dataclass(frozen=True)
class Result:
    logprob: float  # summed over the continuation's tokens
    n_tokens: int
    greedy: bool  # every continuation token is the model's argmax


def _encode(req: Request, tokenizer, enc_cfg: EncodersConfig, base_dir: Path, seq_len: int) -> tuple[EncodedDocument, int]:
    context = encode_document(Document("eval", "eval", "eval", req.context), tokenizer, enc_cfg, base_dir)
    cont = tokenizer.encode_text(req.continuation)
    if not cont:
        raise DataError(f"empty continuation {req.continuation!r}: nothing to score")
    ids = context.ids[:-1] + cont  # the context without its [EOS]
    check_fits(len(ids) - 1, seq_len, "a request")
    return EncodedDocument("eval", ids, context.items), len(cont)


def score_continuations(model, tokenizer, enc_cfg: EncodersConfig, requests: list[Request], *, seq_len: int,
                        batch_size: int = 16, base_dir: Path = Path("."),
                        progress: Callable[[int], None] | None = None) -> list[Result]:
    """One request per row (never packed together, so rows cannot influence each other), scored by
    score_token_continuations."""
    encoded = [_encode(r, tokenizer, enc_cfg, base_dir, seq_len) for r in requests]
    return score_token_continuations(model, tokenizer, enc_cfg, [doc for doc, _ in encoded],
                                     [n for _, n in encoded], batch_size=batch_size, progress=progress)


@torch.no_grad()
def score_token_continuations(model, tokenizer, enc_cfg: EncodersConfig, docs: list[EncodedDocument],
                              n_conts: list[int], *, batch_size: int = 16,
                              progress: Callable[[int], None] | None = None) -> list[Result]:
    """Scores the last n_conts[i] ids of docs[i] given the ids before them, one document per row
    starting at position 0 (callers check that each fits the sequence length).

    Documents are batched longest first and each batch is padded only to its longest row, so short
    questions do not pay for the model's whole sequence length; `progress(n)` is told of each
    batch's n documents."""
    model.eval()
    placeholders = placeholder_features(tokenizer, enc_cfg)
    device = next(model.parameters()).device
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i].ids))
    results: list[Result | None] = [None] * len(docs)
    for start in range(0, len(order), batch_size):
        batch_idx = order[start : start + batch_size]
        rows = [Row([Chunk(docs[i], 0, len(docs[i].ids) - 1)]) for i in batch_idx]
        batch = collate_rows(rows, max(row.used for row in rows), tokenizer, placeholders).to(device)
        logits_BSV = model(batch.input_ids, **batch.model_kwargs())
        logp_BSV = torch.log_softmax(logits_BSV.float(), dim=-1)
        for r, i in enumerate(batch_idx):
            doc, n_cont = docs[i], n_conts[i]
            n = len(doc.ids)
            targets_C = torch.tensor(doc.ids[n - n_cont :], device=device)
            # position t predicts token t + 1: the continuation's tokens are predicted at these rows
            logp_CV = logp_BSV[r, n - 1 - n_cont : n - 1]
            picked_C = logp_CV.gather(1, targets_C[:, None])[:, 0]
            results[i] = Result(float(picked_C.sum()), n_cont, bool((logp_CV.argmax(-1) == targets_C).all()))
        if progress is not None:
            progress(len(batch_idx))
    return results
