"""An indexed source read as a resumable stream, with DocumentStream's interface (the loader uses either).

The cursor is (epoch, shard index, index of the next document in the shard), so a resumed run reads
its next document directly. Documents of other splits (by the hash of the id, as for JSONL) and,
with skills balanced, of other skills are passed over after reading their metadata alone. A resumed
stream checks that the cursor's shard is still the one it read: the checkpoint keeps the sidecar's
digest of it (the loader also keeps every shard's size).
"""

from __future__ import annotations

import json

import numpy as np

from scifm.core.errors import DataError
from scifm.data.documents import split_of
from scifm.data.indexed.files import open_shard, read_sidecar
from scifm.data.indexed.graphs import DTYPE
from scifm.data.indexed.layout import IndexedDocument
from scifm.data.streams import Cursor, SourceSpec, changed

NO_GRAPHS = np.empty(0, DTYPE)  # a document without molecules: its graphs are not read


class IndexedStream:
    def __init__(self, spec: SourceSpec, split: str, skill: str | None = None):
        self.spec, self.split, self.skill = spec, split, skill
        sidecar = read_sidecar(spec.index)
        self._shards: list[dict] = sidecar["shards"]
        counts: dict[str, int] = sidecar["skills"][split]
        self._matching = counts.get(skill, 0) if skill is not None else sum(counts.values())
        self.cursor: Cursor = (0, 0, 0)
        self._open: tuple | None = None  # (shard index, tokens, metadata, graphs)

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

    def next(self) -> tuple[Cursor, IndexedDocument, str]:
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
            meta = self._metadata(shard, pos)
            if split_of(meta[0]) == self.split and self.skill in (None, meta[2]):
                return (epoch, shard, pos), self._document(shard, pos, meta), f"{self.spec.files[shard]}:{pos}"

    def read_at(self, cursor: Cursor) -> IndexedDocument:
        _, shard, pos = cursor
        return self._document(shard, pos, self._metadata(shard, pos))

    def _metadata(self, shard: int, pos: int) -> list:
        """[id, source, skill, each molecule's atoms, each molecule's bonds]"""
        _, docs, _ = self._datasets(shard)
        return json.loads(docs[pos].tobytes().decode())  # str: json.loads would first sniff the bytes' encoding

    def _document(self, shard: int, pos: int, meta: list) -> IndexedDocument:
        doc_id, source, skill, atoms, bonds = meta
        # copies: the shard's memory maps close when the next shard opens
        tokens, _, graphs = self._datasets(shard)
        packed = graphs[pos].copy() if atoms else NO_GRAPHS
        return IndexedDocument(doc_id, source, skill, tokens[pos].astype(np.int64), tuple(atoms), tuple(bonds), packed)

    def _datasets(self, shard: int) -> tuple:
        if self._open is None or self._open[0] != shard:
            self._open = (shard, *open_shard(self.spec.index, self._shards[shard]))
        return self._open[1:]
