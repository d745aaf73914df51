"""Pieces every corpus source shares: the context it writes through, file lookup, numbers, templates."""

from __future__ import annotations

import importlib.resources
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np

from scifm.data.documents import Document
from scifm.data.skips import SkipCounter

FIGURES_DIR = "figures"

# A segment slot in a template is either a segment dict or a string spliced into the text.
Slot = dict | str


@dataclass
class SourceContext:
    """What a source needs: its name, its own seeded RNG, the skip counter and the corpus root."""

    name: str
    rng: random.Random
    skips: SkipCounter
    root: Path

    def skip(self, reason: str, raw_id: str) -> None:
        self.skips.skip(self.name, reason, raw_id)

    def figure(self, stem: str) -> tuple[Path, str]:
        """(absolute path to write, path relative to the corpus root for the figure segment)."""
        rel = f"{FIGURES_DIR}/{stem}.png"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, rel

    def doc(self, doc_id: str, skill: str, segments: list[dict]) -> Document:
        # from_dict validates, so a source can never write a document the loaders reject
        return Document.from_dict({"id": doc_id, "source": self.name, "skill": skill, "segments": segments})


Source = Callable[[SourceContext], Iterator[Document]]


def package_file(package: str, *parts: str) -> Traversable:
    """A data file shipped inside an installed package (never a machine path)."""
    return importlib.resources.files(package).joinpath(*parts)


def num(x: float, sig: int = 4) -> str:
    """A number as prose shows it: integers plainly, others to `sig` significant digits, never 1e-05."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return np.format_float_positional(float(f"{x:.{sig}g}"), trim="-")


def cell(x: object) -> int | float | str:
    """A table cell: ints stay ints, floats keep 6 significant digits, everything else is text."""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(f"{float(x):.6g}")
        return int(f) if f.is_integer() and abs(f) < 1e15 else f
    return str(x)


_FIELD = re.compile(r"\{(\w+)\}")


def render(template: str, slots: dict[str, Slot] | None = None, **values: object) -> list[dict]:
    """Fills `{name}` fields: slots become segments (or inline text), other values are formatted.

    Adjacent text is merged, so an inline SMILES slot yields one text segment around it.
    """
    slots = slots or {}
    pieces: list[Slot] = []
    for i, part in enumerate(_FIELD.split(template)):
        if i % 2 == 0:
            pieces.append(part)
        elif part in slots:
            pieces.append(slots[part])
        else:
            pieces.append(str(values[part]))
    return compose(pieces)


def compose(pieces: Sequence[Slot]) -> list[dict]:
    """Strings and segments in order -> segments, with adjacent text merged and empty text dropped."""
    out: list[dict] = []
    for p in pieces:
        if isinstance(p, dict):
            out.append(p)
        elif p and out and out[-1]["type"] == "text":
            out[-1] = text_seg(out[-1]["text"] + p)
        elif p:
            out.append(text_seg(p))
    return out


def text_seg(text: str) -> dict:
    return {"type": "text", "text": text}


def molecule_seg(smiles: str) -> dict:
    return {"type": "molecule", "smiles": smiles}


def protein_seg(sequence: str) -> dict:
    return {"type": "protein", "sequence": sequence}


def latex_seg(latex: str) -> dict:
    return {"type": "latex", "latex": latex}


def figure_seg(rel_path: str) -> dict:
    return {"type": "figure", "path": rel_path}


def table_seg(columns: list[str], rows: list[list], caption: str) -> dict:
    return {"type": "table", "columns": columns, "rows": rows, "caption": caption}


# Inline spans must be long enough for the tokenizer's auto-detection (docs/architecture.md, "Sequence layout": 10+ SMILES chars).
INLINE_SMILES_MIN = 10
INLINE_FRACTION = 0.25


def molecule_slot(rng: random.Random, smiles: str) -> Slot:
    """Usually a molecule segment; sometimes the SMILES written in the prose, as papers do."""
    if len(smiles) >= INLINE_SMILES_MIN and rng.random() < INLINE_FRACTION:
        return f"the molecule {smiles}"
    return molecule_seg(smiles)
