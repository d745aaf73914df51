"""Tiny random transformers checkpoints (built by transformers itself, offline) to import into scifm."""

from __future__ import annotations

from pathlib import Path

import torch

from scifm.tokenizers.bpe import train_bpe

PROSE = ["The enzyme binds its substrate in the active site.", "Water boils at 373 kelvin at sea level.",
         "Proteins fold into their native structure.", "The reaction rate doubles every ten degrees."] * 20
# the model reserves ids past its tokenizer's, as Qwen3's 151936 rows do past 151665 tokens
MODEL_VOCAB = 448


def _common() -> dict:
    return dict(vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                num_experts_per_tok=2, initializer_range=0.05, rms_norm_eps=1e-6)


def build_hf_model(arch: str, out: Path, **overrides) -> Path:
    """A 4-layer checkpoint (1 dense + 3 MoE) with a byte-level BPE tokenizer.json; the norms, biases
    and GLM's correction bias are randomised too, so every tensor changes the logits."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    if arch == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**(_common() | dict(num_experts=8, mlp_only_layers=[0],
                                                                       norm_topk_prob=True) | overrides)))
    else:
        model = Glm4MoeForCausalLM(Glm4MoeConfig(**(_common() | dict(
            n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, num_nextn_predict_layers=0) | overrides)))
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("norm.weight", "bias")):
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    model.save_pretrained(out)
    bpe = train_bpe(PROSE, 400)
    bpe.add_special_tokens(["<|endoftext|>"])
    bpe.save(str(out / "tokenizer.json"))
    return out
