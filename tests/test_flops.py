"""The model FLOPs formula (scifm/model/flops.py, MFU's numerator and the planner's compute) against
torch's own FLOP counter on a forward pass. The experts run per expert (torch.matmul), so that every
matmul the formula counts is an aten.mm the counter sees; attention's scores are a kernel the counter
does not count on CPU, so that part is checked by its arithmetic. Counts are exact integers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scifm.model.config import ModelConfig, MoEConfig
from scifm.model import attention as attention_module
from scifm.model.attention import Attention, document_causal_mask
from scifm.model.flops import decoder_forward_flops, decoder_train_flops_per_token, keys_visited
from scifm.model.layers import rope_cos_sin
from scifm.model.moe import GroupedExperts
from scifm.model.multimodal import ScientificMoE

VOCAB, B, S = 320, 2, 24


@pytest.mark.parametrize("cfg", [
    ModelConfig(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=96, n_dense_layers=1,
                moe=MoEConfig(n_experts=4, top_k=2, expert_ffn=32)),
    ModelConfig(d_model=48, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=16, ffn_hidden=80, n_dense_layers=0,
                moe=MoEConfig(n_experts=6, top_k=3, expert_ffn=24, n_shared_experts=2)),
], ids=["dense+moe", "shared-experts"])
def test_decoder_flops_equal_torchs_count_of_its_matmuls(cfg):
    model = ScientificMoE(cfg, {"total": VOCAB, "text": VOCAB, "latex": 64, "protein": 32}).eval()
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.use_grouped_mm = False
    ids_BS = torch.randint(0, VOCAB, (B, S))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids_BS, torch.arange(S).expand(B, S), torch.zeros(B, S, dtype=torch.long))
    counted = counter.get_flop_counts()["Global"]
    parts = decoder_forward_flops(cfg, S, VOCAB)
    assert set(map(str, counted)) == {"aten.mm"}  # nothing the formula leaves out was a matmul
    assert counted[torch.ops.aten.mm] == B * S * (sum(parts.values()) - parts["attention scores and values"])
    # QK^T and AV: 2 FLOPs per multiply-add, over each head's dims, for the (S + 1) / 2 keys a
    # causal query sees on average
    assert parts["attention scores and values"] == cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.dim_per_head * (S + 1) / 2
    assert decoder_train_flops_per_token(cfg, S, VOCAB) == 3 * sum(parts.values())


@pytest.mark.parametrize("seq, block", [(24, 8), (21, 8), (24, 0), (24, 32)])
def test_keys_visited_is_the_mean_of_the_keys_attentions_calls_get(seq, block, monkeypatch):
    """The planner's attention work (keys_visited) against the keys the SDPA calls were given, per query."""
    pairs = []
    sdpa = attention_module.F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kwargs):
        pairs.append(q.shape[2] * k.shape[2])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting_sdpa)
    attn = Attention(d_model=16, n_heads=2, n_kv_heads=1, head_dim=8, query_block=block)
    cos, sin = rope_cos_sin(torch.arange(seq)[None], 8, 10000.0)
    attn(torch.randn(1, seq, 16), cos, sin, document_causal_mask(torch.zeros(1, seq, dtype=torch.long)))
    assert keys_visited(seq, block) == pytest.approx(sum(pairs) / seq, rel=1e-12)
