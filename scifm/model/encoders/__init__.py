"""Modality encoders: each maps a collated batch of items to [n_items, slots, d_model]."""

from __future__ import annotations

from torch import nn

from scifm.core.encoders_config import EncodersConfig
from scifm.model.encoders.figure import FigureEncoder
from scifm.model.encoders.latex import LatexEncoder
from scifm.model.encoders.molecule import MoleculeEncoder
from scifm.model.encoders.protein import ProteinEncoder
from scifm.model.encoders.table import TableEncoder


def build_encoders(cfg: EncodersConfig, d_model: int, vocab_sizes: dict[str, int]) -> nn.ModuleDict:
    """Keys latex, molecule, protein, table, figure; vocab_sizes needs "latex", "protein", "text".

    Weights are initialised with the whole model by scifm.model.init.init_parameters.
    """
    encoders = nn.ModuleDict({
        "latex": LatexEncoder(cfg.latex, d_model, vocab_sizes["latex"]),
        "molecule": MoleculeEncoder(cfg.molecule, d_model),
        "protein": ProteinEncoder(cfg.protein, d_model, vocab_sizes["protein"]),
        "table": TableEncoder(cfg.table, d_model, vocab_sizes["text"]),
        "figure": FigureEncoder(cfg.figure, d_model),
    })
    return encoders


__all__ = [
    "FigureEncoder", "LatexEncoder", "MoleculeEncoder", "ProteinEncoder", "TableEncoder", "build_encoders",
]
