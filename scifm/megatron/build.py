"""scifm's decoder built as a Megatron-Core GPTModel."""

from __future__ import annotations

import dataclasses

import torch

from scifm.megatron.config import gpt_model_args, megatron_config
from scifm.model.config import ModelConfig


class _TorchRMSNorm:
    """torch's RMSNorm, built as the local spec's WrappedTorchNorm builds it, without that builder's
    refusal of sequence parallelism: the refusal guards Megatron's own gradient reduction, which finds
    only weights marked `sequence_parallel`; scifm's engine sums these weights' gradients over the
    tensor-parallel ranks itself (megatron_engine.MegatronRunner)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        return torch.nn.RMSNorm(hidden_size, eps=eps)


def _swap(spec, old: type, new: type):
    """A layer spec (ModuleSpec, submodules dataclass, list, class) with every `old` module replaced by `new`."""
    if spec is old:
        return new
    if isinstance(spec, list):
        return [_swap(s, old, new) for s in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _swap(getattr(spec, f.name), old, new)
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


def build_megatron_decoder(cfg: ModelConfig, vocab_size: int, *, params_dtype: torch.dtype = torch.float32,
                           **model_parallel):
    """A Megatron GPTModel (embedding, pre-norm blocks, final norm, output layer) that computes scifm's
    decoder: `to_megatron` fills it from a ScientificMoE's decoder tensors and its parameter count
    equals theirs. Under pipeline parallelism (`pipeline_model_parallel_size` and a
    `pipeline_model_parallel_layout` among `model_parallel`) it is this pp rank's stage, as Megatron's
    parallel state places it: the embedding on the first, the final norm and output layer on the last,
    its layers under local indices (`decoder.layers.0` is layer `layer_number - 1` of the model). What is compared is the transformer: scifm's modality encoders
    stay scifm modules, and their spliced embeddings enter through GPTModel's `decoder_input` ([S, B, M]),
    as Megatron's own multimodal models feed theirs. Packed documents become an `attention_mask`
    (True = masked) of scifm's document-causal mask; RoPE needs no restarted positions because each
    document then attends only within itself and rotary scores depend on position differences.

    Built with Megatron's local (non Transformer Engine) layer spec and CPU initialisation. Megatron's
    parallel state must be initialised first (one process is enough); `model_parallel` are
    megatron_config's Megatron parallel keys, which must agree with it. Its forward needs CUDA, and so does
    construction under score_func=sigmoid, whose routers allocate the expert bias on the current CUDA device.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = megatron_config(cfg, params_dtype=params_dtype, **model_parallel)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    # the final norm would be apex's FusedLayerNorm where apex is installed, and that has no RMSNorm
    spec = _swap(dataclasses.replace(spec, layer_norm=WrappedTorchNorm), WrappedTorchNorm, _TorchRMSNorm)
    return GPTModel(config, spec, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(), **gpt_model_args(cfg, vocab_size))
