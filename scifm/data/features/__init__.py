"""Featurizers: one non-text segment -> numpy arrays for one item; `collate` batches items.

Featurizing is two steps. `prepare_segment` makes every check (a bad input raises
DocumentFormatError with a counted reason: bad_smiles, bad_protein, bad_latex, bad_table, bad_figure
or too_long, longer than the modality's max_len; never cropped) and keeps what the checks produced
(a parsed molecule, a decoded image, a table's cell texts); `Prepared.features()` then computes the
arrays and never fails. The loader prepares every document, since the checks decide which documents
are skipped and so the rows of every rank, but computes features only for its own rows.
The collate keys per modality are listed beside each module's GROUPS (figure.py: beside collate_figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from scifm.data.features import molecule, sequence, table
from scifm.data.features.figure import collate_figures, figure_features, read_figure
from scifm.data.features.latex import featurize_latex
from scifm.data.features.molecule import mol_features, parse_molecule
from scifm.data.features.padding import Groups, collate_groups
from scifm.data.features.protein import featurize_protein
from scifm.data.features.table import table_cells, table_features
from scifm.core.errors import DocumentFormatError
from scifm.core.encoders_config import EncodersConfig

# modalities whose items are padded to the largest: the keys of each padded axis (figures are packed)
PADDED_GROUPS: dict[str, Groups] = {
    "latex": sequence.GROUPS,
    "molecule": molecule.GROUPS,
    "protein": sequence.GROUPS,
    "table": table.GROUPS,
}
COLLATORS: dict[str, Callable[[list[dict[str, np.ndarray]]], dict[str, torch.Tensor]]] = {
    **{modality: partial(collate_groups, groups) for modality, groups in PADDED_GROUPS.items()},
    "figure": collate_figures,
}


@dataclass(frozen=True)
class Prepared:
    """A segment that passed its checks: `features()` is `finish(*args)`."""

    finish: Callable[..., dict[str, np.ndarray]]
    args: tuple

    def features(self) -> dict[str, np.ndarray]:
        return self.finish(*self.args)

    @staticmethod
    def ready(features: dict[str, np.ndarray]) -> "Prepared":
        """Features that the check itself computed."""
        return Prepared(_computed, (features,))


def _computed(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return features


def prepare_segment(seg: dict, tokenizer: Any, cfg: EncodersConfig, base_dir: Path) -> Prepared:
    """`tokenizer` needs domain(name).encode(str) for latex/protein and encode_text(str) for tables.
    LaTeX and protein ids are their own check (a letter outside the vocabulary, too many ids), so
    those features are computed here."""
    kind = seg.get("type")
    if kind == "latex":
        return Prepared.ready(featurize_latex(seg.get("latex"), tokenizer, cfg.latex.max_len))
    if kind == "molecule":
        return Prepared(mol_features, (parse_molecule(seg.get("smiles"), cfg.molecule.max_len),))
    if kind == "protein":
        return Prepared.ready(featurize_protein(seg.get("sequence"), tokenizer, cfg.protein.max_len))
    if kind == "table":
        return Prepared(table_features, (*table_cells(seg, cfg.table.max_len), tokenizer))
    if kind == "figure":
        return Prepared(figure_features, (read_figure(seg, Path(base_dir)), cfg.figure))
    raise DocumentFormatError("unknown_segment", f"no featurizer for segment type {kind!r}")


def featurize_segment(seg: dict, tokenizer: Any, cfg: EncodersConfig, base_dir: Path) -> dict[str, np.ndarray]:
    return prepare_segment(seg, tokenizer, cfg, base_dir).features()


def collate(modality: str, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Items of one modality as a batch; masks are True on real entries."""
    if not items:
        raise ValueError("collate needs at least one item")
    return COLLATORS[modality](items)


__all__ = ["PADDED_GROUPS", "Prepared", "collate", "featurize_segment", "prepare_segment"]
