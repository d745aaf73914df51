"""Deterministic, resumable loader of packed batches from a mixture of streamed sources.

Every data-parallel rank runs the same global sequence of rows (seeded mixture draws, streamed
documents, greedy packing) and keeps rows rank, rank + W, ...: the global batch is then the
same for every layout, which is what lets a parallel run equal the single-process one. Packing
needs each document's length, where its items fall and whether they pass their checks (a bad one
skips the document), so every rank encodes and checks every document of a JSONL source; an indexed
one is measured and checked from its packing index row, and read only by a rank that collates a row
of it or cuts it across rows: a batch's draws are made at once and each indexed document is taken
from its stream's blocks as a position and a length (scifm.data.lookahead), so the rows a rank does
not keep are packed from integers, many documents at once (_pass_rows). The items' features, most
of the featurizing, are computed in collate_rows for the rank's own rows only, in order, by
data.featurize_threads threads where it is more than 1 (the same features, from the same items).
`state_dict()` holds the mixture RNG, each stream's cursor and the partly emitted document, so
a resumed run continues with exactly the next batch. It also holds what tells a changed source
file apart (each file's size, and the hash of what each stream read of its current file; for an
indexed source, the sidecar's digest of its current shard), so a resumed run that would read other
data stops with the file's name instead.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np

from scifm.data.config import DataConfig
from scifm.data.documents import Document
from scifm.data.encode import encode_document
from scifm.data.features import Prepared
from scifm.data.indexed.files import check_tokenizer
from scifm.data.indexed.packing_index import REFUSED, IndexedLayout
from scifm.data.lookahead import Lookahead
from scifm.data.mixture import stream_probabilities
from scifm.data.packing import (Batch, Chunk, Row, chunk_document, collate_rows, features_in_turn, fits_a_row,
                                placeholder_features)
from scifm.data.skips import SkipCounter
from scifm.data.streams import Cursor, SourceSpec, changed, open_stream, skill_counts
from scifm.core.errors import CheckpointError, ConfigError, DataError, DocumentFormatError
from scifm.core.encoders_config import EncodersConfig


class PackedLoader:
    def __init__(
        self,
        cfg: DataConfig,
        specs: list[SourceSpec],
        tokenizer,
        enc_cfg: EncodersConfig,
        *,
        split: str,
        batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if batch_size % dp_size:
            raise ConfigError(f"trainer.batch_size: {batch_size} is not divisible by {dp_size} data-parallel ranks")
        self.cfg, self.tokenizer, self.enc_cfg = cfg, tokenizer, enc_cfg
        self.split, self.batch_size = split, batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.specs = specs
        for spec in specs:
            if spec.index is not None:
                check_tokenizer(spec.index, tokenizer)
        skills = [skill_counts(s, split) for s in specs] if cfg.balance_skills else None
        self.probs, layout = stream_probabilities([s.weight for s in specs], cfg.temperature, skills)
        if not layout:
            raise DataError(f"no source has documents in the {split} split ("
                            + ", ".join(f"'{s.name}'" for s in specs) + "); add documents to data.sources")
        self.streams = [open_stream(specs[i], split, skill, skills[i] if skills else None, tokenizer, enc_cfg)
                        for i, skill in layout]
        # Generator.choice(p=probs) draws one uniform and finds it in this normalised cumulative sum;
        # the same in Python, without choice's per-call checks, which cost more than the rest of a draw
        cdf = np.cumsum(self.probs)
        self.cdf = (cdf / cdf[-1]).tolist()
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.skips = SkipCounter(cfg.max_bad_fraction, split=split)
        self.tokens_by_source: dict[str, int] = defaultdict(int)
        self.tokens_by_skill: dict[str, int] = defaultdict(int)
        # the document being emitted: (stream index, its cursor, next chunk index) and its chunks
        self.pending: tuple[int, tuple, int] | None = None
        self.pending_chunks: list[Chunk] = []
        # or, for an indexed document that fits a row, what makes its layout: (OpenShard, position,
        # skill, laid-out length)
        self.pending_fit: tuple | None = None
        self.draws_ahead = 64  # the mixture's draws a batch makes at once (scifm.data.lookahead)
        self.placeholders = placeholder_features(tokenizer, enc_cfg)
        self._featurizer: ThreadPoolExecutor | None = None  # made by the first batch that uses it

    # --- documents -> chunks ------------------------------------------------------------------
    def _encode(self, doc: Document | IndexedLayout, stream, cursor: Cursor) -> list[Chunk]:
        if isinstance(doc, IndexedLayout):  # measured by its stream; read where needed
            return chunk_document(doc, self.cfg.seq_len)
        # figure paths are relative to the document's file
        file = stream.spec.files[cursor[1]]
        return chunk_document(encode_document(doc, self.tokenizer, self.enc_cfg, file.parent), self.cfg.seq_len)

    def _next_document(self, look: Lookahead) -> None:
        """The next document the mixture draws that is not skipped becomes the pending one: an indexed
        document that fits a row by its length alone (pending_fit: nothing of it is read or laid out
        unless a kept row takes it), any other as its chunks."""
        while True:
            i, place, n_ids, skill = look.next()
            stream = self.streams[i]
            source = stream.spec.name
            if place is not None:
                epoch, shard, opened, pos = place
                cursor = (epoch, shard, pos)
                if n_ids == REFUSED:  # named by its id, as the skip of its JSONL line is
                    err, doc_id = stream.refused(cursor)
                    self.skips.skip(source, err.reason, doc_id)
                    continue
                if fits_a_row(n_ids, self.cfg.seq_len):
                    self.skips.ok(source)
                    self.pending, self.pending_fit = (i, cursor, 0), (opened, pos, skill, n_ids)
                    return
                doc = IndexedLayout(opened, pos, skill, n_ids)
            else:
                cursor, doc, where = stream.next()
                if isinstance(doc, DocumentFormatError):
                    self.skips.skip(source, doc.reason, where)
                    continue
            try:
                chunks = self._encode(doc, stream, cursor)
            except DocumentFormatError as err:
                doc_id = doc.id if isinstance(doc, Document) else stream.document_id(cursor)
                self.skips.skip(source, err.reason, doc_id)
                continue
            self.skips.ok(source)
            self.pending, self.pending_chunks, self.pending_fit = (i, cursor, 0), chunks, None
            return

    # --- chunks -> rows -> batches --------------------------------------------------------------
    def _pack(self, keep: list[bool]) -> list[Row]:
        """The global batch's rows, packed greedily (a chunk that does not fit the rest of a row starts
        the next one), and returned for the rows `keep` marks. Every rank runs this over every document
        of the global batch, so a row it does not keep is packed from lengths alone."""
        look = Lookahead(self.rng, self.cdf, self.streams, self.draws_ahead)
        try:
            kept = self._fill_rows(look, keep)
        finally:  # after an error (a bad-document budget passed) the state is that of the draws taken
            look.commit()
        # about as many draws as this batch took, so the next one rarely draws one at a time
        self.draws_ahead = look.taken + look.taken // 4 + 16
        return kept

    def _fill_rows(self, look: Lookahead, keep: list[bool]) -> list[Row]:
        kept: list[Row] = []
        r = 0
        while r < self.batch_size:
            if keep[r]:
                kept.append(self._fill_row(look, Row()))
                r += 1
                continue
            others = next((n for n, k in enumerate(keep[r:]) if k), self.batch_size - r)
            passed = self._pass_rows(look, others)
            if passed < others:  # the run of documents packed at once ended inside a row
                self._fill_row(look, None)
                passed += 1
            r += passed
        return kept

    def _fill_row(self, look: Lookahead, row: Row | None) -> Row | None:
        """One row, filled from the pending document on; None (a row this rank does not keep) counts
        its tokens and lays nothing out."""
        seq_len, used = self.cfg.seq_len, 0
        while True:
            if self.pending is None:
                self._next_document(look)
            i, cursor, k = self.pending
            fit = self.pending_fit
            if fit is None:
                chunk = self.pending_chunks[k]
                length, skill, last = chunk.length, chunk.doc.skill, k + 1 == len(self.pending_chunks)
            else:
                chunk, length, skill, last = None, fit[3] - 1, fit[2], True
            if used + length > seq_len and used:
                return row  # the chunk starts the next row
            source = self.streams[i].spec.name
            if row is not None:
                if chunk is None:
                    chunk = Chunk(IndexedLayout(*fit), 0, length)
                row.chunks.append(chunk)
                row.sources.append(source)
            self.tokens_by_source[source] += length
            self.tokens_by_skill[skill] += length
            used += length
            if last:
                self.pending = self.pending_fit = None
            else:
                self.pending = (i, cursor, k + 1)
            if used == seq_len:
                return row

    def _pass_rows(self, look: Lookahead, n_rows: int) -> int:
        """Up to n_rows rows this rank does not keep, packed at once from the look-ahead's arrays while
        its draws are indexed documents that each fit a row. A row ends where the next document would
        pass seq_len, found in the prefix sums of their lengths; the counts, cursors and pending
        document end as _fill_row, a document at a time, leaves them. Returns the rows packed: it
        stops before a row that the run of such documents does not finish."""
        # the pending document, drawn before, comes first: its (length, skill), if one chunk of it is left
        if self.pending is None:
            pending = None
        elif self.pending_fit is not None:
            pending = self.pending_fit[3] - 1, self.pending_fit[2]
        elif self.pending[2] + 1 == len(self.pending_chunks):
            pending = self.pending_chunks[-1].length, self.pending_chunks[-1].doc.skill
        else:
            return 0  # a cut document with more than one chunk to go
        seq_len, start = self.cfg.seq_len, look.taken
        end = look.fitting_run(seq_len)
        if end == start:
            return 0
        stream_of, _, n_ids, skill_codes = look.arrays
        head = 0 if pending is None else 1
        lengths = n_ids[start:end] - 1
        if head:
            lengths = np.concatenate(([pending[0]], lengths))
        ends = np.concatenate(([0], np.cumsum(lengths)))  # ends[d]: tokens of documents 0..d-1
        first, rows, exact = 0, 0, True  # the row's first document; rows done; whether the last closed at seq_len
        while rows < n_rows:
            target = ends[first] + seq_len
            d = int(np.searchsorted(ends, target))
            if d == len(ends):
                break  # the run's documents do not fill this row
            exact = bool(ends[d] == target)
            first = d if exact else d - 1  # a document that would pass seq_len starts the next row
            rows += 1
        if not rows:
            return 0
        # documents first.. are not in the rows; the first of them was drawn unless the last row was exact
        placed, drawn = first - head, first - head + (0 if exact else 1)
        if head:
            self.tokens_by_source[self.streams[self.pending[0]].spec.name] += pending[0]
            self.tokens_by_skill[pending[1]] += pending[0]
        new = slice(start, start + placed)
        by_stream = np.bincount(stream_of[new], weights=lengths[head:first], minlength=len(self.streams))
        by_skill = np.bincount(skill_codes[new], weights=lengths[head:first], minlength=len(look.skill_names))
        for i in np.flatnonzero(by_stream).tolist():
            self.tokens_by_source[self.streams[i].spec.name] += int(by_stream[i])
        for code in np.flatnonzero(by_skill).tolist():
            self.tokens_by_skill[look.skill_names[code]] += int(by_skill[code])
        seen = np.bincount(stream_of[start : start + drawn], minlength=len(self.streams))
        for i in np.flatnonzero(seen).tolist():
            self.skips.ok(self.streams[i].spec.name, int(seen[i]))
        look.taken += drawn
        self.pending = self.pending_fit = None
        if not exact:
            j = start + drawn - 1
            epoch, shard, opened, pos = look.place(j)
            self.pending = (look.stream_of[j], (epoch, shard, pos), 0)
            self.pending_fit = (opened, pos, look.skills[j], look.n_ids[j])
        return rows

    def next_rows(self, keep: list[bool] | None = None) -> list[Row]:
        """The global batch's rows, packed: the same on every rank, whatever the layout; those `keep`
        marks (default all), the others packed from lengths alone."""
        return self._pack([True] * self.batch_size if keep is None else keep)

    def next_batch(self) -> Batch:
        """Every rank packs the global rows; only its own are laid out, and their items featurized in
        collate_rows."""
        mine = self.next_rows([r % self.dp_size == self.dp_rank for r in range(self.batch_size)])
        return collate_rows(mine, self.cfg.seq_len, self.tokenizer, self.placeholders, self._featurize)

    def _featurize(self, prepared: list[Prepared]) -> Iterable[dict]:
        """The items' features in order: on this thread, or over data.featurize_threads threads."""
        if self.cfg.featurize_threads == 1:
            return features_in_turn(prepared)
        if self._featurizer is None:
            self._featurizer = ThreadPoolExecutor(self.cfg.featurize_threads, thread_name_prefix="scifm-featurize")
        return self._featurizer.map(Prepared.features, prepared)

    def close(self) -> None:
        """Stops the featurizing threads, if any (scifm.data.prefetch's loader also has a worker to stop)."""
        if self._featurizer is not None:
            self._featurizer.shutdown(cancel_futures=True)
            self._featurizer = None

    # --- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**self.position_state(), "files": source_file_sizes(self.specs)}

    def position_state(self) -> dict:
        """state_dict() without the source files' sizes, which describe the files rather than how far
        the loader read them (a prefetching worker sends this with every batch; see scifm.data.prefetch)."""
        return {
            "rng": self.rng.bit_generator.state,
            "cursors": [list(s.cursor) for s in self.streams],
            "prefix_sha256": [s.prefix_sha256() for s in self.streams],
            "pending": [self.pending[0], list(self.pending[1]), self.pending[2]] if self.pending else None,
            "skips": self.skips.state_dict(),
            "tokens_by_source": dict(self.tokens_by_source),
            "tokens_by_skill": dict(self.tokens_by_skill),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["cursors"]) != len(self.streams):
            raise CheckpointError(
                f"the checkpoint's loader had {len(state['cursors'])} streams, this config has "
                f"{len(self.streams)}: data.sources or data.balance_skills changed"
            )
        self._check_files(state.get("files", {}))  # absent in loader states written before it
        self.rng.bit_generator.state = state["rng"]
        hashes = state.get("prefix_sha256") or [None] * len(self.streams)
        for stream, cursor, sha in zip(self.streams, state["cursors"], hashes):
            stream.seek(tuple(cursor), sha)
        self.skips.load_state_dict(state["skips"])
        self.tokens_by_source = defaultdict(int, state["tokens_by_source"])
        self.tokens_by_skill = defaultdict(int, state["tokens_by_skill"])
        self.pending, self.pending_chunks, self.pending_fit = None, [], None
        if state["pending"] is not None:
            i, cursor, k = state["pending"]
            stream = self.streams[i]
            doc = stream.read_at(tuple(cursor))
            self.pending, self.pending_chunks = (i, tuple(cursor), k), self._encode(doc, stream, tuple(cursor))

    def _check_files(self, saved: dict[str, list]) -> None:
        """Each source's files as the checkpoint saw them: same count and size.

        Sizes are free to read and catch appends, truncation and most edits of any file, so the
        mixture reads the same data again; an edit that keeps a size is caught, where it would move
        a cursor, by the stream's hash of the lines before it. Paths may differ (a moved corpus),
        so files are matched by position.
        """
        for spec in self.specs:
            if spec.name not in saved:
                continue
            before = saved[spec.name]
            if len(before) != len(spec.files):
                raise DataError(f"source '{spec.name}' has {len(spec.files)} files now, {len(before)} at the "
                                f"checkpoint: its files changed since the checkpoint; restore them or start a new run")
            for path, (_, size) in zip(spec.files, before):
                now = path.stat().st_size
                if now != size:
                    raise changed(path, f"{size} bytes then, {now} now")


def source_file_sizes(specs: list[SourceSpec]) -> dict[str, list]:
    """Each source's files with their sizes, as a loader state saves them (PackedLoader._check_files)."""
    return {spec.name: [[str(f), f.stat().st_size] for f in spec.files] for spec in specs}
