"""Table encoder: each cell is the mean of its token embeddings plus row, column and kind
(body, header, caption) embeddings; caption tokens join the cells; transformer; k slots."""

from __future__ import annotations

import torch
from torch import nn

from scifm.core.modalities import CAPTION_TOKENS
from scifm.core.encoders_config import EncoderConfig
from scifm.model.encoders.common import SlotHead, TransformerEncoder

BODY, HEADER, CAPTION = 0, 1, 2


class TableEncoder(nn.Module):
    """Batch keys cell_ids, cell_token_mask, cell_row, cell_col, cell_header, cell_mask,
    caption_ids, caption_mask (collate("table")); token ids are text-vocabulary ids."""

    def __init__(self, cfg: EncoderConfig, d_model: int, text_vocab_size: int):
        super().__init__()
        self.tokens = nn.Embedding(text_vocab_size, cfg.width)
        # a table of at most max_len cells has at most max_len rows (header included) or columns
        self.rows = nn.Embedding(cfg.max_len, cfg.width)
        self.cols = nn.Embedding(cfg.max_len, cfg.width)
        self.kinds = nn.Embedding(3, cfg.width)
        self.caption_positions = nn.Embedding(CAPTION_TOKENS, cfg.width)
        self.transformer = TransformerEncoder(cfg.width, cfg.layers, cfg.heads)
        self.head = SlotHead(cfg, d_model)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tok_mask_BCT1 = batch["cell_token_mask"].unsqueeze(-1).to(self.tokens.weight.dtype)
        tok_BCTD = self.tokens(batch["cell_ids"]) * tok_mask_BCT1
        # an empty cell (no tokens) is the zero vector plus its coordinates
        cell_BCD = tok_BCTD.sum(2) / tok_mask_BCT1.sum(2).clamp(min=1)
        cell_BCD = (
            cell_BCD
            + self.rows(batch["cell_row"])
            + self.cols(batch["cell_col"])
            + self.kinds(batch["cell_header"].long())  # False -> BODY, True -> HEADER
        )
        caption_ids_BT = batch["caption_ids"]
        pos_T = torch.arange(caption_ids_BT.shape[1], device=caption_ids_BT.device)
        cap_BTD = self.tokens(caption_ids_BT) + self.caption_positions(pos_T) + self.kinds.weight[CAPTION]
        x_BLD = torch.cat([cap_BTD, cell_BCD], dim=1)
        mask_BL = torch.cat([batch["caption_mask"], batch["cell_mask"]], dim=1)
        return self.head(self.transformer(x_BLD, mask_BL[:, None, :]), mask_BL)
