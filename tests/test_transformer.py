"""Decoder block: document masking, GQA, RoPE, head sharding, init and parameter counts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from scifm.model import attention as attention_module
from scifm.model.attention import Attention, document_causal_mask
from scifm.model.config import ModelConfig, MoEConfig
from scifm.model.kv_cache import LayerKV
from scifm.model.layers import apply_rope, rope_cos_sin
from scifm.model.transformer import TransformerBlock, count_params, moe_layers


def _tiny_cfg(**overrides) -> ModelConfig:
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48, n_dense_layers=1,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_ffn=24, n_shared_experts=1))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def _run_block(block: TransformerBlock, cfg: ModelConfig, x_BSD, positions_BS, doc_ids_BS) -> torch.Tensor:
    cos, sin = rope_cos_sin(positions_BS, cfg.dim_per_head, cfg.rope_theta)
    return block(x_BSD, cos, sin, document_causal_mask(doc_ids_BS))


def test_document_causal_mask_values() -> None:
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert mask.shape == (1, 1, 5, 5) and torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("layer_id", [0, 1])  # dense block, MoE block
def test_packed_documents_do_not_interact(layer_id: int) -> None:
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    block = TransformerBlock(cfg, layer_id)
    assert block.is_moe == (layer_id >= cfg.n_dense_layers)
    doc_a, doc_b = torch.randn(1, 5, 32), torch.randn(1, 7, 32)
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])

    out_packed = _run_block(block, cfg, packed, positions, doc_ids)
    out_a = _run_block(block, cfg, doc_a, torch.arange(5)[None], torch.zeros(1, 5, dtype=torch.long))
    out_b = _run_block(block, cfg, doc_b, torch.arange(7)[None], torch.zeros(1, 7, dtype=torch.long))
    torch.testing.assert_close(out_packed[:, :5], out_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_packed[:, 5:], out_b, atol=1e-5, rtol=1e-5)

    # plain causal attention over the pack lets document b see document a
    cos, sin = rope_cos_sin(positions, cfg.dim_per_head, cfg.rope_theta)
    leaky = block(packed, cos, sin, None)
    assert (leaky[:, 5:] - out_b).abs().max() > 1e-3


def _reference_attention(attn: Attention, x_BSD, cos, sin, mask_B1SS) -> torch.Tensor:
    """Multi-head attention with kv heads explicitly repeated, by matmul + softmax."""
    B, S, _ = x_BSD.shape
    hd = attn.head_dim
    q = apply_rope((x_BSD @ attn.wq.weight.T).view(B, S, -1, hd), cos, sin).transpose(1, 2)
    k = apply_rope((x_BSD @ attn.wk.weight.T).view(B, S, -1, hd), cos, sin).transpose(1, 2)
    v = (x_BSD @ attn.wv.weight.T).view(B, S, -1, hd).transpose(1, 2)
    n_rep = q.shape[1] // k.shape[1]
    kv_head_of = [h // n_rep for h in range(q.shape[1])]
    k, v = k[:, kv_head_of], v[:, kv_head_of]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(~mask_B1SS, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, S, -1) @ attn.wo.weight.T


def test_gqa_matches_explicitly_repeated_reference() -> None:
    torch.manual_seed(1)
    attn = Attention(d_model=32, n_heads=8, n_kv_heads=2, head_dim=8)
    x_BSD = torch.randn(2, 9, 32)
    positions = torch.cat([torch.arange(4), torch.arange(5)])[None].expand(2, -1)
    mask = document_causal_mask(torch.tensor([[0] * 4 + [1] * 5, [0] * 9]))
    cos, sin = rope_cos_sin(positions, 8, 10000.0)
    torch.testing.assert_close(attn(x_BSD, cos, sin, mask), _reference_attention(attn, x_BSD, cos, sin, mask),
                               atol=1e-5, rtol=1e-5)


def test_query_blocks_give_the_one_calls_result_and_skip_later_keys(monkeypatch) -> None:
    """Blocks of 4 queries over 11 (the last block short), three documents, with and without cached
    keys: outputs and every gradient equal one SDPA call's; each call gets only the keys up to its
    block's last query. Tolerance 1e-6 (fp32): the same sums over fewer masked-out terms."""
    torch.manual_seed(5)
    one_call = Attention(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=True)
    blocks = copy.deepcopy(one_call)
    blocks.query_block = 4
    x_BSD = torch.randn(2, 11, 32)
    doc_ids_BS = torch.tensor([[0] * 3 + [1] * 6 + [2] * 2, [0] * 11])
    cos, sin = rope_cos_sin(torch.arange(11)[None].expand(2, -1), 8, 10000.0)
    mask = document_causal_mask(doc_ids_BS)
    # five keys already cached before the 11 queries: T = 16
    cached_mask = torch.cat([torch.ones(2, 1, 11, 5, dtype=torch.bool), mask], dim=3)
    key_lengths: list[int] = []
    sdpa = attention_module.F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kwargs):
        key_lengths.append(k.shape[2])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting_sdpa)
    for m in (mask, cached_mask):
        k_cached = torch.randn(2, 2, m.shape[3] - 11, 8)
        with_cache = m is cached_mask

        def run(attn):
            cache = None
            if with_cache:
                cache = LayerKV()
                cache.append(k_cached, k_cached.flip(0))
            x = x_BSD.clone().requires_grad_()
            attn.zero_grad()
            out_BSD = attn(x, cos, sin, m, cache=cache)
            out_BSD.square().sum().backward()
            return [out_BSD.detach(), x.grad] + [p.grad for p in attn.parameters()]

        key_lengths.clear()
        expected = run(one_call)
        assert key_lengths == [m.shape[3]]
        key_lengths.clear()
        got = run(blocks)
        offset = m.shape[3] - 11
        assert key_lengths == [offset + 4, offset + 8, offset + 11]
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_rope_depends_only_on_relative_position() -> None:
    torch.manual_seed(2)
    attn = Attention(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)
    x_BSD = torch.randn(1, 6, 32)
    positions = torch.arange(6)[None]

    def run(pos_BS: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(pos_BS, 8, 10000.0)
        return attn(x_BSD, cos, sin, None)

    torch.testing.assert_close(run(positions + 37), run(positions), atol=1e-5, rtol=1e-5)
    assert (run(positions * 3) - run(positions)).abs().max() > 1e-3  # positions do matter
    cos0, sin0 = rope_cos_sin(torch.zeros(1, 1, dtype=torch.long), 8, 10000.0)
    assert torch.equal(cos0, torch.ones(1, 1, 8)) and torch.equal(sin0, torch.zeros(1, 1, 8))


def test_attention_runs_on_a_subset_of_heads() -> None:
    """A tensor-parallel rank holds half the q and kv heads; partial outputs sum to the full one."""
    torch.manual_seed(3)
    attn = Attention(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)
    x_BSD = torch.randn(1, 5, 32)
    cos, sin = rope_cos_sin(torch.arange(5)[None], 8, 10000.0)
    total = torch.zeros(1, 5, 32)
    for rank in range(2):
        shard = copy.deepcopy(attn)
        q_rows, kv_rows = slice(16 * rank, 16 * (rank + 1)), slice(8 * rank, 8 * (rank + 1))
        shard.wq.weight = nn.Parameter(attn.wq.weight[q_rows])
        shard.wk.weight = nn.Parameter(attn.wk.weight[kv_rows])
        shard.wv.weight = nn.Parameter(attn.wv.weight[kv_rows])
        shard.wo.weight = nn.Parameter(attn.wo.weight[:, q_rows])
        total = total + shard(x_BSD, cos, sin, None)
    torch.testing.assert_close(total, attn(x_BSD, cos, sin, None), atol=1e-5, rtol=1e-5)


def test_block_backward_and_moe_layers() -> None:
    torch.manual_seed(4)
    cfg = _tiny_cfg()
    blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
    assert not hasattr(blocks[0], "moe") and not hasattr(blocks[1], "feed_forward")
    assert moe_layers(blocks) == [blocks[1].moe, blocks[2].moe]
    x_BSD = torch.randn(2, 6, 32, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(6)[None].expand(2, -1), cfg.dim_per_head, cfg.rope_theta)
    h = x_BSD
    for block in blocks:
        h = block(h, cos, sin, None)
    h.sum().backward()
    assert all(p.grad is not None for p in blocks.parameters())


def _meta_model(cfg: ModelConfig, vocab: int) -> nn.Module:
    with torch.device("meta"):
        model = nn.ModuleDict({
            "tok_embeddings": nn.Embedding(vocab, cfg.d_model),
            "layers": nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers)),
            "output": nn.Linear(cfg.d_model, vocab, bias=False),
        })
    return model


