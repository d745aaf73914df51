"""scifm's decoder (ModelConfig) in Megatron-Core's keys: a TransformerConfig plus the GPTModel arguments
that Megatron keeps outside it (vocabulary, RoPE, tied embeddings).

Every mapping below computes what scifm computes; a setting Megatron cannot compute identically is
refused in one line naming the scifm key. Megatron-Core 0.16 behaviour each mapping relies on:

- Attention (transformer/attention.py): q, k, v are one fused `linear_qkv`; with `add_qkv_bias` it has
  a bias, and `add_bias_linear` would also put biases on the output projection *and* on every MLP,
  expert and router linear. q/k norms use `normalization` over each head, before RoPE.
- RoPE (models/common/embeddings): rotate-half on the first int(kv_channels * rotary_percent) dims,
  inverse frequencies base^(-2i/dim), positions multiplied by 1 / seq_len_interpolation_factor.
- Routing (transformer/moe/moe_utils.py, topk_routing_with_score_function):
  softmax, pre-softmax: top-k of softmax(logits), weights are those probabilities (scifm's
  norm_topk_prob=false); softmax after top-k: weights are softmax over the chosen logits, i.e. the
  chosen probabilities divided by their sum (norm_topk_prob=true). The expert bias is ignored.
  sigmoid: top-k of sigmoid(logits) + expert_bias, weights are the unbiased scores divided by their
  sum whenever top_k > 1 and never at top_k = 1. Both then multiply by moe_router_topk_scaling_factor.
  Group-limited routing scores a group by the sum of its top (top_k // group_topk) scores.
- The expert bias update (get_updated_expert_bias) is bias + rate * sign(mean load - load), scifm's rule.

Not carried here: the router's auxiliary losses. Megatron's `aux_loss` counts a plain top-k of the
unbiased scores over one micro-batch's tensor/context-parallel tokens, and `global_aux_loss` averages
over accumulation steps; scifm counts the routed assignments (after bias and group limit) over one
micro-batch of the whole data-parallel batch. Which one stands in for scifm's is the training
engine's decision, so load balancing is left off ("none") in this config.
"""

from __future__ import annotations

import torch

from scifm.core.errors import ConfigError
from scifm.model.config import ModelConfig


