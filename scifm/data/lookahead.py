"""One batch's mixture draws made at once, with the documents indexed streams would yield for them.

Every data-parallel rank packs every document of the global batch, so what packing spends on a
document it does not collate bounds how far a rank's work falls with dp. Drawing the batch's
uniforms in one call (the same values as one call per document) and taking, for each draw of an
indexed stream, the next document's position and laid-out length from the stream's measured block
(numpy over all the draws of a stream at once) leaves packing a loop over integers. Draws of a JSONL
stream, and of an indexed stream past the end of what its block holds, are read with the stream's
`next()`, as before. `commit()` leaves the generator and every cursor where drawing and reading one
document at a time would have: the draws not taken are given back (`advance` from the saved state),
and a cursor moves just past the last document taken.
"""

from __future__ import annotations

import bisect

import numpy as np

from scifm.data.indexed.stream import IndexedStream

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
        # stream index -> (epoch, shard, OpenShard, the draws given its documents, their positions)
        self.ahead: dict[int, tuple] = {}
        # per stream, where its looked-ahead documents are: (epoch, shard, OpenShard)
        self.where: list[tuple | None] = [None] * len(streams)
        if not draws:
            return
        stream_of = np.searchsorted(np.asarray(cdf), rng.random(draws), side="right")
        pos = np.full(draws, NOT_AHEAD, dtype=np.int64)
        n_ids = np.zeros(draws, dtype=np.int64)
        skills = np.empty(draws, dtype=object)
        for i, stream in enumerate(streams):
            if not isinstance(stream, IndexedStream):
                continue
            its_draws = np.flatnonzero(stream_of == i)
            found = stream.ahead(len(its_draws)) if len(its_draws) else None
            if found is None:
                continue
            epoch, shard, opened, positions, lengths, names = found
            its_draws = its_draws[: len(positions)]
            pos[its_draws], n_ids[its_draws], skills[its_draws] = positions, lengths, names
            self.ahead[i] = (epoch, shard, opened, its_draws, positions)
            self.where[i] = (epoch, shard, opened)
        self.stream_of, self.pos, self.n_ids = stream_of.tolist(), pos.tolist(), n_ids.tolist()
        self.skills = skills.tolist()

    def next(self) -> tuple[int, int, int, str | None]:
        """The next draw: (stream index, the position of its document or NOT_AHEAD, and for a position
        the document's laid-out length and skill)."""
        j = self.taken
        self.taken += 1
        if j < self.draws:
            i, pos = self.stream_of[j], self.pos[j]
            if pos == NOT_AHEAD:
                self._read_on(i)
            return i, pos, self.n_ids[j], self.skills[j]
        if j == self.draws and self.ahead:  # every document looked ahead was drawn: the streams read on
            for i in list(self.ahead):
                self._read_on(i)
        return bisect.bisect_right(self.cdf, self.rng.random()), NOT_AHEAD, 0, None

    def _read_on(self, i: int) -> None:
        """Stream i's next() reads from here: its cursor goes past every document looked ahead for it
        (all were drawn: a draw left to next() follows them)."""
        if i in self.reading:
            return
        self.reading.add(i)
        if i in self.ahead:
            epoch, shard, _, _, positions = self.ahead[i]
            self.streams[i].cursor = (epoch, shard, int(positions[-1]) + 1)

    def commit(self) -> None:
        if self.taken <= self.draws:
            self.rng.bit_generator.state = self.saved
            self.rng.bit_generator.advance(self.taken)
        for i, (epoch, shard, _, its_draws, positions) in self.ahead.items():
            if i in self.reading:
                continue
            taken = int(np.searchsorted(its_draws, self.taken))
            if taken:
                self.streams[i].cursor = (epoch, shard, int(positions[taken - 1]) + 1)
