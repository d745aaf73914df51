"""Model FLOPs per token, by part: the numerator of MFU (bench/mfu.py) and the compute of the
layout planner's step time (scifm.plan.time_model).

A matmul of an [n, a] input with an [a, b] weight is 2ab FLOPs per row; a training step is three
forward passes' worth (forward, then input and weight gradients). Attention's scores and values
cost 4 x heads x head_dim FLOPs per query and key: `keys_seen` says over how many keys, (S + 1) / 2
for the model FLOPs of causal attention (the work the problem needs), `keys_visited` for what the
model's SDPA calls compute (every masked pair of the keys each block of queries is given). Norms,
RoPE, activations and the router's softmax are left out: they are not matmuls and are small.
"""

from __future__ import annotations

from scifm.model.config import ModelConfig

TRAIN_PASSES = 3  # forward + backward (grad of inputs + grad of weights)


def causal_keys(seq_len: int) -> float:
    """Keys a causal query sees on average."""
    return (seq_len + 1) / 2


def keys_visited(seq_len: int, query_block: int) -> float:
    """Keys a query's SDPA call computes on average: a block of queries gets the keys up to its last
    query (model.attention_query_block; 0 = one call over all keys)."""
    if query_block == 0 or seq_len <= query_block:
        return float(seq_len)
    starts = range(0, seq_len, query_block)
    return sum((min(start + query_block, seq_len) - start) * min(start + query_block, seq_len)
               for start in starts) / seq_len


def layer_forward_flops(cfg: ModelConfig, moe: bool, keys_seen: float) -> dict[str, float]:
    """Forward FLOPs per token of one decoder block (an MoE block, or a dense one), by part."""
    d, q_out, kv_out = cfg.d_model, cfg.n_heads * cfg.dim_per_head, cfg.n_kv_heads * cfg.dim_per_head
    parts = {"attention projections": 2 * d * (2 * q_out + 2 * kv_out),
             "attention scores and values": 4 * q_out * keys_seen}
    if not moe:
        return parts | {"dense feed-forward": 2 * 3 * d * cfg.ffn_hidden}
    m = cfg.moe
    return parts | {"router": 2 * d * m.n_experts, "routed experts": m.top_k * 2 * 3 * d * m.expert_ffn,
                    "shared experts": 2 * 3 * d * m.n_shared_experts * m.expert_ffn}


def output_forward_flops(cfg: ModelConfig, vocab: int) -> float:
    """The output layer's, per token; `vocab`: its rows (the padded vocabulary)."""
    return 2 * cfg.d_model * vocab


def decoder_forward_flops(cfg: ModelConfig, seq_len: int, vocab: int) -> dict[str, float]:
    """Forward model FLOPs per token of the whole decoder by part, summed over its blocks (causal attention)."""
    total: dict[str, float] = {}
    for layer_id in range(cfg.n_layers):
        for part, flops in layer_forward_flops(cfg, layer_id >= cfg.n_dense_layers, causal_keys(seq_len)).items():
            total[part] = total.get(part, 0.0) + flops
    return total | {"output layer": output_forward_flops(cfg, vocab)}


def decoder_train_flops_per_token(cfg: ModelConfig, seq_len: int, vocab: int) -> float:
    return TRAIN_PASSES * sum(decoder_forward_flops(cfg, seq_len, vocab).values())
