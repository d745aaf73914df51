"""Packing encoded documents into fixed-length rows, and rows into a model batch.

A document longer than a row is cut into chunks of at most `seq_len` (input, target) pairs;
a cut never falls inside a modality item's [START_X] slots [END_X] span, and each chunk is
its own attention segment with positions restarting at 0. Chunks are placed greedily: one that
does not fit the rest of a row starts the next row, and the rest is padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from scifm.data.encode import EncodedItem, LaidOut
from scifm.data.features import Prepared, collate, featurize_segment
from scifm.core.errors import DocumentFormatError

IGNORE_INDEX = -100


class Chunk:
    """inputs are doc.ids[start:stop], targets doc.ids[start + 1:stop + 1]. Every rank makes one for
    each document of the global batch, so it is a slotted class whose length is computed once."""

    __slots__ = ("doc", "start", "stop", "length")

    def __init__(self, doc: LaidOut, start: int, stop: int):
        self.doc, self.start, self.stop, self.length = doc, start, stop, stop - start

    def items(self) -> list[EncodedItem]:
        return [it for it in self.doc.items if self.start <= it.slot_start and it.slot_start + it.n_slots <= self.stop]


def fits_a_row(n_ids, seq_len: int):
    """Whether a document of n_ids laid-out ids goes into one row uncut: its n_ids - 1 inputs fit in
    seq_len (for an int, or elementwise for an array of them)."""
    return n_ids - 1 <= seq_len


def chunk_document(doc: LaidOut, seq_len: int) -> list[Chunk]:
    last = doc.n_ids - 1  # index of the final target
    if last > 0 and fits_a_row(doc.n_ids, seq_len):  # most documents, and nothing to cut
        return [Chunk(doc, 0, last)]
    chunks, start = [], 0
    while start < last:
        stop = min(start + seq_len, last)
        # the last chunk cuts nothing: a document that fits a row is chunked without its items
        for modality, slot_start, n_slots in doc.item_spans if stop < last else ():
            # a cut may fall on the START marker (slot_start - 1) or after the slots, not between
            if slot_start - 1 < stop < slot_start + n_slots:
                stop = slot_start - 1
                if stop <= start:
                    raise DocumentFormatError(
                        "too_long", f"a {modality} item of {n_slots} slots does not fit data.seq_len={seq_len}")
        chunks.append(Chunk(doc, start, stop))
        start = stop
    return chunks


@dataclass
class Row:
    chunks: list[Chunk] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # each chunk's data.sources name (the loader's rows)

    @property
    def used(self) -> int:
        return sum(c.length for c in self.chunks)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] long
    labels: torch.Tensor  # [B, S] long, IGNORE_INDEX where no loss is taken
    positions: torch.Tensor  # [B, S] long, restarting at 0 in every chunk
    doc_ids: torch.Tensor  # [B, S] long, attention segment id; padding gets its own id
    items: dict[str, dict[str, torch.Tensor]]  # modality -> collated encoder inputs
    slot_index: dict[str, torch.Tensor]  # modality -> [N, k] flat indices b * S + s of the slots
    # per row, each chunk's (source, skill), indexed by doc_ids: the validation loss per source and skill
    chunk_tags: list[list[tuple[str, str]]] = field(default_factory=list)

    def model_kwargs(self) -> dict:
        """The model's inputs besides input_ids (ScientificMoE.forward's keyword names): the one
        Batch -> model step of training, scoring, generation and every pipeline stage."""
        return {"positions_BS": self.positions, "doc_ids_BS": self.doc_ids, "items": self.items,
                "slot_index": self.slot_index}

    def to(self, device: torch.device) -> "Batch":
        return Batch(
            self.input_ids.to(device), self.labels.to(device), self.positions.to(device),
            self.doc_ids.to(device),
            {m: {k: v.to(device) for k, v in feats.items()} for m, feats in self.items.items()},
            {m: v.to(device) for m, v in self.slot_index.items()},
            self.chunk_tags,
        )

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# One tiny item per modality that a batch lacks: every encoder then runs on every rank and step,
# so data-parallel ranks issue the same collectives and every parameter gets a (zero) gradient.
PLACEHOLDER_SEGMENTS = {
    "latex": {"type": "latex", "latex": "x"},
    "molecule": {"type": "molecule", "smiles": "C"},
    "protein": {"type": "protein", "sequence": "M"},
    "table": {"type": "table", "columns": ["x"], "rows": [["0"]]},
    "figure": {"type": "figure", "array": [[0.0]]},
}


def placeholder_features(tokenizer, enc_cfg) -> dict[str, dict[str, torch.Tensor]]:
    """Each placeholder item's encoder inputs, collated once: every batch that lacks the modality
    shares them (read-only, as all of a batch's inputs are)."""
    return {m: collate(m, [featurize_segment(seg, tokenizer, enc_cfg, Path("."))])
            for m, seg in PLACEHOLDER_SEGMENTS.items()}


def features_in_turn(prepared: list[Prepared]) -> Iterable[dict]:
    return (p.features() for p in prepared)


def collate_rows(rows: list[Row], seq_len: int, tokenizer, placeholders: dict[str, dict[str, torch.Tensor]],
                 featurize: Callable[[list[Prepared]], Iterable[dict]] = features_in_turn) -> Batch:
    """`placeholders` (from placeholder_features) stand in for modalities without items; their
    slot_index has no rows, so they write nothing into the sequence. `featurize` gives the items'
    features in order (the loader's may spread them over threads)."""
    n_rows = len(rows)
    # filled in numpy a chunk at a time: a tensor per chunk cost more than the packing on short documents
    input_ids_BS = np.full((n_rows, seq_len), tokenizer.pad_id, dtype=np.int64)
    targets_BS = input_ids_BS.copy()
    positions_BS = np.zeros((n_rows, seq_len), dtype=np.int64)
    doc_ids_BS = np.full((n_rows, seq_len), -1, dtype=np.int64)
    modalities: list[str] = []  # each item's, in order
    prepared: list[Prepared] = []
    first_slots: dict[str, list[int]] = {}  # flat index of each item's first slot
    n_slots: dict[str, int] = {}  # one count per modality (its encoder's output)
    for r, row in enumerate(rows):
        offset = 0
        for chunk in row.chunks:
            ids, end = chunk.doc.ids, offset + chunk.length  # a list, or an indexed document's array
            input_ids_BS[r, offset:end] = ids[chunk.start : chunk.stop]
            targets_BS[r, offset:end] = ids[chunk.start + 1 : chunk.stop + 1]
            for item in chunk.items():
                modalities.append(item.modality)
                prepared.append(item.prepared)
                first_slots.setdefault(item.modality, []).append(r * seq_len + offset + item.slot_start - chunk.start)
                n_slots[item.modality] = item.n_slots
            offset = end
        used = offset
        lengths = np.array([chunk.length for chunk in row.chunks], dtype=np.int64)
        positions_BS[r, :used] = np.arange(used) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        doc_ids_BS[r, :used] = np.repeat(np.arange(len(lengths)), lengths)
    features: dict[str, list[dict]] = {}
    for modality, computed in zip(modalities, featurize(prepared), strict=True):
        features.setdefault(modality, []).append(computed)
    items = {m: collate(m, feats) for m, feats in features.items()}
    items.update({m: collated for m, collated in placeholders.items() if m not in items})
    slot_index = {m: torch.from_numpy(np.array(firsts)[:, None] + np.arange(n_slots[m]))
                  for m, firsts in first_slots.items()}
    slot_index.update({m: torch.empty((0, 0), dtype=torch.long) for m in items if m not in first_slots})
    input_ids, targets = torch.from_numpy(input_ids_BS), torch.from_numpy(targets_BS)
    doc_ids = torch.from_numpy(doc_ids_BS)
    is_target = tokenizer.loss_target_mask(targets) & (doc_ids >= 0)
    labels = torch.where(is_target, targets, torch.full_like(targets, IGNORE_INDEX))
    return Batch(
        input_ids, labels, torch.from_numpy(positions_BS), doc_ids, items, slot_index,
        [[(source, chunk.doc.skill) for source, chunk in zip(row.sources, row.chunks)] for row in rows],
    )
