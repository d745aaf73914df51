"""One document -> token ids with marked slot spans and the checked items that fill them.

Layout (docs/architecture.md, "Sequence layout"): [BOS] text... [START_X] k x [SLOT_X] [END_X] text... [EOS].
The model learns next-token prediction on the document's own tokens, so a document of L ids
yields L - 1 (input, target) pairs; targets that are markers or slots carry no loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from scifm.core.modalities import MODALITIES
from scifm.data.documents import Document
from scifm.data.features import Prepared, prepare_segment
from scifm.core.encoders_config import EncodersConfig


@dataclass
class EncodedItem:
    modality: str
    slot_start: int  # index of the first slot id in EncodedDocument.ids
    n_slots: int
    prepared: Prepared  # checked; its features are computed only for the rows a rank keeps (collate)

    def features(self) -> dict:
        return self.prepared.features()


@dataclass
class EncodedDocument:
    skill: str
    ids: list[int]
    items: list[EncodedItem] = field(default_factory=list)

    @property
    def n_ids(self) -> int:
        return len(self.ids)

    @property
    def item_spans(self) -> list[tuple[str, int, int]]:
        return [(item.modality, item.slot_start, item.n_slots) for item in self.items]


class LaidOut(Protocol):
    """What packing reads of a document: an EncodedDocument, or an indexed one
    (scifm.data.indexed.packing_index) whose length and verdict come from its packing index row and
    whose item spans, ids and items are read only by a rank that needs them."""

    skill: str
    n_ids: int
    item_spans: list[tuple[str, int, int]]  # each item's modality, first slot and slot count: what a cut avoids
    ids: list[int] | np.ndarray  # an indexed document's are an array (collate writes either into numpy rows)
    items: list[EncodedItem]


def encode_document(doc: Document, tokenizer, enc_cfg: EncodersConfig, base_dir: Path) -> EncodedDocument:
    """Raises DocumentFormatError (with a counted reason) when any segment is bad."""
    ids = [tokenizer.bos_id]
    items: list[EncodedItem] = []
    for seg in doc.segments:
        kind = seg["type"]
        if kind == "text":
            ids.extend(tokenizer.encode_text(seg["text"]))
            continue
        assert kind in MODALITIES, kind  # Document.from_dict already rejected other types
        ids += laid_out_item(items, len(ids), kind, prepare_segment(seg, tokenizer, enc_cfg, base_dir), tokenizer, enc_cfg)
    ids.append(tokenizer.eos_id)
    return EncodedDocument(doc.skill, ids, items)


def laid_out_item(items: list[EncodedItem], at: int, kind: str, prepared: Prepared, tokenizer,
                  enc_cfg: EncodersConfig) -> tuple[int, ...]:
    """Appends the item that starts at id `at` to `items` and returns its [START_X] k x [SLOT_X] [END_X]
    ids. Shared with indexed datasets (scifm.data.indexed), whose documents must come out the same."""
    k = getattr(enc_cfg, kind).slots
    items.append(EncodedItem(kind, at + 1, k, prepared))
    return _marker_block(tokenizer, kind, k)


@functools.lru_cache(maxsize=32)
def _marker_block(tokenizer, kind: str, k: int) -> tuple[int, ...]:
    """[START_X] k x [SLOT_X] [END_X]: the same ids for every item of a kind, made once."""
    return (tokenizer.start_id(kind), *[tokenizer.slot_id(kind)] * k, tokenizer.end_id(kind))
