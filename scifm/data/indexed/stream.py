"""An indexed source read as a resumable stream, with DocumentStream's interface (the loader uses either).

The cursor is (epoch, shard index, index of the next document in the shard), so a resumed run reads
its next document directly. The stream turns a shard's packing index, 65,536 rows at a time, into
each document's laid-out length under the run's encoders, or a mark for a document of another split
(by the hash of the id, as for JSONL) or skill (with skills balanced), which it passes over, or one
refused by a length limit, which it yields as the error its JSONL line gets (reading that document
alone). Every other document is yielded as an IndexedLayout, read only where it is needed. A resumed
stream checks that the cursor's shard is still the one it read: the checkpoint keeps the sidecar's
digest of it (the loader also keeps every shard's size).
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np

from scifm.core.encoders_config import EncodersConfig
from scifm.core.errors import DataError, DocumentFormatError
from scifm.data.documents import SPLITS
from scifm.data.indexed.files import open_packing_index, open_shard, read_sidecar
from scifm.data.indexed.graphs import DTYPE
from scifm.data.indexed.layout import IndexedDocument
from scifm.data.indexed.packing_index import (FIGURES, ITEM_COUNTS, MOLECULES, REFUSED, SKILL, SPLIT, TABLES, IndexedLayout,
                                              laid_out_lengths)
from scifm.data.streams import Cursor, SourceSpec, changed

NO_GRAPHS = np.empty(0, DTYPE)  # a document without molecules: its graphs are not read
OTHER = -2  # the laid-out length of a document another stream reads (another split or skill)
BLOCK_BITS = 16  # rows measured at once: 65,536, a few ms of numpy
BLOCK_MASK = (1 << BLOCK_BITS) - 1
# shards kept open: a batch's documents span the one the stream is in and, just after it moved on,
# the one before (a layout holds its shard, so one still in a batch stays readable regardless)
OPEN_SHARDS = 2


class OpenShard:
    """One shard of an indexed dataset as a stream reads it: its documents' laid-out lengths and skills,
    measured a block of rows at a time (the memory stays bounded by the block, however large the
    shard), and its documents themselves, read one at a time."""

    def __init__(self, sidecar, shard: dict, split: str, skill: str | None, tokenizer, enc_cfg: EncodersConfig):
        self.tokenizer, self.enc_cfg = tokenizer, enc_cfg
        self._sidecar, self._shard = sidecar, shard
        self.index = open_packing_index(sidecar, shard)
        self._skills: list[str] = shard["skills"]
        self._skill_array = np.array(self._skills, dtype=object)  # codes -> names, many at once
        self._split_code = SPLITS.index(split)
        # a skill the shard lacks gets a code no row has
        self._skill_code = None if skill is None else (self._skills.index(skill) if skill in self._skills else -1)
        self._block = -1
        self._lengths: list[int] = []  # the current block's, as Python ints: read once per document
        self._skill_names: list[str] = []
        # the same block as arrays, for documents taken many at a time (ahead): lengths, skill codes,
        # and the offsets of the documents the stream yields (not OTHER)
        self._block_lengths = self._block_skills = self._yielded = np.empty(0, np.int64)
        self._datasets: tuple | None = None  # opened on the first read: a rank may read none of a shard

    def layout(self, pos: int) -> IndexedLayout | int:
        """The document at `pos` as packing sees it, or OTHER or REFUSED."""
        if pos >> BLOCK_BITS != self._block:
            self._measure_block(pos >> BLOCK_BITS)
        n_ids = self._lengths[pos & BLOCK_MASK]
        return IndexedLayout(self, pos, self._skill_names[pos & BLOCK_MASK], n_ids) if n_ids >= 0 else n_ids

    def _measure_block(self, block: int) -> None:
        rows = self.index[block << BLOCK_BITS : (block + 1) << BLOCK_BITS]
        lengths = laid_out_lengths(rows, self.enc_cfg)
        other = rows[:, SPLIT] != self._split_code
        if self._skill_code is not None:
            other |= rows[:, SKILL] != self._skill_code
        lengths[other] = OTHER
        self._block, self._lengths = block, lengths.tolist()
        self._skill_names = [self._skills[code] for code in rows[:, SKILL].tolist()]
        self._block_lengths, self._block_skills = lengths, rows[:, SKILL]
        self._yielded = np.flatnonzero(lengths != OTHER)

    def ahead(self, pos: int, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Up to `limit` documents a stream yields from `pos` on, to the end of pos's block: their
        positions, laid-out lengths (REFUSED marks) and skill codes, and the shard's names of the codes
        (an object array); None where none are left."""
        if pos >> BLOCK_BITS != self._block:
            self._measure_block(pos >> BLOCK_BITS)
        start = self._block << BLOCK_BITS
        first = int(np.searchsorted(self._yielded, pos - start))
        offsets = self._yielded[first : first + limit]
        if not len(offsets):
            return None
        return start + offsets, self._block_lengths[offsets], self._block_skills[offsets], self._skill_array

    def document(self, pos: int) -> IndexedDocument:
        """Its ids (an int64 copy); for a document with molecules their atom and bond counts (from its
        metadata) and packed graphs, and for one with tables or figures their payloads (views of the
        map: a layout holds its shard, so the map stays open while the document is in use, and
        featurizing copies them)."""
        tokens, _, graphs, payloads = self._datasets or self._open()
        molecules, tables, figures = self.index[pos, [MOLECULES, TABLES, FIGURES]].tolist()
        atoms, bonds = self._metadata(pos)[3:] if molecules else ((), ())
        return IndexedDocument(tokens[pos].astype(np.int64), tuple(atoms), tuple(bonds),
                               graphs[pos] if molecules else NO_GRAPHS, payloads[pos] if tables or figures else ())

    def prose_only(self, pos: int) -> bool:
        """Whether the document holds no stored item (its packing index row counts none of any kind)."""
        return not any(self.index[pos, ITEM_COUNTS].tolist())  # one read of the row's counts

    def stored_ids(self, pos: int) -> np.ndarray:
        """Its stored ids as the shard holds them (a read-only view of the map, in the stored dtype)."""
        return (self._datasets or self._open())[0][pos]

    def document_id(self, pos: int) -> str:
        return self._metadata(pos)[0]

    def refusal(self, pos: int) -> DocumentFormatError:
        """The error encode_document raises for the document's JSONL line (its first item over a limit)."""
        try:
            self.document(pos).measure(self.tokenizer, self.enc_cfg)
        except DocumentFormatError as err:
            return err
        raise AssertionError(f"{self.document_id(pos)}: its packing index refuses it, its stored ids do not")

    def _metadata(self, pos: int) -> list:
        """[id, source, skill, each molecule's atoms, each molecule's bonds]"""
        docs = (self._datasets or self._open())[1]
        return json.loads(docs[pos].tobytes().decode())  # str: json.loads would first sniff the bytes' encoding

    def _open(self) -> tuple:
        self._datasets = open_shard(self._sidecar, self._shard)
        return self._datasets


