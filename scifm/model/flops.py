"""Model FLOPs of the decoder per token, by part: the numerator of MFU and the compute of a step.

A matmul of an [n, a] input with an [a, b] weight is 2ab FLOPs per row; a training step is three
forward passes' worth (forward, then input and weight gradients). Attention scores and values are
counted over the keys a causal query sees on average, (S + 1) / 2, as the work the problem needs
(a kernel that computes masked blocks does more, which MFU then shows as waste). Norms, RoPE,
activations and the router's softmax are left out: they are not matmuls and are small.
"""

from __future__ import annotations

from scifm.model.config import ModelConfig

TRAIN_PASSES = 3  # forward + backward (grad of inputs + grad of weights)


def decoder_forward_flops(cfg: ModelConfig, seq_len: int, vocab: int) -> dict[str, float]:
    """Forward FLOPs per token of each part of the decoder, summed over its layers.
    `vocab`: the output layer's rows (the padded vocabulary)."""
    d, dh = cfg.d_model, cfg.dim_per_head
    q_out, kv_out = cfg.n_heads * dh, cfg.n_kv_heads * dh
    n_moe = cfg.n_layers - cfg.n_dense_layers
    moe = cfg.moe
    keys_seen = (seq_len + 1) / 2
    return {
        "attention projections": cfg.n_layers * 2 * d * (2 * q_out + 2 * kv_out),
        "attention scores and values": cfg.n_layers * 2 * 2 * q_out * keys_seen,
        "dense feed-forward": cfg.n_dense_layers * 2 * 3 * d * cfg.ffn_hidden,
        "router": n_moe * 2 * d * moe.n_experts,
        "routed experts": n_moe * moe.top_k * 2 * 3 * d * moe.expert_ffn,
        "shared experts": n_moe * 2 * 3 * d * moe.n_shared_experts * moe.expert_ffn,
        "output layer": 2 * d * vocab,
    }


def decoder_train_flops_per_token(cfg: ModelConfig, seq_len: int, vocab: int) -> float:
    return TRAIN_PASSES * sum(decoder_forward_flops(cfg, seq_len, vocab).values())
