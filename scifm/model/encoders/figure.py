"""Figure encoder: a small ViT. Linear patch embedding plus separate row and column embeddings,
so any aspect ratio (any grid up to grid_side x grid_side) has positions; transformer; k slots."""

from __future__ import annotations

import torch
from torch import nn

from scifm.core.modalities import CHANNELS, grid_side
from scifm.core.encoders_config import FigureEncoderConfig
from scifm.model.encoders.common import SlotHead, TransformerEncoder


class FigureEncoder(nn.Module):
    """Batch keys (collate("figure"): figures packed several to a row) patches [R, C, P*P*C] (uint8
    pixel values), patch_pos [R, C, 2], patch_figure [R, C] (each position's figure, -1 on padding),
    figure_row [F]; out [F, slots, d_model] in the figures' order."""

    def __init__(self, cfg: FigureEncoderConfig, d_model: int):
        super().__init__()
        self.patch_embed = nn.Linear(cfg.patch_size * cfg.patch_size * CHANNELS, cfg.width)
        self.rows = nn.Embedding(grid_side(cfg), cfg.width)
        self.cols = nn.Embedding(grid_side(cfg), cfg.width)
        self.transformer = TransformerEncoder(cfg.width, cfg.layers, cfg.heads)
        self.head = SlotHead(cfg, d_model)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pos_RC2, figure_RC, row_F = batch["patch_pos"], batch["patch_figure"], batch["figure_row"]
        # scaled in fp32, then to the weights' dtype (bf16 where FSDP2's parameters are): as if the
        # loader had sent floats in [0, 1] and FSDP2 had cast them on the way in
        pixels_RCP = (batch["patches"].float() / 255.0).to(self.patch_embed.weight.dtype)
        x_RCD = self.patch_embed(pixels_RCP) + self.rows(pos_RC2[..., 0]) + self.cols(pos_RC2[..., 1])
        # a position attends to its own figure's patches only (padding, -1, to padding)
        same_RCC = figure_RC[:, :, None] == figure_RC[:, None, :]
        x_RCD = self.transformer(x_RCD, same_RCC)
        # each figure's slots from its own row, keys masked to its patches
        figure_F1 = torch.arange(row_F.shape[0], device=row_F.device)[:, None]
        return self.head(x_RCD[row_F], figure_RC[row_F] == figure_F1)