class IndexedStream:
    def __init__(self, spec: SourceSpec, split: str, skill: str | None, tokenizer, enc_cfg: EncodersConfig):
        self.spec, self.split, self.skill = spec, split, skill
        self._tokenizer, self._enc_cfg = tokenizer, enc_cfg
        sidecar = read_sidecar(spec.index)
        self._shards: list[dict] = sidecar["shards"]
        counts: dict[str, int] = sidecar["skills"][split]
        self._matching = counts.get(skill, 0) if skill is not None else sum(counts.values())
        self.cursor: Cursor = (0, 0, 0)
        self._open: OrderedDict[int, OpenShard] = OrderedDict()

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

    def next(self) -> tuple[Cursor, IndexedLayout | DocumentFormatError, str | None]:
        """The next document of this split (and skill), or the error of one a length limit refuses."""
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
            opened = self._open.get(shard) or self._shard(shard)  # (the stream moves forward: the newest)
            layout = opened.layout(pos)
            if isinstance(layout, IndexedLayout):
                return (epoch, shard, pos), layout, None
            if layout == REFUSED:  # named by its id, as the skip of its JSONL line is
                return (epoch, shard, pos), opened.refusal(pos), opened.document_id(pos)

    def ahead(self, limit: int) -> list[tuple]:
        """Up to `limit` documents next() would yield next, without moving the cursor, in segments of
        one block each (across blocks, shards and epochs, as next() walks): (epoch, shard, its
        OpenShard, positions, laid-out lengths with REFUSED marks, skill codes, the codes' names)."""
        segments: list[tuple] = []
        if not self._matching:
            return segments  # next() names the error
        epoch, shard, pos = self.cursor
        while limit > 0:
            documents = self._shards[shard]["documents"]
            if pos == documents:  # where next() moves on
                epoch, shard, pos = (epoch, shard + 1, 0) if shard + 1 < len(self._shards) else (epoch + 1, 0, 0)
                continue
            opened = self._open.get(shard) or self._shard(shard)
            found = opened.ahead(pos, limit)
            if found is not None:
                segments.append((epoch, shard, opened, *found))
                limit -= len(found[0])
            pos = min(((pos >> BLOCK_BITS) + 1) << BLOCK_BITS, documents)  # found holds its block's rest
        return segments

    def refused(self, cursor: Cursor) -> tuple[DocumentFormatError, str]:
        """The error and id of the document at `cursor`, which its packing index refuses."""
        opened = self._shard(cursor[1])
        return opened.refusal(cursor[2]), opened.document_id(cursor[2])

    def document_id(self, cursor: Cursor) -> str:
        return self._shard(cursor[1]).document_id(cursor[2])

    def read_at(self, cursor: Cursor) -> IndexedLayout:
        """The document at `cursor`, which the stream yielded before (a checkpoint's partly emitted one)."""
        _, shard, pos = cursor
        return self._shard(shard).layout(pos)

    def _shard(self, shard: int) -> OpenShard:
        if shard in self._open:
            self._open.move_to_end(shard)
        else:
            self._open[shard] = OpenShard(self.spec.index, self._shards[shard], self.split, self.skill,
                                          self._tokenizer, self._enc_cfg)
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[shard]
