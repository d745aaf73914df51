"""Greedy generation from (multimodal) contexts, batched, through the model's KV cache.

Each context is laid out exactly as in training and in loglikelihood.py ([BOS], markers, slots)
without its [EOS]. A batch's prompts are right-padded to the longest; padding has doc id -1, so
no real token attends to it, and generated tokens continue their row's document (doc id 0,
positions from the prompt's length on). Encoder items enter at prefill only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from scifm.data.documents import Document
from scifm.data.encode import EncodedDocument, encode_document
from scifm.data.packing import Chunk, Row, collate_rows, placeholder_features
from scifm.eval.fit import check_fits
from scifm.core.encoders_config import EncodersConfig
from scifm.model.kv_cache import KVCache


def _encode_prompt(context: list[dict], tokenizer, enc_cfg: EncodersConfig, base_dir: Path,
                   seq_len: int) -> EncodedDocument:
    doc = encode_document(Document("eval", "eval", "eval", context), tokenizer, enc_cfg, base_dir)
    check_fits(len(doc.ids) - 1, seq_len, "a prompt")  # the prompt is every id but the [EOS]
    return doc


class StopMatcher:
    """Whether a row's text (the decode of its ids so far) contains a stop string, told one id at a
    time; the same answer as decoding every id at every step, up to the first True.

    A new occurrence ends in the newest ids' text, so of the text before them only the last
    (longest stop - 1) characters are kept. Ids are decoded together until their text ends at a
    character boundary, i.e. not in U+FFFD, which is also what a byte-level token's unfinished UTF-8
    sequence decodes to: split at such a boundary, the tokenizer's decode (byte-level BPE, domain
    vocabularies, specials) is the two decodes joined.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.keep = max((len(s) - 1 for s in stop), default=0)
        self.tail = ""  # the last `keep` characters of the settled ids' text
        self.pending: list[int] = []  # ids whose text may still change

    def add(self, token: int) -> bool:
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        text = self.tail + piece
        if not piece.endswith("\ufffd"):
            self.tail, self.pending = text[max(len(text) - self.keep, 0):], []
        return any(s in text for s in self.stop)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


def _generate_batch(model, tokenizer, docs: list[EncodedDocument], placeholders: dict, device: torch.device, *,
                    max_new_tokens: int, seq_len: int, stop: tuple[str, ...]) -> list[list[int]]:
    B = len(docs)
    lengths = [len(d.ids) - 1 for d in docs]
    rows = [Row([Chunk(d, 0, n)]) for d, n in zip(docs, lengths)]
    # rows only as wide as the longest prompt: the cache then holds no padding past it
    batch = collate_rows(rows, max(lengths), tokenizer, placeholders).to(device)
    # the model never sees more than seq_len input tokens (as in training and loglikelihood.py)
    budgets = [min(max_new_tokens, seq_len - n + 1) for n in lengths]
    lengths_B = torch.tensor(lengths, device=device)

    cache = KVCache()
    logits_BSV = model(batch.input_ids, **batch.model_kwargs(), cache=cache)
    last_BV = logits_BSV[torch.arange(B, device=device), lengths_B - 1]
    generated: list[list[int]] = [[] for _ in range(B)]
    stops = [StopMatcher(tokenizer, stop) for _ in range(B)]
    done = [b <= 0 for b in budgets]
    for step in range(max_new_tokens):
        # the decoder vocabulary is padded past the tokenizer's: those ids are never targets
        next_B = last_BV[:, : tokenizer.vocab_size].argmax(-1)
        for r, tok in enumerate(next_B.tolist()):
            if done[r]:
                continue
            if tok == tokenizer.eos_id:
                done[r] = True
                continue
            generated[r].append(tok)
            done[r] = len(generated[r]) >= budgets[r] or stops[r].add(tok)
        if all(done):
            break
        # finished rows are fed too (rows never interact); what they produce is ignored
        positions_B1 = (lengths_B + step)[:, None]
        doc_ids_B1 = torch.zeros_like(positions_B1)
        last_BV = model(next_B[:, None], positions_B1, doc_ids_B1, cache=cache)[:, -1]
    return generated


def _generate_batches(model, tokenizer, enc_cfg: EncodersConfig, batches: Iterable[list[EncodedDocument]], *,
                      max_new_tokens: int, seq_len: int, stop: tuple[str, ...],
                      progress: Callable[[int], None] | None) -> list[list[int]]:
    """Generated ids per prompt, batch after batch of encoded prompts."""
    model.eval()
    placeholders = placeholder_features(tokenizer, enc_cfg)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for docs in batches:
        out += _generate_batch(model, tokenizer, docs, placeholders, device,
                               max_new_tokens=max_new_tokens, seq_len=seq_len, stop=stop)
        if progress is not None:
            progress(len(docs))
    return out


@torch.no_grad()
def generate_greedy_ids(model, tokenizer, enc_cfg: EncodersConfig, contexts: list[list[dict]], *,
                        max_new_tokens: int, seq_len: int, stop: tuple[str, ...] = ("\n",),
                        batch_size: int = 16, base_dir: Path = Path("."),
                        progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Generated token ids per context, without the [EOS]; the last one may complete a stop string.
    `progress(n)` is told of each batch's n finished contexts."""
    # encoded a batch at a time: a task's figures and tables need not all be in memory at once
    batches = ([_encode_prompt(c, tokenizer, enc_cfg, base_dir, seq_len) for c in contexts[start : start + batch_size]]
               for start in range(0, len(contexts), batch_size))
    return _generate_batches(model, tokenizer, enc_cfg, batches, max_new_tokens=max_new_tokens, seq_len=seq_len,
                             stop=stop, progress=progress)


@torch.no_grad()
def generate_greedy_encoded(model, tokenizer, enc_cfg: EncodersConfig, docs: list[EncodedDocument], *,
                            max_new_tokens: int, seq_len: int, stop: tuple[str, ...] = ("\n",),
                            batch_size: int = 16) -> list[str]:
    """generate_greedy for prompts already encoded: each document's ids but the last (the [EOS]
    an encoded document ends with) are the prompt, and the caller has made them fit seq_len."""
    batches = (docs[start : start + batch_size] for start in range(0, len(docs), batch_size))
    ids = _generate_batches(model, tokenizer, enc_cfg, batches, max_new_tokens=max_new_tokens, seq_len=seq_len,
                            stop=stop, progress=None)
    return [cut_at_stop(tokenizer.decode(g), stop) for g in ids]


@torch.no_grad()
def generate_greedy(model, tokenizer, enc_cfg: EncodersConfig, contexts: list[list[dict]], *,
                    max_new_tokens: int, seq_len: int, stop: tuple[str, ...] = ("\n",),
                    batch_size: int = 16, base_dir: Path = Path("."),
                    progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuation text per context, cut before the first stop string.

    Generation of a context ends at [EOS], a stop string, max_new_tokens, or when the model's
    input would pass seq_len tokens.
    """
    ids = generate_greedy_ids(model, tokenizer, enc_cfg, contexts, max_new_tokens=max_new_tokens, seq_len=seq_len,
                              stop=stop, batch_size=batch_size, base_dir=base_dir, progress=progress)
    return [cut_at_stop(tokenizer.decode(g), stop) for g in ids]
