"""An indexed source read as a resumable stream, with DocumentStream's interface (the loader uses either).

The cursor is (epoch, shard index, index of the next document in the shard), so a resumed run reads
its next document directly. Documents of other splits (by the hash of the id, as for JSONL, stored
as a code in the packing index) and, with skills balanced, of other skills are passed over by their
packing index rows alone; a document is yielded as its row (packing_index.IndexedRecord) and read
only where it is needed. A resumed stream checks that the cursor's shard is still the one it read:
the checkpoint keeps the sidecar's digest of it (the loader also keeps every shard's size).
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict

import numpy as np

from scifm.core.errors import DataError
from scifm.data.documents import SPLITS
from scifm.data.indexed.files import open_packing_index, open_shard, read_sidecar
from scifm.data.indexed.graphs import DTYPE
from scifm.data.indexed.layout import IndexedDocument
from scifm.data.indexed.packing_index import SKILL, SPLIT, IndexedRecord
from scifm.data.streams import Cursor, SourceSpec, changed

NO_GRAPHS = np.empty(0, DTYPE)  # a document without molecules: its graphs are not read
# shards whose documents are kept open for reading: a batch's documents span the one the stream is in
# and, just after it moved on, the one before
OPEN_SHARDS = 2


class IndexedStream:
    def __init__(self, spec: SourceSpec, split: str, skill: str | None = None):
        self.spec, self.split, self.skill = spec, split, skill
        sidecar = read_sidecar(spec.index)
        self._shards: list[dict] = sidecar["shards"]
        counts: dict[str, int] = sidecar["skills"][split]
        self._matching = counts.get(skill, 0) if skill is not None else sum(counts.values())
        self._split_code = SPLITS.index(split)
        self.cursor: Cursor = (0, 0, 0)
        self._index: tuple | None = None  # (shard index, its packing index, its skill names, the skill's code)
        self._open: OrderedDict[int, tuple] = OrderedDict()  # shard index -> (tokens, metadata, graphs)

    def seek(self, cursor: Cursor, prefix_sha256: str | None = None) -> None:
        """Continue at `cursor`; with the checkpoint's shard digest, checks the shard is the same."""
        _, shard, pos = cursor
        if not (0 <= shard < len(self._shards) and 0 <= pos <= self._shards[shard]["documents"]):
            raise DataError(f"{self.spec.index}: the checkpoint read shard {shard + 1}, document {pos}, which "
                            "this dataset lacks now: it changed since the checkpoint; restore it or start a new run")
        if prefix_sha256 is not None and prefix_sha256 != self._shards[shard]["sha256"]:
            raise changed(self.spec.files[shard], "it was written again")
        self.cursor = tuple(cursor)  # type: ignore[assignment]

    def prefix_sha256(self) -> str:
        return self._shards[self.cursor[1]]["sha256"]

    def next(self) -> tuple[Cursor, IndexedRecord, str]:
        """The next document of this split (and skill); an indexed dataset holds no bad records."""
        if not self._matching:
            raise DataError(f"source '{self.spec.name}' has no documents in the {self.split} split"
                            + (f" with skill '{self.skill}'" if self.skill else "")
                            + f" ({self.spec.index}); add documents or remove it from data.sources")
        while True:
            epoch, shard, pos = self.cursor
            if pos == self._shards[shard]["documents"]:
                more = shard + 1 < len(self._shards)
                self.cursor = (epoch, shard + 1, 0) if more else (epoch + 1, 0, 0)
                continue
            self.cursor = (epoch, shard, pos + 1)
            _, index, skills, skill_code = self._packing_index(shard)
            row = index[pos].tolist()
            if row[SPLIT] == self._split_code and skill_code in (None, row[SKILL]):
                return (epoch, shard, pos), self._record(shard, pos, row, skills), f"{self.spec.files[shard]}:{pos}"

    def read_at(self, cursor: Cursor) -> IndexedRecord:
        _, shard, pos = cursor
        _, index, skills, _ = self._packing_index(shard)
        return self._record(shard, pos, index[pos].tolist(), skills)

    def _record(self, shard: int, pos: int, row: list[int], skills: list[str]) -> IndexedRecord:
        return IndexedRecord(row, skills[row[SKILL]], functools.partial(self._document, shard, pos))

    def _packing_index(self, shard: int) -> tuple:
        if self._index is None or self._index[0] != shard:
            skills = self._shards[shard]["skills"]
            # a skill the shard lacks gets a code no row has
            code = None if self.skill is None else (skills.index(self.skill) if self.skill in skills else -1)
            self._index = (shard, open_packing_index(self.spec.index, self._shards[shard]), skills, code)
        return self._index

    def _document(self, shard: int, pos: int) -> IndexedDocument:
        """The stored document: [id, source, skill, each molecule's atoms, each molecule's bonds] from its
        metadata, then its ids and graphs; copies, since a shard's memory maps close when it leaves
        the open shards."""
        tokens, docs, graphs = self._datasets(shard)
        # str: json.loads would first sniff the bytes' encoding
        doc_id, source, skill, atoms, bonds = json.loads(docs[pos].tobytes().decode())
        packed = graphs[pos].copy() if atoms else NO_GRAPHS
        return IndexedDocument(doc_id, source, skill, tokens[pos].astype(np.int64), tuple(atoms), tuple(bonds), packed)

    def _datasets(self, shard: int) -> tuple:
        if shard in self._open:
            self._open.move_to_end(shard)
        else:
            self._open[shard] = open_shard(self.spec.index, self._shards[shard])
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[shard]
