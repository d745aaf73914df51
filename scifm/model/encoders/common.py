"""Pieces every modality encoder shares: pre-norm transformer over padded (or packed) items, a
Perceiver-style resampler to k slots, and the projector from encoder width to the decoder's d_model.

Masks are boolean, True = real entry (or, per query, True = may attend). Every item has at least
one real entry, so no attention row is fully masked; padded positions never feed real ones, which
keeps each item's output independent of what it is batched with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scifm.core.encoders_config import EncoderConfig


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int):
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class EncoderAttention(nn.Module):
    """Multi-head attention over SDPA. mask_BQK says which keys each query may attend to: [B, 1, K]
    masks keys alike for every query (padding), [B, Q, K] per query (figures packed in a row)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x_BQD: torch.Tensor, ctx_BKD: torch.Tensor, mask_BQK: torch.Tensor) -> torch.Tensor:
        B, Q, D = x_BQD.shape
        K = ctx_BKD.shape[1]
        q_BHQd = self.q(x_BQD).view(B, Q, self.heads, -1).transpose(1, 2)
        k_BHKd, v_BHKd = self.kv(ctx_BKD).view(B, K, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o_BHQd = F.scaled_dot_product_attention(q_BHQd, k_BHKd, v_BHKd, attn_mask=mask_BQK[:, None])
        return self.out(o_BHQd.transpose(1, 2).reshape(B, Q, D))


class Block(nn.Module):
    """Pre-norm attention + MLP; with `cross` the queries attend to a separately normed context."""

    def __init__(self, width: int, heads: int, cross: bool = False):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_ctx = nn.LayerNorm(width) if cross else None
        self.attn = EncoderAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, 4 * width)

    def forward(self, x_BQD: torch.Tensor, mask_BQK: torch.Tensor, ctx_BKD: torch.Tensor | None = None) -> torch.Tensor:
        h_BQD = self.norm_q(x_BQD)
        c_BKD = h_BQD if self.norm_ctx is None else self.norm_ctx(ctx_BKD)
        x_BQD = x_BQD + self.attn(h_BQD, c_BKD, mask_BQK)
        return x_BQD + self.mlp(self.norm_mlp(x_BQD))


class TransformerEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x_BLD: torch.Tensor, mask_BQL: torch.Tensor) -> torch.Tensor:
        """mask_BQL: [B, 1, L] (padding) or [B, L, L], as EncoderAttention takes it."""
        for block in self.blocks:
            x_BLD = block(x_BLD, mask_BQL)
        return self.norm(x_BLD)


class Resampler(nn.Module):
    """k learned queries cross-attend to an item's entries: a fixed slot count for any input size."""

    def __init__(self, width: int, heads: int, slots: int):
        super().__init__()
        self.queries_SD = nn.Parameter(torch.zeros(slots, width))
        self.block = Block(width, heads, cross=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, x_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        q_BSD = self.queries_SD.expand(x_BLD.shape[0], -1, -1)
        return self.norm(self.block(q_BSD, mask_BL[:, None, :], ctx_BKD=x_BLD))


class Projector(nn.Sequential):
    """Encoder width -> decoder d_model."""

    def __init__(self, width: int, d_model: int):
        super().__init__(nn.Linear(width, d_model), nn.GELU(), nn.Linear(d_model, d_model))


class SlotHead(nn.Module):
    """Resampler to cfg.slots, then the projector: [B, L, width] -> [B, slots, d_model]."""

    def __init__(self, cfg: EncoderConfig, d_model: int):
        super().__init__()
        self.resampler = Resampler(cfg.width, cfg.heads, cfg.slots)
        self.projector = Projector(cfg.width, d_model)

    def forward(self, x_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        # nn.Linear on a 3-D input returns a view of its 2-D matmul result. This is the encoder's
        # output, where FSDP2 hooks the encoder's backward (parallel/fsdp.py); an in-place op on
        # a view there would drop that hook, so hand out a tensor of its own (a copy of N x K x D)
        return self.projector(self.resampler(x_BLD, mask_BL)).clone()


class TokenSequenceEncoder(nn.Module):
    """Token ids + learned positions -> transformer -> slots; batch keys `ids`, `mask` [B, L]."""

    def __init__(self, cfg: EncoderConfig, d_model: int, vocab_size: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, cfg.width)
        self.positions = nn.Embedding(cfg.max_len, cfg.width)
        self.transformer = TransformerEncoder(cfg.width, cfg.layers, cfg.heads)
        self.head = SlotHead(cfg, d_model)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids_BL, mask_BL = batch["ids"], batch["mask"]
        pos_L = torch.arange(ids_BL.shape[1], device=ids_BL.device)
        x_BLD = self.tokens(ids_BL) + self.positions(pos_L)
        return self.head(self.transformer(x_BLD, mask_BL[:, None, :]), mask_BL)

