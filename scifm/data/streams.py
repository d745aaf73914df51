"""Where documents come from: `data.sources` resolved to files, read as resumable streams.

A stream reads its files line by line (gzip too), never whole, keeps only documents of its
split (and skill, when skills are balanced), and cycles through epochs. Its cursor
(epoch, file index, line number) is all a resumed run needs to continue at the same document.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from scifm.data.config import DataConfig
from scifm.data.documents import Document, jsonl_files, open_text, parse_line, split_of
from scifm.core.errors import DataError, DocumentFormatError


Cursor = tuple[int, int, int]  # (epoch, file index, 1-based line number of the next line)


@dataclass(frozen=True)
class SourceSpec:
    name: str
    files: tuple[Path, ...]
    weight: float


def builtin_corpus_dir(cfg: DataConfig) -> Path:
    from scifm.data.corpus import build_corpus, default_corpus_dir

    out = Path(cfg.corpus_dir) if cfg.corpus_dir else default_corpus_dir()
    build_corpus(out, max_docs_per_source=cfg.corpus_max_docs_per_source or None)
    return out


def resolve_sources(cfg: DataConfig) -> list[SourceSpec]:
    """The built-in corpus expands to one source per built-in file, each with the given weight."""
    specs: list[SourceSpec] = []
    for src in cfg.sources:
        if src.path == "builtin":
            for f in jsonl_files(builtin_corpus_dir(cfg)):
                specs.append(SourceSpec(f.name.split(".")[0], (f,), src.weight))
        else:
            path = Path(src.path).expanduser()
            name = src.name or path.name.split(".")[0]
            specs.append(SourceSpec(name, tuple(jsonl_files(path)), src.weight))
    names = [s.name for s in specs]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise DataError(f"data.sources: source name {dup[0]!r} appears twice; give each a distinct 'name'")
    return specs


def skill_counts(spec: SourceSpec, split: str) -> Counter:
    """One streamed pass counting documents per skill (bad lines are left to the loader to count)."""
    counts: Counter = Counter()
    for f in spec.files:
        with open_text(f) as fh:
            for line in fh:
                try:
                    doc = parse_line(line)
                except DocumentFormatError:
                    continue
                if split_of(doc.id) == split:
                    counts[doc.skill] += 1
    return counts


class DocumentStream:
    """Endless stream of (cursor, document or format error, where) for one source and split."""

    def __init__(self, spec: SourceSpec, split: str, skill: str | None = None):
        self.spec = spec
        self.split = split
        self.skill = skill
        self.cursor: Cursor = (0, 0, 1)
        self._lines: Iterator[tuple[int, str]] | None = None
        self._matched_this_epoch = False

    def seek(self, cursor: Cursor) -> None:
        self.cursor = tuple(cursor)  # type: ignore[assignment]
        self._lines = None
        # resumed mid-epoch: the lines before the cursor may have matched
        self._matched_this_epoch = self.cursor[1:] != (0, 1)

    def _open(self) -> Iterator[tuple[int, str]]:
        _, file_idx, line_no = self.cursor
        fh = open_text(self.spec.files[file_idx])
        lines = enumerate(fh, 1)
        return itertools.islice(lines, line_no - 1, None)

    def next(self) -> tuple[Cursor, Document | DocumentFormatError, str]:
        """The next document of this split; a malformed line comes back as its error."""
        while True:
            if self._lines is None:
                self._lines = self._open()
            item = next(self._lines, None)
            if item is None:
                self._next_file()
                continue
            line_no, line = item
            here = self.cursor
            self.cursor = (here[0], here[1], line_no + 1)
            if not line.strip():
                continue
            where = f"{self.spec.files[here[1]]}:{line_no}"
            try:
                doc = parse_line(line)
            except DocumentFormatError as err:
                self._matched_this_epoch = True
                return here, err, where
            if split_of(doc.id) != self.split or (self.skill is not None and doc.skill != self.skill):
                continue
            self._matched_this_epoch = True
            return here, doc, where

    def _next_file(self) -> None:
        epoch, file_idx, _ = self.cursor
        self._lines = None
        if file_idx + 1 < len(self.spec.files):
            self.cursor = (epoch, file_idx + 1, 1)
            return
        # a whole epoch read from its first line without one match: the stream is empty
        if not self._matched_this_epoch:
            raise DataError(
                f"source '{self.spec.name}' has no documents in the {self.split} split"
                + (f" with skill '{self.skill}'" if self.skill else "")
                + f" ({self.spec.files[0]}); add documents or remove it from data.sources"
            )
        self.cursor = (epoch + 1, 0, 1)
        self._matched_this_epoch = False

    def read_at(self, cursor: Cursor) -> Document:
        """The document that starts at `cursor` (used to restore a partly emitted document)."""
        _, file_idx, line_no = cursor
        with open_text(self.spec.files[file_idx]) as fh:
            line = next(itertools.islice(fh, line_no - 1, None))
        return parse_line(line)
