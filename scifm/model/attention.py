"""Grouped-query self-attention through SDPA, with document-causal masks for packed sequences.

Shape suffixes: B batch, S sequence (query), T sequence (key), H query heads, K kv heads,
D head_dim (in attention tensors) or d_model (in block inputs/outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scifm.model.kv_cache import LayerKV
from scifm.model.layers import RMSNorm, apply_rope


def blockwise_causal_attention(q_BHSD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor,
                               mask_B1ST: torch.Tensor, query_block: int) -> torch.Tensor:
    """SDPA over blocks of query_block queries, each given only the keys up to its last query.

    The mask must be causal (query i, the (T - S + i)-th token, sees no later key), as document and
    cache masks are: the keys left out of a block's call are ones its mask would hide anyway, so the
    result is the one call's, and SDPA's masked kernels, which visit every key, do about half the work.
    query_block 0 or >= S: one call.
    """
    S, T = q_BHSD.shape[2], k_BHTD.shape[2]
    if query_block == 0 or S <= query_block:
        return F.scaled_dot_product_attention(q_BHSD, k_BHTD, v_BHTD, attn_mask=mask_B1ST)
    outs = []
    for start in range(0, S, query_block):
        stop = min(start + query_block, S)
        keys = T - S + stop
        outs.append(F.scaled_dot_product_attention(q_BHSD[:, :, start:stop], k_BHTD[:, :, :keys],
                                                   v_BHTD[:, :, :keys], attn_mask=mask_B1ST[:, :, start:stop, :keys]))
    return torch.cat(outs, dim=2)


def document_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, S, S]; True where query i may attend key j: same document and j <= i.

    Every token sees at least itself, so no row is all False (no NaN from softmax).
    """
    S = doc_ids_BS.shape[1]
    same_doc_BSS = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
    return (same_doc_BSS & causal_SS)[:, None]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qk_norm: bool = False,
                 bias: str = "none", norm_eps: float = 1e-5, query_block: int = 0):
        """bias: none | qkv (on the q, k, v projections) | all (also on wo); qk_norm: an RMSNorm
        over each query and key head, before RoPE; query_block: see blockwise_causal_attention."""
        super().__init__()
        self.head_dim = head_dim
        self.query_block = query_block
        qkv_bias = bias in ("qkv", "all")
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=bias == "all")
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask_B1SS: torch.Tensor | None = None,
        *,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """mask_B1SS: bool, True = may attend, and causal (no query sees a later key); None = plain causal.

        With a cache the new tokens' K/V are appended to it and queries attend to cached + new keys:
        the mask is then [B, 1, S, T] over all T of them (KVCache.extend makes it).
        """
        B, S, _ = x_BSD.shape
        # -1, not n_heads: a tensor-parallel rank holds only its own slice of heads
        q_BSHD = self.wq(x_BSD).view(B, S, -1, self.head_dim)
        k_BSKD = self.wk(x_BSD).view(B, S, -1, self.head_dim)
        if self.q_norm is not None:
            q_BSHD, k_BSKD = self.q_norm(q_BSHD), self.k_norm(k_BSKD)
        q_BSHD, k_BSKD = apply_rope(q_BSHD, cos, sin), apply_rope(k_BSKD, cos, sin)
        v_BSKD = self.wv(x_BSD).view(B, S, -1, self.head_dim)

        q_BHSD = q_BSHD.transpose(1, 2)
        k_BKTD, v_BKTD = k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2)
        if cache is not None:
            k_BKTD, v_BKTD = cache.append(k_BKTD, v_BKTD)
            if mask_B1SS is None:
                # is_causal aligns the diagonal top-left, wrong once keys outnumber queries
                T = k_BKTD.shape[2]
                mask_B1SS = torch.ones(S, T, dtype=torch.bool, device=x_BSD.device).tril(T - S)
        # explicit repeat (query head h uses kv head h // n_rep) keeps the fused masked kernels usable
        n_rep = q_BHSD.shape[1] // k_BKTD.shape[1]
        k_BHTD = k_BKTD.repeat_interleave(n_rep, dim=1)
        v_BHTD = v_BKTD.repeat_interleave(n_rep, dim=1)

        if mask_B1SS is None:
            out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BHTD, v_BHTD, is_causal=True)
        else:
            out_BHSD = blockwise_causal_attention(q_BHSD, k_BHTD, v_BHTD, mask_B1SS, self.query_block)
        return self.wo(out_BHSD.transpose(1, 2).reshape(B, S, -1))
