"""Molecule encoder: message passing over the atoms of the whole batch at once, then k slots.

The batch's atoms are flattened to [B * A] and each item's edges are offset by b * A, so one
index_add_ per layer aggregates every message. Sum aggregation and a position-free resampler make
the output invariant to atom order.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scifm.core.modalities import ATOM_CATEGORY_SIZES, BOND_CATEGORY_SIZES
from scifm.core.encoders_config import EncoderConfig
from scifm.model.encoders.common import MLP, SlotHead


class CategoryEmbedding(nn.Module):
    """Sum of one embedding per integer feature column (one table, offset per column)."""

    def __init__(self, sizes: Sequence[int], width: int):
        super().__init__()
        self.table = nn.Embedding(sum(sizes), width)
        offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        self.register_buffer("offsets_F", offsets, persistent=False)

    def forward(self, feats_NF: torch.Tensor) -> torch.Tensor:
        return self.table(feats_NF + self.offsets_F).sum(-2)


class MessagePassingLayer(nn.Module):
    """Messages from source atom state and bond, summed onto destination atoms; residual update."""

    def __init__(self, width: int):
        super().__init__()
        self.message = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)
        self.update = MLP(width, 2 * width)

    def forward(
        self, h_ND: torch.Tensor, bond_ED: torch.Tensor, src_E: torch.Tensor, dst_E: torch.Tensor, real_E1: torch.Tensor
    ) -> torch.Tensor:
        # padded edges point at atom 0 of their item; zeroing their message keeps them inert
        msg_ED = F.gelu(self.message(torch.cat([h_ND[src_E], bond_ED], dim=-1))) * real_E1
        agg_ND = torch.zeros_like(h_ND).index_add_(0, dst_E, msg_ED)
        return h_ND + self.update(self.norm(h_ND + agg_ND))


class MoleculeEncoder(nn.Module):
    """Batch keys atom_feats, atom_mask, edge_index, bond_feats, edge_mask (collate("molecule"))."""

    def __init__(self, cfg: EncoderConfig, d_model: int):
        super().__init__()
        self.atoms = CategoryEmbedding(ATOM_CATEGORY_SIZES, cfg.width)
        self.bonds = CategoryEmbedding(BOND_CATEGORY_SIZES, cfg.width)
        self.layers = nn.ModuleList(MessagePassingLayer(cfg.width) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = SlotHead(cfg, d_model)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        atoms_BAF, atom_mask_BA = batch["atom_feats"], batch["atom_mask"]
        B, A, _ = atoms_BAF.shape
        offset_B11 = (torch.arange(B, device=atoms_BAF.device) * A).view(B, 1, 1)
        edges_E2 = (batch["edge_index"] + offset_B11).reshape(-1, 2)
        bond_ED = self.bonds(batch["bond_feats"]).flatten(0, 1)
        real_E1 = batch["edge_mask"].reshape(-1, 1).to(bond_ED.dtype)
        h_ND = self.atoms(atoms_BAF).flatten(0, 1)
        for layer in self.layers:
            h_ND = layer(h_ND, bond_ED, edges_E2[:, 0], edges_E2[:, 1], real_E1)
        return self.head(self.norm(h_ND).view(B, A, -1), atom_mask_BA)
