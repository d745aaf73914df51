"""Modality encoders: each maps a collated batch of items to [n_items, slots, d_model]."""

from __future__ import annotations

import torch
from torch import nn

from scifm.model.config import EncodersConfig
from scifm.model.encoders.figure import FigureEncoder
from scifm.model.encoders.latex import LatexEncoder
from scifm.model.encoders.molecule import MoleculeEncoder
from scifm.model.encoders.protein import ProteinEncoder
from scifm.model.encoders.table import TableEncoder
from scifm.model.init import init_parameters


def build_encoders(
    cfg: EncodersConfig, d_model: int, vocab_sizes: dict[str, int], *, init_std: float = 0.02
) -> nn.ModuleDict:
    """Keys latex, molecule, protein, table, figure; vocab_sizes needs "latex", "protein", "text".

    Weights are normal(0, init_std) (norms 1, biases 0) drawn from torch's seed and each parameter's
    name, so torch.manual_seed(s) before the call fixes them.
    """
    encoders = nn.ModuleDict({
        "latex": LatexEncoder(cfg.latex, d_model, vocab_sizes["latex"]),
        "molecule": MoleculeEncoder(cfg.molecule, d_model),
        "protein": ProteinEncoder(cfg.protein, d_model, vocab_sizes["protein"]),
        "table": TableEncoder(cfg.table, d_model, vocab_sizes["text"]),
        "figure": FigureEncoder(cfg.figure, d_model),
    })
    init_parameters(encoders, torch.initial_seed(), init_std)
    return encoders


__all__ = [
    "FigureEncoder", "LatexEncoder", "MoleculeEncoder", "ProteinEncoder", "TableEncoder", "build_encoders",
]
