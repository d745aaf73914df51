"""Typed model configuration, mirrored by configs/model/*.yaml.

Plain dataclasses with primitive fields so Hydra/OmegaConf can type-check every override.
`validate()` raises ConfigError naming the key path; Hydra does not run __post_init__ during
merging, so validation is called explicitly after the config is resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scifm.core.checks import require
from scifm.core.encoders_config import EncodersConfig


@dataclass
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2
    n_groups: int = 1  # experts are split into groups; a token may use only topk_groups of them
    topk_groups: int = 1
    expert_ffn: int = 128
    n_shared_experts: int = 0
    score_func: str = "softmax"  # softmax | sigmoid
    route_scale: float = 1.0
    norm_topk_prob: bool = False  # divide the chosen experts' weights by their sum (before route_scale)
    router_dtype: str = "input"  # input (the router runs in the activations' dtype) | fp32
    aux_loss_coef: float = 0.01  # load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss
    bias_update_rate: float = 0.0  # >0 enables the auxiliary-loss-free bias update
    capacity_factor: float = 0.0  # 0 = no capacity limit (dropless)

    def validate(self, prefix: str = "model.moe") -> None:
        for key in ("n_experts", "n_groups", "expert_ffn"):
            require(getattr(self, key) >= 1, f"{prefix}.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(1 <= self.top_k <= self.n_experts, f"{prefix}.top_k",
                 f"must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        require(self.n_experts % self.n_groups == 0, f"{prefix}.n_groups",
                 f"n_experts={self.n_experts} is not divisible by n_groups={self.n_groups}")
        require(1 <= self.topk_groups <= self.n_groups, f"{prefix}.topk_groups",
                 f"must be in [1, n_groups={self.n_groups}], got {self.topk_groups}")
        require(self.top_k <= self.topk_groups * (self.n_experts // self.n_groups), f"{prefix}.top_k",
                 f"top_k={self.top_k} exceeds the experts in topk_groups={self.topk_groups} groups")
        require(self.score_func in ("softmax", "sigmoid"), f"{prefix}.score_func",
                 f"must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        require(self.router_dtype in ("input", "fp32"), f"{prefix}.router_dtype",
                 f"must be 'input' or 'fp32', got {self.router_dtype!r}")
        # 0 scales the routed experts' output away; a negative scale flips it
        require(self.route_scale > 0, f"{prefix}.route_scale", f"must be > 0, got {self.route_scale}")
        # negative values would reward imbalance (losses) or push the bias the wrong way
        for key in ("n_shared_experts", "aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor"):
            require(getattr(self, key) >= 0, f"{prefix}.{key}", f"must be >= 0, got {getattr(self, key)}")


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 0  # 0 = taken from the tokenizer at build time
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0 = d_model // n_heads
    ffn_hidden: int = 384  # dense SwiGLU blocks
    n_dense_layers: int = 1  # the first k blocks are dense, the rest MoE
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's dimensions that RoPE rotates (the first ones)
    rope_scaling: float = 1.0  # linear position interpolation: frequencies divided by this factor
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    attention_bias: str = "none"  # none | qkv (biases on q, k, v) | all (and on the output projection)
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    # queries per SDPA call: with causal masks a block's queries see no key after its last one, so
    # the keys after it are left out of the call (about half the attention work); 0 = one call
    attention_query_block: int = 256
    tie_embeddings: bool = False
    init_std: float = 0.02
    # start the decoder (and the prose tokenizer) from a pretrained checkpoint: "hf:DIR", a local
    # transformers model directory; its architecture replaces the decoder keys above
    init_from: str = ""
    moe: MoEConfig = field(default_factory=MoEConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rope_fraction)

    def validate(self) -> None:
        require(self.vocab_size >= 0, "model.vocab_size", f"must be >= 0 (0 = the tokenizer's), got {self.vocab_size}")
        for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
            require(getattr(self, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.head_dim >= 0, "model.head_dim", f"must be >= 0 (0 = d_model // n_heads), got {self.head_dim}")
        require(self.n_heads % self.n_kv_heads == 0, "model.n_kv_heads",
                 f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        require(self.head_dim > 0 or self.d_model % self.n_heads == 0, "model.n_heads",
                 f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set model.head_dim")
        require(0 < self.rope_fraction <= 1, "model.rope_fraction", f"must be in (0, 1], got {self.rope_fraction}")
        require(self.rotary_dim % 2 == 0 and self.rotary_dim > 0, "model.rope_fraction",
                 f"RoPE needs an even number of rotated dimensions; head_dim {self.dim_per_head} x "
                 f"{self.rope_fraction} = {self.rotary_dim}")
        require(self.attention_bias in ("none", "qkv", "all"), "model.attention_bias",
                 f"must be 'none', 'qkv' or 'all', got {self.attention_bias!r}")
        require(not self.init_from or self.init_from.startswith("hf:") and len(self.init_from) > 3,
                 "model.init_from", f"must be hf:DIR (a local transformers model directory), got {self.init_from!r}")
        require(0 <= self.n_dense_layers <= self.n_layers, "model.n_dense_layers",
                 f"must be in [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        require(self.max_seq_len >= 8, "model.max_seq_len", "must be >= 8")
        require(self.attention_query_block >= 0, "model.attention_query_block",
                 f"must be >= 0 (0 = one attention call), got {self.attention_query_block}")
        # RoPE divides by rope_theta's powers; RMSNorm divides by sqrt(mean + eps) (0 gives NaN on a zero row)
        for key in ("rope_theta", "rope_scaling", "norm_eps"):
            require(getattr(self, key) > 0, f"model.{key}", f"must be > 0, got {getattr(self, key)}")
        # 0 starts every weight at zero (no symmetry breaking); torch rejects a negative std
        require(self.init_std > 0, "model.init_std", f"must be > 0, got {self.init_std}")
        self.moe.validate()
        self.encoders.validate()