def _group_score_width(cfg: ModelConfig) -> int:
    """How many of a group's best scores scifm sums to rank the group (moe.Router._mask_groups)."""
    if cfg.moe.score_func == "sigmoid":
        return min(2, cfg.moe.n_experts // cfg.moe.n_groups)
    return 1


def has_moe_layers(cfg: ModelConfig) -> bool:
    return cfg.n_dense_layers < cfg.n_layers


def _group_limited(cfg: ModelConfig) -> bool:
    """scifm masks groups only when some are left out (topk_groups < n_groups)."""
    return cfg.moe.topk_groups < cfg.moe.n_groups


def refuse_unsupported(cfg: ModelConfig) -> None:
    """One ConfigError naming the first scifm key Megatron cannot compute identically."""
    blockers = [(cfg.attention_bias == "all", "model.attention_bias",
                 "'all' puts a bias on the attention output projection; Megatron's only attention-only bias "
                 "is add_qkv_bias (q, k, v; use 'qkv'), and add_bias_linear also adds biases to every MLP, "
                 "expert and router")]
    moe = cfg.moe
    if has_moe_layers(cfg):
        sigmoid = moe.score_func == "sigmoid"
        blockers += [
            (moe.capacity_factor > 0, "model.moe.capacity_factor",
             f"{moe.capacity_factor}: Megatron drops tokens over capacity in evaluation too, scifm's "
             "evaluation is dropless (use 0)"),
            (not sigmoid and moe.bias_update_rate > 0, "model.moe.bias_update_rate",
             f"{moe.bias_update_rate}: Megatron's expert bias exists only for score_func=sigmoid (its softmax "
             "router ignores it)"),
            (sigmoid and moe.norm_topk_prob != (moe.top_k > 1), "model.moe.norm_topk_prob",
             f"{moe.norm_topk_prob} with top_k={moe.top_k}: Megatron's sigmoid router divides the chosen "
             "scores by their sum exactly when top_k > 1"),
            (not sigmoid and moe.norm_topk_prob and moe.top_k == 1, "model.moe.norm_topk_prob",
             "true with top_k=1 weights every token's expert by 1; Megatron's softmax router at top-k 1 "
             "must run pre-softmax, which weights by the probability (use false)"),
            (_group_limited(cfg) and moe.top_k // moe.topk_groups != _group_score_width(cfg), "model.moe.top_k",
             f"{moe.top_k} with topk_groups={moe.topk_groups}: Megatron ranks a group by the sum of its best "
             f"top_k // topk_groups = {moe.top_k // moe.topk_groups} scores, scifm's {moe.score_func} router by "
             f"its best {_group_score_width(cfg)}; choose top_k with top_k // topk_groups = "
             f"{_group_score_width(cfg)}"),
        ]
    for blocked, key, why in blockers:
        if blocked:
            raise ConfigError(f"{key}: {why}; Megatron-Core cannot compute this model")


def _moe_keys(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    sigmoid = moe.score_func == "sigmoid"
    keys = dict(
        num_moe_experts=moe.n_experts,
        moe_ffn_hidden_size=moe.expert_ffn,
        moe_router_topk=moe.top_k,
        moe_layer_freq=[0] * cfg.n_dense_layers + [1] * (cfg.n_layers - cfg.n_dense_layers),
        moe_shared_expert_intermediate_size=moe.n_shared_experts * moe.expert_ffn or None,
        moe_router_score_function=moe.score_func,
        # softmax before top-k keeps the probabilities; after top-k renormalises them over the chosen
        moe_router_pre_softmax=not sigmoid and not moe.norm_topk_prob,
        moe_router_topk_scaling_factor=moe.route_scale if moe.route_scale != 1.0 else None,
        moe_router_dtype="fp32" if moe.router_dtype == "fp32" else None,
        # scifm's sigmoid router always chooses on score + expert_bias (a saved buffer)
        moe_router_enable_expert_bias=sigmoid,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        # SequentialMLP: one MLP per expert; GroupedMLP needs the grouped_gemm package and bf16
        moe_grouped_gemm=False,
    )
    if _group_limited(cfg):
        keys.update(moe_router_num_groups=moe.n_groups, moe_router_group_topk=moe.topk_groups)
    return keys


def megatron_config(cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32, **model_parallel):
    """megatron.core TransformerConfig computing scifm's decoder; ConfigError for what it cannot.
    `model_parallel`: Megatron's ModelParallelConfig keys (tensor_model_parallel_size, sequence_parallel)."""
    from megatron.core.transformer import TransformerConfig

    refuse_unsupported(cfg)
    return TransformerConfig(
        num_layers=cfg.n_layers,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_heads,
        num_query_groups=cfg.n_kv_heads,
        kv_channels=cfg.dim_per_head,
        ffn_hidden_size=cfg.ffn_hidden,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        qk_layernorm=cfg.qk_norm,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.attention_bias == "qkv",
        # scifm has no dropout
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # the distributions scifm draws from (residual-writing matrices at std / sqrt(2 * layers)), not its values
        init_method_std=cfg.init_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # weights are usually replaced by scifm's (to_megatron); CPU initialisation also runs without CUDA
        use_cpu_initialization=True,
        **model_parallel,
        **(_moe_keys(cfg) if has_moe_layers(cfg) else {}),
    )


def gpt_model_args(cfg: ModelConfig, vocab_size: int) -> dict:
    """GPTModel's keyword arguments beside the config and layer spec."""
    return dict(
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_seq_len,
        position_embedding_type="rope",
        rotary_percent=cfg.rope_fraction,
        rotary_base=cfg.rope_theta,
        seq_len_interpolation_factor=cfg.rope_scaling if cfg.rope_scaling != 1.0 else None,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
    )