def test_count_params_matches_hand_formula_on_meta() -> None:
    cfg = _tiny_cfg()
    model = _meta_model(cfg, vocab=100)
    d, hd, m = cfg.d_model, cfg.dim_per_head, cfg.moe
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + 2 * d  # + two norms
    dense = attn + 3 * d * cfg.ffn_hidden
    expert = 3 * d * m.expert_ffn
    moe = attn + d * m.n_experts + m.n_experts * expert + 3 * d * m.n_shared_experts * m.expert_ffn
    n_moe = cfg.n_layers - cfg.n_dense_layers
    total_ref = 2 * 100 * d + cfg.n_dense_layers * dense + n_moe * moe
    total, active = count_params(model, cfg)
    assert total == total_ref
    assert active == total_ref - n_moe * (m.n_experts - m.top_k) * expert
    assert active < total


def test_count_params_paper_scale_shape() -> None:
    """Intern-S1-Pro's published shape: ~1T total, ~22B active."""
    cfg = ModelConfig(d_model=4096, n_layers=94, n_heads=64, n_kv_heads=4, head_dim=128, n_dense_layers=0,
                      moe=MoEConfig(n_experts=512, top_k=8, n_groups=8, topk_groups=4, expert_ffn=1536))
    total, active = count_params(_meta_model(cfg, vocab=155_000), cfg)
    assert 0.85e12 < total < 1.1e12
    assert 20e9 < active < 24e9
