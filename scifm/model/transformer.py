"""Decoder block (pre-norm attention + dense or MoE feed-forward) and parameter counts.

The first cfg.n_dense_layers blocks use a dense SwiGLU, the rest an MoE.
"""

from __future__ import annotations

import torch
from torch import nn

from scifm.model.attention import Attention
from scifm.model.config import ModelConfig
from scifm.model.kv_cache import LayerKV
from scifm.model.layers import RMSNorm, SwiGLU
from scifm.model.moe import MoE, RoutingStatistics


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head,
                                   qk_norm=cfg.qk_norm, bias=cfg.attention_bias, norm_eps=cfg.norm_eps,
                                   query_block=cfg.attention_query_block)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = layer_id >= cfg.n_dense_layers
        if self.is_moe:
            self.moe = MoE(cfg.d_model, cfg.moe)
        else:
            self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(
        self, h_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask_B1SS: torch.Tensor | None,
        *, cache: LayerKV | None = None,
    ) -> torch.Tensor:
        h_BSD = h_BSD + self.attention(self.attention_norm(h_BSD), cos, sin, mask_B1SS, cache=cache)
        ffn = self.moe if self.is_moe else self.feed_forward
        return h_BSD + ffn(self.ffn_norm(h_BSD))


def moe_layers(model: nn.Module) -> list[RoutingStatistics]:
    """Each MoE layer's routing statistics in module order: scifm's MoE modules themselves, or what
    an engine computing the layers elsewhere keeps in their place."""
    return [m for m in model.modules() if isinstance(m, RoutingStatistics)]


def count_params(model: nn.Module, cfg: ModelConfig) -> tuple[int, int]:
    """(total, active): active counts only top_k routed experts per MoE layer (shared experts,
    router, attention and embeddings are always active). Uses numel only, so meta models work.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in moe_layers(model):
        per_expert = sum(p.numel() for p in moe.experts.parameters()) // cfg.moe.n_experts
        inactive += (cfg.moe.n_experts - cfg.moe.top_k) * per_expert
    return total, total - inactive
