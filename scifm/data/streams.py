"""Where documents come from: `data.sources` resolved to files, read as resumable streams.

A stream reads its files line by line (gzip too), never whole, keeps only documents of its
split (and skill, when skills are balanced), and cycles through epochs. Its cursor
(epoch, file index, line number) is all a resumed run needs to continue at the same document;
with the hash of the lines before it, a resumed run also knows the file did not change.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from scifm.data.config import DataConfig
from scifm.data.documents import (DamagedFileError, Document, jsonl_files, parse_line, read_lines, record_keys,
                                  split_of, unit_hash)
from scifm.data.indexed.files import read_sidecar, shard_bins, sidecar_path
from scifm.core.encoders_config import EncodersConfig
from scifm.core.errors import DataError, DocumentFormatError


Cursor = tuple[int, int, int]  # (epoch, file index, 1-based line number of the next line)


@dataclass(frozen=True)
class SourceSpec:
    name: str
    files: tuple[Path, ...]  # JSONL files; for an indexed source, its shards' token .bin files
    weight: float
    index: Path | None = None  # an indexed source's sidecar (scifm.data.indexed); None for JSONL


def builtin_corpus_dir(cfg: DataConfig) -> Path:
    from scifm.data.corpus import build_corpus, default_corpus_dir

    out = Path(cfg.corpus_dir) if cfg.corpus_dir else default_corpus_dir()
    build_corpus(out, max_docs_per_source=cfg.corpus_max_docs_per_source or None)
    return out


def resolve_sources(cfg: DataConfig) -> list[SourceSpec]:
    """The built-in corpus expands to one source per built-in file, each with the given weight; an
    indexed source is its shards' token files and its sidecar."""
    specs: list[SourceSpec] = []
    for src in cfg.sources:
        if src.path == "builtin":
            for f in jsonl_files(builtin_corpus_dir(cfg)):
                specs.append(SourceSpec(f.name.split(".")[0], (f,), src.weight))
        elif src.kind == "indexed":
            prefix = Path(src.path).expanduser()
            sidecar = sidecar_path(prefix)
            specs.append(SourceSpec(src.name or prefix.name, shard_bins(sidecar), src.weight, sidecar))
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
    """One streamed pass counting documents per skill (bad lines are left to the loader to count);
    an indexed source's sidecar holds the counts."""
    if spec.index is not None:
        return Counter(read_sidecar(spec.index)["skills"][split])
    counts: Counter = Counter()
    for f in spec.files:
        try:
            for _, raw in read_lines(f):
                try:
                    doc = parse_line(raw)
                except DocumentFormatError:
                    continue
                if split_of(doc.id) == split:
                    counts[doc.skill] += 1
        except DamagedFileError as err:  # its good lines are counted; the streams count the damage
            report_damaged(err)
    return counts


_reported: set[Path] = set()


def report_damaged(err: DamagedFileError) -> None:
    """One line on stderr per damaged file and process: the skip counts say how often, this says where."""
    if err.path not in _reported:
        _reported.add(err.path)
        print(f"scifm: warning: {err.detail}", file=sys.stderr, flush=True)


def open_stream(spec: SourceSpec, split: str, skill: str | None, skills: dict[str, int] | None, tokenizer,
                enc_cfg: EncodersConfig):
    """The stream of a JSONL or an indexed source; both give (cursor, document or the error that refuses
    it, and for an error what its skip names) from `next`. An
    indexed one measures its documents under `enc_cfg` as it yields them."""
    if spec.index is not None:
        from scifm.data.indexed.stream import IndexedStream  # here: it imports this module

        return IndexedStream(spec, split, skill, tokenizer, enc_cfg)
    return DocumentStream(spec, split, skill, skills)


def changed(path: Path, why: str) -> DataError:
    return DataError(f"{path} changed since the checkpoint ({why}); restore it or start a new run")


