"""Featurizers: one non-text segment -> numpy arrays for one item; `collate` batches items.

Every bad input raises DocumentFormatError with a counted reason: bad_smiles, bad_protein,
bad_latex, bad_table, bad_figure or too_long (longer than the modality's max_len; never cropped).
The collate keys per modality are listed beside each module's GROUPS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from scifm.data.features import figure, molecule, sequence, table
from scifm.data.features.figure import featurize_figure
from scifm.data.features.latex import featurize_latex
from scifm.data.features.molecule import featurize_molecule
from scifm.data.features.padding import Groups, collate_groups
from scifm.data.features.protein import featurize_protein
from scifm.data.features.table import featurize_table
from scifm.core.errors import DocumentFormatError
from scifm.core.encoders_config import EncodersConfig

GROUPS: dict[str, Groups] = {
    "latex": sequence.GROUPS,
    "molecule": molecule.GROUPS,
    "protein": sequence.GROUPS,
    "table": table.GROUPS,
    "figure": figure.GROUPS,
}


def featurize_segment(seg: dict, tokenizer: Any, cfg: EncodersConfig, base_dir: Path) -> dict[str, np.ndarray]:
    """`tokenizer` needs domain(name).encode(str) for latex/protein and encode_text(str) for tables."""
    kind = seg.get("type")
    if kind == "latex":
        return featurize_latex(seg.get("latex"), tokenizer, cfg.latex.max_len)
    if kind == "molecule":
        return featurize_molecule(seg.get("smiles"), cfg.molecule.max_len)
    if kind == "protein":
        return featurize_protein(seg.get("sequence"), tokenizer, cfg.protein.max_len)
    if kind == "table":
        return featurize_table(seg, tokenizer, cfg.table.max_len)
    if kind == "figure":
        return featurize_figure(seg, cfg.figure, Path(base_dir))
    raise DocumentFormatError("unknown_segment", f"no featurizer for segment type {kind!r}")


def collate(modality: str, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pads items of one modality to a batch; masks are True on real entries."""
    return collate_groups(GROUPS[modality], items)


__all__ = ["GROUPS", "collate", "featurize_segment"]
