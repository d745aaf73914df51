"""Deterministic, resumable loader of packed batches from a mixture of streamed sources.

Every data-parallel rank runs the same global sequence of rows (seeded mixture draws, streamed
documents, greedy packing) and keeps rows rank, rank + W, ...: the global batch is then the
same for every layout, which is what lets a parallel run equal the single-process one. Packing
needs each document's length, where its items fall and whether they pass their checks (a bad one
skips the document), so every rank encodes and checks every document of a JSONL source; an indexed
one is measured and checked from its packing index row, and read only by a rank that collates a row
of it or cuts it across rows. The items' features, most of the featurizing, are computed in
collate_rows for the rank's own rows only.
`state_dict()` holds the mixture RNG, each stream's cursor and the partly emitted document, so
a resumed run continues with exactly the next batch. It also holds what tells a changed source
file apart (each file's size, and the hash of what each stream read of its current file; for an
indexed source, the sidecar's digest of its current shard), so a resumed run that would read other
data stops with the file's name instead.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from pathlib import Path

import numpy as np

from scifm.data.config import DataConfig
from scifm.data.documents import Document
from scifm.data.encode import encode_document
from scifm.data.indexed.files import check_tokenizer
from scifm.data.indexed.packing_index import IndexedLayout
from scifm.data.mixture import stream_probabilities
from scifm.data.packing import Batch, Chunk, Row, chunk_document, collate_rows, placeholder_features
from scifm.data.skips import SkipCounter
from scifm.data.streams import SourceSpec, changed, open_stream, skill_counts
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
        self.placeholders = placeholder_features(tokenizer, enc_cfg)

    # --- documents -> chunks ------------------------------------------------------------------
    def _encode(self, doc: Document | IndexedLayout, file: Path) -> list[Chunk]:
        if isinstance(doc, IndexedLayout):  # measured by its stream; read where needed
            return chunk_document(doc, self.cfg.seq_len)
        # figure paths are relative to the document's file
        return chunk_document(encode_document(doc, self.tokenizer, self.enc_cfg, file.parent), self.cfg.seq_len)

    def _next_document(self) -> None:
        while True:
            i = bisect.bisect_right(self.cdf, self.rng.random())
            stream = self.streams[i]
            cursor, doc, where = stream.next()
            source = stream.spec.name
            if isinstance(doc, DocumentFormatError):
                self.skips.skip(source, doc.reason, where)
                continue
            try:
                chunks = self._encode(doc, stream.spec.files[cursor[1]])
            except DocumentFormatError as err:
                self.skips.skip(source, err.reason, doc.id)
                continue
            self.skips.ok(source)
            self.pending, self.pending_chunks = (i, cursor, 0), chunks
            return

    # --- chunks -> rows -> batches --------------------------------------------------------------
    def _next_row(self) -> Row:
        """Chunks in order until the next one does not fit. Run for every document of the global batch
        on every rank, so the pending document's chunks are stepped through inline."""
        seq_len, streams = self.cfg.seq_len, self.streams
        row, used = Row(), 0
        while True:
            if self.pending is None:
                self._next_document()
            i, cursor, k = self.pending
            chunk = self.pending_chunks[k]
            if used + chunk.length > seq_len and row.chunks:
                return row
            self.pending = (i, cursor, k + 1) if k + 1 < len(self.pending_chunks) else None
            source = streams[i].spec.name
            self.tokens_by_source[source] += chunk.length
            row.chunks.append(chunk)
            row.sources.append(source)
            used += chunk.length
            self.tokens_by_skill[chunk.doc.skill] += chunk.length
            if used == seq_len:
                return row

    def next_rows(self) -> list[Row]:
        """The global batch's rows, packed: the same on every rank, whatever the layout."""
        return [self._next_row() for _ in range(self.batch_size)]

    def next_batch(self) -> Batch:
        """Every rank builds the global rows; only its own rows' items are featurized, in collate_rows."""
        mine = self.next_rows()[self.dp_rank :: self.dp_size]
        return collate_rows(mine, self.cfg.seq_len, self.tokenizer, self.placeholders)

    def close(self) -> None:
        """Nothing runs beside this loader (scifm.data.prefetch's loader has a worker to stop)."""

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
        self.pending, self.pending_chunks = None, []
        if state["pending"] is not None:
            i, cursor, k = state["pending"]
            stream = self.streams[i]
            doc = stream.read_at(tuple(cursor))
            self.pending, self.pending_chunks = (i, tuple(cursor), k), self._encode(doc, stream.spec.files[cursor[1]])

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
