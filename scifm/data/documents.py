"""The JSONL document format (docs/architecture.md, "Document format"): validation, deterministic splits, streaming read/write.

A document is one JSON object per line:
  {"id": str, "source": str, "skill": str, "segments": [{"type": ..., ...}, ...]}
Validation here checks structure only (keys and types); whether a SMILES parses or an image
loads is decided by the featurizers, which raise DocumentFormatError with a counted reason too.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
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
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


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


def open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_lines(files: Iterable[Path]) -> Iterator[tuple[str, int, str]]:
    """Yields (file, 1-based line number, line) without reading any file whole."""
    for f in files:
        with open_text(f) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield str(f), lineno, line


def parse_line(line: str) -> Document:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DocumentFormatError("bad_json", str(e)) from None
    return Document.from_dict(obj)


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
