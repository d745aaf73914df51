"""One batch's mixture draws made at once, with the documents indexed streams would yield for them.

Every data-parallel rank packs every document of the global batch, so what packing spends on a
document it does not collate bounds how far a rank's work falls with dp. Drawing the batch's
uniforms in one call (the same values as one call per document) and taking, for each draw of an
indexed stream, the next document's place and laid-out length from the stream's measured blocks
(numpy over all the draws of a stream at once, across blocks, shards and epochs) leaves packing a loop
over integers, or none: rows a rank does not keep are packed many documents at once from these
arrays (PackedLoader._pass_rows). Draws of a JSONL stream, and those past the draws made ahead, are
read with the stream's `next()`, as before. `commit()` leaves the generator and every cursor where
drawing and reading one document at a time would have: the draws not taken are given back
(`advance` from the saved state), and a cursor moves just past the last document taken.
"""

from __future__ import annotations

import bisect

import numpy as np

from scifm.data.indexed.packing_index import REFUSED
from scifm.data.indexed.stream import IndexedStream
from scifm.data.packing import fits_a_row

NOT_AHEAD = -1  # a draw whose document the stream's next() reads
# below about this many draws a batch, the few numpy calls per stream cost more than they save:
# the batch is drawn one document at a time (paper-length documents, a dozen a batch)
MIN_DRAWS = 128


class Lookahead:
    def __init__(self, rng: np.random.Generator, cdf: list[float], streams: list, draws: int):
        draws = draws if draws >= MIN_DRAWS else 0
        self.rng, self.cdf, self.streams, self.draws = rng, cdf, streams, draws
        self.saved = rng.bit_generator.state
        self.taken = 0
        self.reading: set[int] = set()  # indexed streams read on with next(), their cursors moved already
        # where looked-ahead documents are, one block's segment each: (epoch, shard, OpenShard)
        self.places: list[tuple] = []
        # stream index -> (the draws given its documents, their segments, their positions)
        self.ahead: dict[int, tuple] = {}
        if not draws:
            return
        stream_of = np.searchsorted(np.asarray(cdf), rng.random(draws), side="right")
        pos = np.full(draws, NOT_AHEAD, dtype=np.int64)
        n_ids = np.zeros(draws, dtype=np.int64)
        segment = np.full(draws, -1, dtype=np.int64)
        # skills as codes into skill_names, which holds every looked-ahead segment's names in turn
        skill_codes = np.zeros(draws, dtype=np.int64)
        names: list[np.ndarray] = [np.array([None], dtype=object)]  # code 0: no document ahead
        n_names = 1
        for i, stream in enumerate(streams):
            if not isinstance(stream, IndexedStream):
                continue
            its_draws = np.flatnonzero(stream_of == i)
            found = stream.ahead(len(its_draws)) if len(its_draws) else []
            taken = 0
            for epoch, shard, opened, positions, lengths, codes, shard_names in found:
                mine = its_draws[taken : taken + len(positions)]
                pos[mine], n_ids[mine], skill_codes[mine] = positions, lengths, codes + n_names
                segment[mine] = len(self.places)
                self.places.append((epoch, shard, opened))
                names.append(shard_names)
                n_names += len(shard_names)
                taken += len(positions)
            if taken:
                its_draws = its_draws[:taken]
                self.ahead[i] = (its_draws, segment[its_draws], pos[its_draws])
        self.skill_names = np.concatenate(names)
        self.arrays = stream_of, pos, n_ids, skill_codes  # for rows packed many documents at once
        self.stream_of, self.pos, self.n_ids = stream_of.tolist(), pos.tolist(), n_ids.tolist()
        self.segment = segment.tolist()
        self.skills = self.skill_names[skill_codes].tolist()
        self._breaks: np.ndarray | None = None

    def fitting_run(self, seq_len: int) -> int:
        """Where the run of draws from `taken` on ends that are looked-ahead documents which each fit a
        row of seq_len (not refused, not cut): the first later draw that is not, or `draws`."""
        if self.taken >= self.draws:
            return self.taken
        if self._breaks is None:
            _, pos, n_ids, _ = self.arrays
            self._breaks = np.flatnonzero((pos == NOT_AHEAD) | (n_ids == REFUSED) | ~fits_a_row(n_ids, seq_len))
        k = int(np.searchsorted(self._breaks, self.taken))
        return int(self._breaks[k]) if k < len(self._breaks) else self.draws

    def place(self, j: int) -> tuple:
        """Draw j's looked-ahead document: (epoch, shard, OpenShard, position)."""
        return (*self.places[self.segment[j]], self.pos[j])

    def next(self) -> tuple[int, tuple | None, int, str | None]:
        """The next draw: (stream index, where its document is, (epoch, shard, OpenShard, position), or
        None where the stream's next() reads it, and for a place the document's laid-out length and
        skill)."""
        j = self.taken
        self.taken += 1
        if j < self.draws:
            i = self.stream_of[j]
            if self.pos[j] == NOT_AHEAD:
                self._read_on(i)
                return i, None, 0, None
            return i, self.place(j), self.n_ids[j], self.skills[j]
        if j == self.draws and self.ahead:  # every document looked ahead was drawn: the streams read on
            for i in list(self.ahead):
                self._read_on(i)
        return bisect.bisect_right(self.cdf, self.rng.random()), None, 0, None

    def _after(self, i: int, k: int) -> None:
        """Stream i's cursor just past its k-th looked-ahead document."""
        _, segments, positions = self.ahead[i]
        epoch, shard, _ = self.places[segments[k]]
        self.streams[i].cursor = (epoch, shard, int(positions[k]) + 1)

    def _read_on(self, i: int) -> None:
        """Stream i's next() reads from here: its cursor goes past every document looked ahead for it
        (all were drawn: a draw left to next() follows them)."""
        if i in self.reading:
            return
        self.reading.add(i)
        if i in self.ahead:
            self._after(i, -1)

    def commit(self) -> None:
        if self.taken <= self.draws:
            self.rng.bit_generator.state = self.saved
            self.rng.bit_generator.advance(self.taken)
        for i, (its_draws, _, _) in self.ahead.items():
            if i in self.reading:
                continue
            taken = int(np.searchsorted(its_draws, self.taken))
            if taken:
                self._after(i, taken - 1)
