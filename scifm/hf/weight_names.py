"""scifm decoder parameters <-> transformers checkpoint tensors (Qwen3-MoE, GLM-4.5-MoE).

Checkpoints on disk keep one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, [F, D]), the
format transformers writes and reads; scifm stacks experts as w1/w3 [E, D, F] and w2 [E, F, D], so
each expert's matrices are the transposes of its slices. Everything else is a rename.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from scifm.hf.architectures import GLM4_MOE

# SwiGLU w1/w3/w2 are transformers' gate/up/down projections, in dense FFNs, shared and routed experts
_SWIGLU_HF = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_RENAMES = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attention\.w([qkvo])\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"layers\.(\d+)\.attention\.([qk])_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
    (r"layers\.(\d+)\.moe\.router\.gate\.weight", r"model.layers.\1.mlp.gate.weight"),
    (r"layers\.(\d+)\.moe\.router\.expert_bias", r"model.layers.\1.mlp.gate.e_score_correction_bias"),
    *[(rf"layers\.(\d+)\.{ours}\.{w}\.weight", rf"model.layers.\1.{theirs}.{hf}.weight")
      for ours, theirs in (("feed_forward", "mlp"), ("moe\\.shared_experts", "mlp.shared_experts"))
      for w, hf in _SWIGLU_HF.items()],
]
_EXPERTS = re.compile(r"layers\.(\d+)\.moe\.experts\.(w[123])")


def is_decoder(name: str) -> bool:
    """Parameters the transformers model holds: everything but the modality encoders."""
    return not name.startswith("encoders.")


def hf_names(name: str, shape: torch.Size, arch: str) -> list[str]:
    """The transformers tensors that scifm parameter `name` becomes (one, or one per expert);
    [] for what the architecture does not keep (Qwen3-MoE has no expert bias)."""
    if m := _EXPERTS.fullmatch(name):
        layer, w = m.groups()
        return [f"model.layers.{layer}.mlp.experts.{e}.{_SWIGLU_HF[w]}.weight" for e in range(shape[0])]
    if name.endswith("expert_bias") and arch != GLM4_MOE:
        return []
    for pattern, replacement in _RENAMES:
        if re.fullmatch(pattern, name):
            return [re.sub(pattern, replacement, name)]
    raise KeyError(f"no transformers name for scifm parameter {name}")


def to_hf(name: str, tensor: torch.Tensor, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) pairs for one scifm parameter; experts are split and transposed."""
    names = hf_names(name, tensor.shape, arch)
    if _EXPERTS.fullmatch(name):
        for e, hf_name in enumerate(names):
            yield hf_name, tensor[e].T.contiguous()
    else:
        yield from ((hf_name, tensor) for hf_name in names)


def from_hf(name: str, shape: torch.Size, arch: str, read) -> torch.Tensor:
    """scifm parameter `name` of `shape` assembled from the checkpoint through `read(hf_name)`."""
    names = hf_names(name, shape, arch)
    if _EXPERTS.fullmatch(name):
        return torch.stack([read(n).T for n in names])
    return read(names[0])
