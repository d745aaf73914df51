"""The packing index: per stored document, what packing needs of it, without reading the document.

`scifm data tokenize` writes beside each shard an int32 array, one row per document: its split and
skill (codes), its stored length and, per kind of item (layout.STORED_KINDS), how many items it
has, the sum of their stored ids (none for a table or figure) and its largest item in what the
featurizer checks (atoms for a molecule, cells for a table, ids for LaTeX and proteins; 0 for a
figure, which has no length limit). A stream turns the index, a block of rows at a time, into each
document's laid-out length under the run's encoders (stored length plus, per kind, items x slots
less their ids), or REFUSED where an item is over its encoder's max_len; it passes over other splits
and skills by their codes. Packing then gets a document as an IndexedLayout holding that length:
only a rank that collates a row of it, or cuts it across rows (where its items' slots fall), reads
its ids; its metadata (molecules' atom and bond counts) only where it has molecules, and its
payloads only where it has tables or figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from scifm.core.encoders_config import EncodersConfig
from scifm.data.documents import SPLITS
from scifm.data.encode import EncodedItem
from scifm.data.indexed.layout import STORED_KINDS, IndexedDocument, StoredDocument

if TYPE_CHECKING:
    from scifm.data.indexed.stream import OpenShard

SPLIT, SKILL, STORED_IDS = 0, 1, 2
FIRST_KIND_COLUMN, KIND_COLUMNS = 3, 3  # then per kind: item count, sum of item ids, largest item
N_COLUMNS = FIRST_KIND_COLUMN + KIND_COLUMNS * len(STORED_KINDS)
ITEM_COUNTS = slice(FIRST_KIND_COLUMN, N_COLUMNS, KIND_COLUMNS)  # each kind's item count's column
MOLECULES, TABLES, FIGURES = (range(N_COLUMNS)[ITEM_COUNTS][STORED_KINDS.index(kind)]  # their count's columns
                              for kind in ("molecule", "table", "figure"))
DTYPE = np.int32
REFUSED = -1  # laid_out_lengths' mark of a document an item of which is over its encoder's max_len


def index_row(stored: StoredDocument, split: str, skill_code: int) -> list[int]:
    row = [SPLITS.index(split), skill_code, len(stored.ids)] + [0] * (N_COLUMNS - FIRST_KIND_COLUMN)
    for kind, n_item_ids, size in stored.items:
        col = FIRST_KIND_COLUMN + KIND_COLUMNS * STORED_KINDS.index(kind)
        row[col] += 1
        row[col + 1] += n_item_ids
        row[col + 2] = max(row[col + 2], size)
    return row


def laid_out_lengths(index: np.ndarray, enc_cfg: EncodersConfig) -> np.ndarray:
    """Each row's laid-out length under `enc_cfg` (int64), REFUSED where an item is over its max_len."""
    lengths = index[:, STORED_IDS].astype(np.int64)
    refused = np.zeros(len(index), dtype=bool)
    for col, kind in zip(range(N_COLUMNS)[ITEM_COUNTS], STORED_KINDS):
        encoder = getattr(enc_cfg, kind)
        lengths += index[:, col].astype(np.int64) * encoder.slots - index[:, col + 1]
        refused |= index[:, col + 2] > encoder.max_len  # 0 where the document has none of the kind
    lengths[refused] = REFUSED
    return lengths


class IndexedLayout:
    """An indexed document as packing sees it (encode.LaidOut): its laid-out length from the packing
    index; where its items' slots fall (on a rank that cuts it across rows) and its ids and items (on
    a rank that collates a row of it) come from the stored document, read on first use."""

    __slots__ = ("skill", "n_ids", "shard", "pos", "_doc", "_item_spans", "_ids", "_items")

    def __init__(self, shard: "OpenShard", pos: int, skill: str, n_ids: int):
        self.skill, self.n_ids, self.shard, self.pos = skill, n_ids, shard, pos
        self._doc: IndexedDocument | None = None
        self._item_spans: list[tuple[str, int, int]] | None = None
        self._ids: list[int] | np.ndarray | None = None
        self._items: list[EncodedItem] = []

    def read(self) -> IndexedDocument:
        if self._doc is None:
            self._doc = self.shard.document(self.pos)
        return self._doc

    @property
    def item_spans(self) -> list[tuple[str, int, int]]:
        if self._item_spans is None:
            n_ids, self._item_spans = self.read().measure(self.shard.tokenizer, self.shard.enc_cfg)
            self._check(n_ids)
        return self._item_spans

    @property
    def ids(self) -> list[int] | np.ndarray:
        return self._ids if self._ids is not None else self._lay_out()

    @property
    def items(self) -> list[EncodedItem]:
        if self._ids is None:
            self._lay_out()
        return self._items

    def _lay_out(self) -> list[int] | np.ndarray:
        if self._doc is None and self.shard.prose_only(self.pos):  # unread, and laid out as stored
            ids, self._items = self.shard.stored_ids(self.pos), []
        else:
            ids, self._items = self.read().lay_out(self.shard.tokenizer, self.shard.enc_cfg)
        self._check(len(ids))
        self._ids = ids
        return ids

    def _check(self, n_ids: int) -> None:
        if n_ids != self.n_ids:  # packing already used the index's length
            raise AssertionError(f"{self.shard.document_id(self.pos)}: {n_ids} ids laid out, its packing index "
                                 f"says {self.n_ids}")
