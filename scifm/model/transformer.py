"""Decoder block (pre-norm attention + dense or MoE feed-forward), weight init, parameter counts.

The first cfg.n_dense_layers blocks use a dense SwiGLU, the rest an MoE.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scifm.model.attention import Attention
from scifm.model.config import ModelConfig
from scifm.model.layers import RMSNorm, SwiGLU
from scifm.model.moe import GroupedExperts, MoE


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = layer_id >= cfg.n_dense_layers
        if self.is_moe:
            self.moe = MoE(cfg.d_model, cfg.moe)
        else:
            self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(
        self, h_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask_B1SS: torch.Tensor | None
    ) -> torch.Tensor:
        h_BSD = h_BSD + self.attention(self.attention_norm(h_BSD), cos, sin, mask_B1SS)
        ffn = self.moe if self.is_moe else self.feed_forward
        return h_BSD + ffn(self.ffn_norm(h_BSD))


def _is_output_projection(mod_name: str, mod: nn.Module, param_name: str) -> bool:
    """Matrices that write into the residual stream: attention wo, SwiGLU w2, experts' w2."""
    if isinstance(mod, GroupedExperts):
        return param_name == "w2"
    return mod_name.rsplit(".", 1)[-1] in ("wo", "w2")


@torch.no_grad()
def init_weights(module: nn.Module, std: float, n_layers: int = 1) -> None:
    """Normal(0, std) for every matrix, std / sqrt(2 * n_layers) for residual output projections,
    ones/zeros for norms and biases, zeros for the routing bias.

    Deterministic given the RNG state: parameters are visited in registration order. Works on
    meta tensors (no-op) and on tensors materialised with to_empty().
    """
    out_std = std / math.sqrt(2 * n_layers)
    for mod_name, mod in module.named_modules():
        for name, param in mod.named_parameters(recurse=False):
            if isinstance(mod, (RMSNorm, nn.LayerNorm)) and name == "weight":
                nn.init.ones_(param)
            elif name == "bias":
                nn.init.zeros_(param)
            elif _is_output_projection(mod_name, mod, name):
                nn.init.normal_(param, mean=0.0, std=out_std)
            else:
                nn.init.normal_(param, mean=0.0, std=std)
        if isinstance(mod, MoE):
            mod.router.expert_bias.zero_()
            mod.tokens_per_expert_acc.zero_()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


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