class DocumentStream:
    """Endless stream of (cursor, document or format error, where the error is) for one source and split.

    A bad record is returned by the one stream it belongs to, so that each loader's skip budget
    counts only its own split: by its id's split where the id can still be read, else by the hash
    of the line (bad lines then spread over the splits as documents do). With skills balanced, a
    bad record without a known skill goes to one skill stream, chosen by hash in proportion to the
    skills' counts (`skills`), so a rare skill's stream, which reads far past other skills'
    lines, is not charged for their bad records. A damaged file is reported by every stream that
    reads it: each of them lost its own records in the unread rest.

    Besides the cursor, the stream keeps the SHA-256 of the bytes before the cursor in the
    cursor's file (`prefix_sha256`): a resumed stream reads those lines anyway to reach the
    cursor, so checking them costs one hash and catches any edit that would move the cursor.
    """

    def __init__(self, spec: SourceSpec, split: str, skill: str | None = None, skills: dict[str, int] | None = None):
        self.spec = spec
        self.split = split
        self.skill = skill
        self._skill_edges = _skill_edges(skills or ({skill: 1} if skill else {}))
        self.cursor: Cursor = (0, 0, 1)
        self._lines: Iterator[tuple[int, bytes]] | None = None
        # SHA-256 of this file's lines read so far; None after a seek until the file is opened again
        self._digest: hashlib._Hash | None = hashlib.sha256()
        self._matched_this_epoch = False

    def seek(self, cursor: Cursor, prefix_sha256: str | None = None) -> None:
        """Continue at `cursor`; with the checkpoint's `prefix_sha256`, reads up to it now and checks it."""
        self.cursor = tuple(cursor)  # type: ignore[assignment]
        self._lines = None
        self._digest = hashlib.sha256() if self.cursor[2] == 1 else None
        # resumed mid-epoch: the lines before the cursor may have matched
        self._matched_this_epoch = self.cursor[1:] != (0, 1)
        n_files = len(self.spec.files)
        if not 0 <= self.cursor[1] < n_files:
            raise DataError(f"source '{self.spec.name}' has {n_files} files now, but the checkpoint read its "
                            f"file {self.cursor[1] + 1}: its files changed since the checkpoint")
        if prefix_sha256 is not None:
            self._lines = self._open(prefix_sha256)

    def prefix_sha256(self) -> str | None:
        return self._digest.hexdigest() if self._digest is not None else None

    def _open(self, expected_sha256: str | None = None) -> Iterator[tuple[int, bytes]]:
        """The cursor's file, read up to the cursor; a file too short for it has changed."""
        _, file_idx, line_no = self.cursor
        path = self.spec.files[file_idx]
        lines = read_lines(path)
        digest = hashlib.sha256()
        try:
            for _ in range(line_no - 1):
                item = next(lines, None)
                if item is None:
                    raise changed(path, f"it has fewer than the {line_no - 1} lines read before")
                digest.update(item[1])
        except DamagedFileError as err:  # the run read past here before: the bytes changed
            raise changed(path, f"it is now damaged after line {err.last_line}") from None
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise changed(path, f"its first {line_no - 1} lines differ from those read before")
        self._digest = digest
        return lines

    def next(self) -> tuple[Cursor, Document | DocumentFormatError, str | None]:
        """The next document of this split; a malformed line comes back as its error, with its file:line."""
        while True:
            if self._lines is None:
                self._lines = self._open()
            try:
                item = next(self._lines, None)
            except DamagedFileError as err:
                return self._damaged(err)
            if item is None:
                self._next_file()
                continue
            line_no, raw = item
            self._digest.update(raw)
            here = self.cursor
            self.cursor = (here[0], here[1], line_no + 1)
            if not raw.strip():
                continue
            try:
                doc = parse_line(raw)
            except DocumentFormatError as err:
                if not self._owns_bad(raw):
                    continue
                self._matched_this_epoch = True
                return here, err, f"{self.spec.files[here[1]]}:{line_no}"
            if split_of(doc.id) != self.split or (self.skill is not None and doc.skill != self.skill):
                continue
            self._matched_this_epoch = True
            return here, doc, None

    def _owns_bad(self, raw: bytes) -> bool:
        key, skill = record_keys(raw)
        if split_of(key) != self.split:
            return False
        if self.skill is None:
            return True
        if skill not in self._skill_edges:
            skill = _skill_by_hash(key, self._skill_edges)
        return skill == self.skill

    def _damaged(self, err: DamagedFileError) -> tuple[Cursor, DamagedFileError, str]:
        """The file ends here: report it, move to the next file (a resume must not count it again)."""
        here = self.cursor
        report_damaged(err)
        self._matched_this_epoch = True
        self._next_file()
        return here, err, f"{err.path}:{err.last_line + 1}"

    def _next_file(self) -> None:
        epoch, file_idx, _ = self.cursor
        self._lines = None
        self._digest = hashlib.sha256()
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
        path = self.spec.files[file_idx]
        try:
            for n, raw in read_lines(path):
                if n == line_no:
                    return parse_line(raw)
        except DocumentFormatError as err:  # it was read as a good document before
            raise changed(path, f"line {line_no}: {err}") from None
        raise changed(path, f"it has no line {line_no} now")


def _skill_edges(skills: dict[str, int]) -> dict[str, float]:
    """Skill -> upper end of its share of [0, 1), skills in sorted order."""
    total, acc, edges = sum(skills.values()), 0, {}
    for skill in sorted(skills):
        acc += skills[skill]
        edges[skill] = acc / total
    return edges


def _skill_by_hash(key: str, edges: dict[str, float]) -> str:
    u = unit_hash(key, salt=b"skill:")  # salted: independent of the split's hash of the same key
    return next((skill for skill, top in edges.items() if u < top), next(reversed(edges)))
