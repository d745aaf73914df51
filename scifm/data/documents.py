"""The JSONL document format (docs/architecture.md, "Document format"): validation, deterministic splits, streaming read/write.

A document is one JSON object per line:
  {"id": str, "source": str, "skill": str, "segments": [{"type": ..., ...}, ...]}
Validation here checks structure only (keys and types); whether a SMILES parses or an image
loads is decided by the featurizers, which raise DocumentFormatError with a counted reason too.

Files are read as bytes, one line at a time (`read_lines`), so damage stays as small as it can:
a line that is not UTF-8 is one bad record (`bad_utf8`, raised by `parse_line`), and a file whose
bytes break off (a truncated or corrupt .gz, a read error) ends after its last good line with a
DamagedFileError (`truncated_file` / `corrupt_file`) that names the file and that line.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from scifm.core.errors import DataError, DocumentFormatError

SPLITS = ("train", "validation", "test")

# segment type -> required keys and their JSON types
SEGMENT_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "text": {"text": str},
    "latex": {"latex": str},
    "molecule": {"smiles": str},
    "protein": {"sequence": str},
    "table": {"columns": list, "rows": list},
    "figure": {},  # "path" or "array", checked below
}


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    skill: str
    segments: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "source": self.source, "skill": self.skill, "segments": self.segments},
            ensure_ascii=False,
        )

    @classmethod
    def from_dict(cls, obj: object) -> "Document":
        if not isinstance(obj, dict):
            raise DocumentFormatError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
        for key in ("id", "source", "skill"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise DocumentFormatError("bad_field", f"'{key}' must be a non-empty string")
        segments = obj.get("segments")
        if not isinstance(segments, list) or not segments:
            raise DocumentFormatError("bad_field", "'segments' must be a non-empty list")
        for i, seg in enumerate(segments):
            validate_segment(seg, i)
        return cls(id=obj["id"], source=obj["source"], skill=obj["skill"], segments=segments)


def validate_segment(seg: object, index: int) -> None:
    if not isinstance(seg, dict) or seg.get("type") not in SEGMENT_FIELDS:
        kind = seg.get("type") if isinstance(seg, dict) else type(seg).__name__
        raise DocumentFormatError("unknown_segment", f"segment {index} has unknown type {kind!r}")
    kind = seg["type"]
    for key, typ in SEGMENT_FIELDS[kind].items():
        if not isinstance(seg.get(key), typ):
            raise DocumentFormatError(f"bad_{kind}", f"segment {index} ({kind}) needs '{key}'")
    if kind == "figure" and not (isinstance(seg.get("path"), str) or isinstance(seg.get("array"), list)):
        raise DocumentFormatError("bad_figure", f"segment {index} (figure) needs 'path' or 'array'")
    if kind == "table":
        n_cols = len(seg["columns"])
        if n_cols == 0 or any(not isinstance(r, list) or len(r) != n_cols for r in seg["rows"]):
            raise DocumentFormatError("bad_table", f"segment {index} (table) rows must match its {n_cols} columns")


def split_of(doc_id: str, validation_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """Deterministic split from the id alone, so any corpus splits the same way on every machine."""
    u = unit_hash(doc_id)
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def unit_hash(key: str, salt: bytes = b"") -> float:
    """A number in [0, 1) from the first 8 bytes of SHA-256(salt + key); the same on every machine."""
    data = salt + key.encode("utf-8", "surrogatepass")  # any str hashes, even one with lone surrogates
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64


def jsonl_files(path: str | Path) -> list[Path]:
    """A JSONL file (optionally .gz) or a directory searched recursively, in sorted order."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise DataError(f"{p}: directory holds no .jsonl or .jsonl.gz files")
        return files
    if not p.is_file():
        raise DataError(f"{p}: no such file or directory (check data.sources)")
    return [p]


class DamagedFileError(DocumentFormatError):
    """A file's bytes break off after line `last_line`: the rest of the file cannot be read."""

    def __init__(self, path: Path, last_line: int, cause: BaseException):
        ends = isinstance(cause, EOFError)  # gzip's word for a file cut short
        detail = (f"{path}: {'the file ends early' if ends else 'the data is damaged'} after line {last_line} "
                  f"({type(cause).__name__}: {cause}); the rest of the file is skipped")
        super().__init__("truncated_file" if ends else "corrupt_file", detail)
        self.path, self.last_line, self.detail = path, last_line, detail


# what reading a damaged .gz (or a failing disk) raises; gzip.BadGzipFile is an OSError
DAMAGE_ERRORS = (EOFError, zlib.error, OSError)


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yields (1-based line number, the line's bytes) of a .jsonl or .jsonl.gz file, blank lines too.

    Bytes, not text: a line that is not UTF-8 then spoils only itself (see `parse_line`). If the
    file's bytes break off, raises DamagedFileError after the last good line.
    """
    try:
        fh = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    lineno = 0
    with fh:
        try:
            for lineno, raw in enumerate(fh, 1):
                yield lineno, raw
        except DAMAGE_ERRORS as err:
            # a line cut off by the damage is never yielded: `raw` only ever holds whole lines
            raise DamagedFileError(path, lineno, err) from None


def iter_lines(files: Iterable[Path]) -> Iterator[tuple[str, int, bytes]]:
    """Yields (file, 1-based line number, line bytes for `parse_line`) of every non-blank line.

    A damaged file raises its DamagedFileError (a one-line DataError naming the file).
    """
    for f in files:
        for lineno, raw in read_lines(Path(f)):
            if raw.strip():
                yield str(f), lineno, raw


def decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
        raise DocumentFormatError("bad_utf8", f"not valid UTF-8 ({where})") from None


# a \uD800-\uDFFF escape: fine in a pair (json.dumps writes emoji so), not alone
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_line(line: str | bytes) -> Document:
    text = decode_line(line) if isinstance(line, bytes) else line
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an over-long number, too deep nesting
        raise DocumentFormatError("bad_json", str(e)) from None
    if _SURROGATE_ESCAPE.search(text):
        _reject_lone_surrogates(obj)
    return Document.from_dict(obj)


def _reject_lone_surrogates(obj: object) -> None:
    """A lone surrogate escape decodes to a str no encoder accepts: the text was not Unicode to begin with."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DocumentFormatError("bad_utf8", f"a \\u escape is a lone surrogate ({e.object[e.start]!r})") from None


def record_keys(line: str | bytes) -> tuple[str, str | None]:
    """What a bad record's split and skill are judged by: its id and skill where they can still be
    read, else (for an id) the line itself. So every bad record belongs to exactly one split."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        return text.strip(), None
    doc_id, skill = obj.get("id"), obj.get("skill")
    return (doc_id if isinstance(doc_id, str) and doc_id else text.strip(),
            skill if isinstance(skill, str) and skill else None)


def write_jsonl(path: str | Path, docs: Iterable[Document]) -> int:
    """Writes atomically (temp file + rename); returns the number of documents written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(doc.to_json() + "\n")
            n += 1
    tmp.replace(path)
    return n
