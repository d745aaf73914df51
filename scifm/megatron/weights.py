"""scifm decoder tensors <-> the tensors of the Megatron-Core GPTModel that build_megatron_decoder makes.

The layout is the local layer spec's: a fused `linear_qkv` per attention, gated `linear_fc1` = [gate; up],
routed experts as SequentialMLP (`mlp.experts.local_experts.{e}.linear_fc1/linear_fc2`, one nn.Linear
pair per expert; scifm stacks them as w1/w3 [E, M, F] and w2 [E, F, M]). GroupedMLP's `weight1/weight2`
(the legacy grouped-GEMM experts) and Transformer Engine's layouts are not mapped.

Both directions follow one plan derived from the ModelConfig, so a tensor the plan expects and the
state lacks, or one the state holds and the plan does not know, is a one-line CheckpointError naming it.
Only the decoder is mapped: `split_encoders` takes scifm's modality encoders out first; they stay scifm
modules, whose outputs reach Megatron's decoder as `decoder_input` embeddings. Two tensors have no
one-to-one counterpart: scifm's softmax routers keep an expert bias that must be zero (Megatron's
softmax router has none; from_megatron gives zeros back), and with tied embeddings scifm's state holds
the one matrix under both `tok_embeddings.weight` and `output.weight`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from scifm.core.errors import CheckpointError
from scifm.megatron import layouts
from scifm.megatron.config import refuse_unsupported
from scifm.model.config import ModelConfig

Tensors = list[torch.Tensor]


def _same(tensors: Tensors) -> Tensors:
    return tensors


@dataclass(frozen=True)
class _Group:
    """scifm tensors <-> Megatron tensors that are computed from each other, and how."""

    scifm: tuple[str, ...]
    megatron: tuple[str, ...]
    to_megatron: Callable[[Tensors], Tensors] = _same
    from_megatron: Callable[[Tensors], Tensors] = _same


def split_encoders(scifm_state: dict) -> tuple[dict, dict]:
    """(decoder tensors, modality encoder tensors) of a ScientificMoE state dict."""
    encoders = {k: v for k, v in scifm_state.items() if k.startswith("encoders.")}
    return {k: v for k, v in scifm_state.items() if k not in encoders}, encoders


def _attention(cfg: ModelConfig, i: int) -> list[_Group]:
    ours, theirs = f"layers.{i}.attention", f"decoder.layers.{i}.self_attention"

    def fuse(t: Tensors) -> Tensors:
        return [layouts.fuse_qkv(*t, cfg.n_kv_heads)]

    def split(t: Tensors) -> Tensors:
        return layouts.split_qkv(t[0], cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head)

    kinds = ("weight", "bias") if cfg.attention_bias == "qkv" else ("weight",)
    groups = [_Group(tuple(f"{ours}.w{p}.{kind}" for p in "qkv"), (f"{theirs}.linear_qkv.{kind}",), fuse, split)
              for kind in kinds]
    groups.append(_Group((f"{ours}.wo.weight",), (f"{theirs}.linear_proj.weight",)))
    if cfg.qk_norm:
        groups += [_Group((f"{ours}.{p}_norm.weight",), (f"{theirs}.{p}_layernorm.weight",)) for p in "qk"]
    return groups


def _swiglu(ours: str, theirs: str) -> list[_Group]:
    """scifm SwiGLU w1/w3/w2 (nn.Linear) <-> Megatron gated MLP linear_fc1/linear_fc2."""
    return [
        _Group((f"{ours}.w1.weight", f"{ours}.w3.weight"), (f"{theirs}.linear_fc1.weight",),
               lambda t: [layouts.fuse_gate_up(*t)], lambda t: layouts.split_gate_up(t[0])),
        _Group((f"{ours}.w2.weight",), (f"{theirs}.linear_fc2.weight",)),
    ]


def _expert_bias(cfg: ModelConfig, ours: str, theirs: str) -> _Group:
    if cfg.moe.score_func == "sigmoid":
        return _Group((ours,), (theirs,))

    def drop(t: Tensors) -> Tensors:
        if t[0].count_nonzero():
            raise CheckpointError(f"{ours} is nonzero, but Megatron's softmax router has no expert bias; "
                                  "this state does not come from a model Megatron can compute")
        return []

    return _Group((ours,), (), drop, lambda _: [torch.zeros(cfg.moe.n_experts, dtype=torch.float32)])


def _moe(cfg: ModelConfig, i: int) -> list[_Group]:
    ours, theirs = f"layers.{i}.moe", f"decoder.layers.{i}.mlp"
    experts = tuple(f"{theirs}.experts.local_experts.{e}.linear_fc{n}.weight"
                    for e in range(cfg.moe.n_experts) for n in (1, 2))
    groups = [
        _Group((f"{ours}.router.gate.weight",), (f"{theirs}.router.weight",)),
        _expert_bias(cfg, f"{ours}.router.expert_bias", f"{theirs}.router.expert_bias"),
        _Group(tuple(f"{ours}.experts.w{n}" for n in (1, 3, 2)), experts,
               lambda t: layouts.experts_to_megatron(*t), layouts.experts_from_megatron),
    ]
    if cfg.moe.n_shared_experts:
        groups += _swiglu(f"{ours}.shared_experts", f"{theirs}.shared_experts")
    return groups


def _embeddings(cfg: ModelConfig) -> list[_Group]:
    if not cfg.tie_embeddings:
        return [_Group(("tok_embeddings.weight",), ("embedding.word_embeddings.weight",)),
                _Group(("output.weight",), ("output_layer.weight",))]

    def one(t: Tensors) -> Tensors:
        if not torch.equal(*t):
            raise CheckpointError("output.weight differs from tok_embeddings.weight, but model.tie_embeddings "
                                  "says they are one matrix")
        return t[:1]

    return [_Group(("tok_embeddings.weight", "output.weight"), ("embedding.word_embeddings.weight",),
                   one, lambda t: [t[0], t[0]])]


def _plan(cfg: ModelConfig) -> list[_Group]:
    refuse_unsupported(cfg)  # a model Megatron cannot compute has no mapping either
    groups = _embeddings(cfg) + [_Group(("norm.weight",), ("decoder.final_layernorm.weight",))]
    for i in range(cfg.n_layers):
        groups += [_Group((f"layers.{i}.attention_norm.weight",), (f"decoder.layers.{i}.input_layernorm.weight",)),
                   _Group((f"layers.{i}.ffn_norm.weight",), (f"decoder.layers.{i}.pre_mlp_layernorm.weight",))]
        groups += _attention(cfg, i)
        dense = i < cfg.n_dense_layers
        groups += _swiglu(f"layers.{i}.feed_forward", f"decoder.layers.{i}.mlp") if dense else _moe(cfg, i)
    return groups


def megatron_sources(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """scifm decoder tensor name -> the Megatron tensors it is computed from."""
    return {name: g.megatron for g in _plan(cfg) for name in g.scifm}


Step = tuple[tuple[str, ...], tuple[str, ...], Callable[[Tensors], Tensors]]


def _convert(state: dict, steps: list[Step], source: str, target: str) -> dict:
    """Run each (input names, output names, function) step over `state`; source/target name the sides."""
    out: dict = {}
    for inputs, outputs, convert in steps:
        missing = [n for n in inputs if n not in state]
        if missing:
            raise CheckpointError(f"{source} tensor {missing[0]} is missing (the decoder of this model config has it)")
        out.update(zip(outputs, convert([state[n] for n in inputs])))
    known = {n for inputs, _, _ in steps for n in inputs}
    unknown = [n for n in state if n not in known]
    if unknown:
        hint = " (take the encoders out with split_encoders)" if unknown[0].startswith("encoders.") else ""
        raise CheckpointError(f"{source} tensor {unknown[0]} has no {target} counterpart in this model config's "
                              f"decoder{hint}")
    return out


def to_megatron(scifm_state: dict, cfg: ModelConfig) -> dict:
    """Megatron GPTModel state dict from scifm decoder tensors (see split_encoders)."""
    steps = [(g.scifm, g.megatron, g.to_megatron) for g in _plan(cfg)]
    return _convert(scifm_state, steps, "scifm", "megatron")


def from_megatron(megatron_state: dict, cfg: ModelConfig) -> dict:
    """scifm decoder tensors from a Megatron GPTModel state dict. Megatron's linears save an empty
    `_extra_state` (Transformer Engine's FP8 metadata slot, always None in the local spec); those are dropped."""
    extra = [k for k, v in megatron_state.items() if k.endswith("._extra_state")]
    filled = [k for k in extra if megatron_state[k] is not None]
    if filled:
        raise CheckpointError(f"megatron tensor {filled[0]} holds extra state (FP8 metadata of a Transformer Engine "
                              "layer); only the local layer spec's layout is mapped")
    tensors = {k: v for k, v in megatron_state.items() if k not in extra}
    steps = [(g.megatron, g.scifm, g.from_megatron) for g in _plan(cfg)]
    return _convert(tensors, steps, "megatron", "scifm")
