"""Decoder configurations between scifm (ModelConfig) and transformers' config.json.

Two architectures cover scifm's MoE options: Qwen3-MoE (softmax top-k routing, q/k norms, no shared
experts, no expert groups) and GLM-4.5-MoE (`glm4_moe`: sigmoid routing with a correction bias,
group-limited routing, shared experts, dense first layers, partial RoPE, q/k/v biases). Every
setting that changes logits maps to a ModelConfig key; one that neither side can represent is
refused in one line naming the key.
"""

from __future__ import annotations

import dataclasses

from scifm.core.errors import ConfigError
from scifm.model.config import ModelConfig

QWEN3_MOE, GLM4_MOE = "qwen3_moe", "glm4_moe"
CLASS_NAMES = {QWEN3_MOE: "Qwen3MoeForCausalLM", GLM4_MOE: "Glm4MoeForCausalLM"}


class UnsupportedArchitecture(ConfigError):
    """A checkpoint or model whose architecture has a feature the other side lacks."""


def _rope(hf: dict, where: str) -> tuple[float, float, float]:
    """(theta, fraction, linear scaling) from `rope_parameters` (transformers 5) or the older
    top-level `rope_theta` / `partial_rotary_factor` / `rope_scaling`."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), float(fraction), 1.0
    if kind == "linear":
        return float(theta), float(fraction), float(params["factor"])
    raise UnsupportedArchitecture(f"{where}: rope_parameters.rope_type={kind!r} is not supported; scifm has "
                                  "'default' and 'linear' RoPE")


def _require_equal(hf: dict, key: str, allowed, where: str, default=None) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise UnsupportedArchitecture(f"{where}: {key}={value!r} is not supported; scifm takes {allowed[0]!r}")


class _Keys(dict):
    """config.json whose missing required key is a one-line error; a tuple key tries each spelling."""

    where = ""

    def __missing__(self, key):
        for spelling in key if isinstance(key, tuple) else ():
            if spelling in self:
                return self[spelling]
        raise UnsupportedArchitecture(f"{self.where}: lacks {key if isinstance(key, str) else key[0]!r}")


def model_config_from_hf(hf_json: dict, base: ModelConfig, where: str) -> ModelConfig:
    """`base` with its decoder keys replaced by the checkpoint's; keeps the training-only keys
    (max_seq_len, init_std, the auxiliary losses, the bias update rate, capacity) and the encoders."""
    hf = _Keys(hf_json)
    hf.where = where
    arch = hf.get("model_type")
    if arch not in CLASS_NAMES:
        raise UnsupportedArchitecture(f"{where}: model_type={arch!r} is not supported; scifm imports "
                                      f"{' and '.join(CLASS_NAMES)}")
    _require_equal(hf, "hidden_act", ["silu"], where, "silu")
    theta, fraction, scaling = _rope(hf, where)
    n_layers = hf["num_hidden_layers"]
    common = dict(
        vocab_size=0, d_model=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or 0, ffn_hidden=hf["intermediate_size"], rope_theta=theta,
        rope_fraction=fraction, rope_scaling=scaling, norm_eps=hf["rms_norm_eps"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if arch == QWEN3_MOE:
        _require_equal(hf, "use_sliding_window", [False], where, False)
        _require_equal(hf, "decoder_sparse_step", [1], where, 1)
        dense = sorted(hf.get("mlp_only_layers") or [])
        if dense != list(range(len(dense))):
            raise UnsupportedArchitecture(f"{where}: mlp_only_layers={dense} is not supported; scifm's dense "
                                          "layers are the first ones (e.g. [0, 1])")
        layer = dict(n_dense_layers=len(dense), qk_norm=True,
                     attention_bias="all" if hf.get("attention_bias") else "none")
        moe = dict(n_experts=hf["num_experts", "num_local_experts"], top_k=hf["num_experts_per_tok"], n_groups=1, topk_groups=1,
                   expert_ffn=hf["moe_intermediate_size"], n_shared_experts=0, score_func="softmax",
                   route_scale=1.0, norm_topk_prob=bool(hf.get("norm_topk_prob", False)), router_dtype="input")
    else:
        layer = dict(n_dense_layers=hf.get("first_k_dense_replace", 1), qk_norm=bool(hf.get("use_qk_norm", False)),
                     attention_bias="qkv" if hf.get("attention_bias") else "none")
        moe = dict(n_experts=hf["n_routed_experts", "num_local_experts"], top_k=hf["num_experts_per_tok"], n_groups=hf.get("n_group", 1),
                   topk_groups=hf.get("topk_group", 1), expert_ffn=hf["moe_intermediate_size"],
                   n_shared_experts=hf.get("n_shared_experts", 1), score_func="sigmoid",
                   route_scale=float(hf.get("routed_scaling_factor", 1.0)),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", True)), router_dtype="fp32")
    cfg = dataclasses.replace(base, **common, **layer, moe=dataclasses.replace(base.moe, **moe))
    try:
        cfg.validate()
    except ConfigError as err:
        raise UnsupportedArchitecture(f"{where}: the imported configuration is invalid for scifm ({err})") from None
    return cfg


def architecture_for(cfg: ModelConfig, expert_bias_used: bool) -> str:
    """The transformers architecture that computes this model's logits exactly; one line naming
    the first key that rules each one out when none does."""
    moe = cfg.moe
    if moe.score_func == "softmax":
        blockers = [
            (not cfg.qk_norm, "model.qk_norm", "false (qwen3_moe always normalises q and k)"),
            (moe.n_shared_experts > 0, "model.moe.n_shared_experts", f"{moe.n_shared_experts} (qwen3_moe has none)"),
            (moe.n_groups > 1 and moe.topk_groups < moe.n_groups, "model.moe.topk_groups",
             "limits routing to some expert groups (qwen3_moe has no groups)"),
            (moe.route_scale != 1.0, "model.moe.route_scale", f"{moe.route_scale} (qwen3_moe has no routed scaling)"),
            (cfg.rope_fraction != 1.0, "model.rope_fraction", f"{cfg.rope_fraction} (qwen3_moe rotates whole heads)"),
            (cfg.attention_bias == "qkv", "model.attention_bias", "qkv (qwen3_moe's bias covers the output too)"),
            (expert_bias_used, "model.moe.bias_update_rate",
             "left a nonzero expert bias (qwen3_moe has no correction bias)"),
        ]
        arch, hint = QWEN3_MOE, "glm4_moe takes the others with model.moe.score_func=sigmoid"
    else:
        blockers = [(cfg.attention_bias == "all", "model.attention_bias",
                     "all (glm4_moe has no output projection bias)")]
        arch, hint = GLM4_MOE, "qwen3_moe routes with softmax"
    for blocked, key, why in blockers:
        if blocked:
            raise UnsupportedArchitecture(f"{key}: {why}; no supported transformers architecture computes this "
                                          f"model ({arch} is the one for score_func={moe.score_func}; {hint})")
    return arch


def hf_config(cfg: ModelConfig, arch: str, vocab_size: int, special_ids: dict[str, int]) -> dict:
    """config.json for `arch`; `special_ids` gives bos/eos/pad token ids."""
    moe = cfg.moe
    rope: dict = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling != 1.0:
        rope.update(rope_type="linear", factor=cfg.rope_scaling)
    common = {
        "architectures": [CLASS_NAMES[arch]], "model_type": arch, "vocab_size": vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.dim_per_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "moe_intermediate_size": moe.expert_ffn, "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob, "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": special_ids["bos"], "eos_token_id": special_ids["eos"], "pad_token_id": special_ids["pad"],
        "dtype": "float32",
    }
    if arch == QWEN3_MOE:
        return common | {
            "rope_parameters": rope, "attention_bias": cfg.attention_bias == "all", "use_sliding_window": False,
            "sliding_window": None, "decoder_sparse_step": 1, "mlp_only_layers": list(range(cfg.n_dense_layers)),
            "num_experts": moe.n_experts, "router_aux_loss_coef": moe.aux_loss_coef,
            "output_router_logits": False,
        }
    return common | {
        "rope_parameters": rope | {"partial_rotary_factor": cfg.rope_fraction},
        "attention_bias": cfg.attention_bias == "qkv", "use_qk_norm": cfg.qk_norm,
        "first_k_dense_replace": cfg.n_dense_layers, "n_routed_experts": moe.n_experts,
        "n_shared_experts": moe.n_shared_experts, "n_group": moe.n_groups, "topk_group": moe.topk_groups,
        "routed_scaling_factor": moe.route_scale, "num_nextn_predict_layers": 0,
    }
