"""Figure encoder: a small ViT. Linear patch embedding plus separate row and column embeddings,
so any aspect ratio (any grid up to grid_side x grid_side) has positions; transformer; k slots."""

from __future__ import annotations

import torch
from torch import nn

from scifm.core.modalities import CHANNELS, grid_side
from scifm.core.encoders_config import FigureEncoderConfig
from scifm.model.encoders.common import SlotHead, TransformerEncoder


class FigureEncoder(nn.Module):
    """Batch keys patches [B, N, P*P*C] (uint8 pixel values), patch_pos [B, N, 2], patch_mask [B, N]
    (collate("figure"))."""

    def __init__(self, cfg: FigureEncoderConfig, d_model: int):
        super().__init__()
        self.patch_embed = nn.Linear(cfg.patch_size * cfg.patch_size * CHANNELS, cfg.width)
        self.rows = nn.Embedding(grid_side(cfg), cfg.width)
        self.cols = nn.Embedding(grid_side(cfg), cfg.width)
        self.transformer = TransformerEncoder(cfg.width, cfg.layers, cfg.heads)
        self.head = SlotHead(cfg, d_model)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pos_BN2, mask_BN = batch["patch_pos"], batch["patch_mask"]
        # scaled in fp32, then to the weights' dtype (bf16 where FSDP2's parameters are): as if the
        # loader had sent floats in [0, 1] and FSDP2 had cast them on the way in
        pixels_BNP = (batch["patches"].float() / 255.0).to(self.patch_embed.weight.dtype)
        x_BND = self.patch_embed(pixels_BNP) + self.rows(pos_BN2[..., 0]) + self.cols(pos_BN2[..., 1])
        return self.head(self.transformer(x_BND, mask_BN), mask_BN)
