"""The packing index: per stored document, what packing needs of it, without reading the document.

`scifm data tokenize` writes beside each shard an int32 array, one row per document: its split and
skill (codes), its stored length and, per stored kind (latex, molecule, protein), how many items it
has, the sum of their stored ids and its largest item in what the featurizer checks (atoms for a
molecule, ids otherwise). A stream passes over other splits and skills by the row alone, and packing
gets a document's laid-out length (stored length plus, per kind, items x slots less their ids) and its
verdict under the run's length limits from it. Only a rank that collates a row of the document, or
that cuts it across rows (where its items' slots fall), reads its ids and metadata; a document the
limits refuse is read too, so that it is refused with the same error as its JSONL line.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from scifm.core.encoders_config import EncodersConfig
from scifm.data.documents import SPLITS
from scifm.data.encode import EncodedDocument, EncodedItem
from scifm.data.indexed.layout import STORED_KINDS, IndexedDocument, StoredDocument

SPLIT, SKILL, STORED_IDS = 0, 1, 2
FIRST_KIND_COLUMN, KIND_COLUMNS = 3, 3  # then per kind: item count, sum of item ids, largest item
N_COLUMNS = FIRST_KIND_COLUMN + KIND_COLUMNS * len(STORED_KINDS)
DTYPE = np.int32


def index_row(stored: StoredDocument, split: str, skill_code: int) -> list[int]:
    row = [SPLITS.index(split), skill_code, len(stored.ids)] + [0] * (N_COLUMNS - FIRST_KIND_COLUMN)
    atoms = iter(stored.atoms)
    for kind, n_item_ids in stored.items:
        col = FIRST_KIND_COLUMN + KIND_COLUMNS * STORED_KINDS.index(kind)
        row[col] += 1
        row[col + 1] += n_item_ids
        row[col + 2] = max(row[col + 2], next(atoms) if kind == "molecule" else n_item_ids)
    return row


class IndexedRecord:
    """A stored document as its stream yields it: its index row, and how to read the document itself."""

    __slots__ = ("row", "skill", "_read", "_doc")

    def __init__(self, row: list[int], skill: str, read: Callable[[], IndexedDocument]):
        self.row, self.skill, self._read = row, skill, read
        self._doc: IndexedDocument | None = None

    def read(self) -> IndexedDocument:
        if self._doc is None:
            self._doc = self._read()
        return self._doc

    @property
    def id(self) -> str:
        return self.read().id

    def encode(self, tokenizer, enc_cfg: EncodersConfig) -> "IndexedLayout":
        """Its laid-out length from the row; raises DocumentFormatError, from the document itself, where
        an item is over its encoder's max_len (the first such item names the error, as from JSONL)."""
        row, n_ids = self.row, self.row[STORED_IDS]
        for col, kind in zip(range(FIRST_KIND_COLUMN, N_COLUMNS, KIND_COLUMNS), STORED_KINDS):
            count, item_ids, largest = row[col : col + KIND_COLUMNS]
            if count:
                encoder = getattr(enc_cfg, kind)
                if largest > encoder.max_len:
                    self.read().measure(tokenizer, enc_cfg)  # raises the refusal
                    raise AssertionError(f"{self.id}: its packing index refuses it, its stored ids do not")
                n_ids += count * encoder.slots - item_ids
        return IndexedLayout(self, tokenizer, enc_cfg, n_ids)


class IndexedLayout:
    """An indexed document as packing sees it (encode.LaidOut): measured from its index row; where its
    items' slots fall (on a rank that cuts it across rows) and its ids and items (on a rank that
    collates a row of it) come from the stored document, read on first use."""

    __slots__ = ("skill", "n_ids", "record", "_tokenizer", "_enc_cfg", "_item_spans", "_laid_out")

    def __init__(self, record: IndexedRecord, tokenizer, enc_cfg: EncodersConfig, n_ids: int):
        self.skill, self.n_ids = record.skill, n_ids
        self.record, self._tokenizer, self._enc_cfg = record, tokenizer, enc_cfg
        self._item_spans: list[tuple[str, int, int]] | None = None
        self._laid_out: EncodedDocument | None = None

    @property
    def item_spans(self) -> list[tuple[str, int, int]]:
        if self._item_spans is None:
            n_ids, self._item_spans = self.record.read().measure(self._tokenizer, self._enc_cfg)
            self._check(n_ids)
        return self._item_spans

    @property
    def ids(self) -> list[int]:
        return (self._laid_out or self._lay_out()).ids

    @property
    def items(self) -> list[EncodedItem]:
        return (self._laid_out or self._lay_out()).items

    def _lay_out(self) -> EncodedDocument:
        laid_out = self.record.read().lay_out(self._tokenizer, self._enc_cfg)
        self._check(laid_out.n_ids)
        self._laid_out = laid_out
        return laid_out

    def _check(self, n_ids: int) -> None:
        if n_ids != self.n_ids:  # packing already used the index's length
            raise AssertionError(f"{self.record.id}: {n_ids} ids laid out, its packing index says {self.n_ids}")
