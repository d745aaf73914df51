"""The model's parameters as the planner needs them: each tensor's full shape, where it sits
(front = embeddings and encoders, a decoder layer, back = final norm and output) and how the
layouts split it (the tensor-parallel dimension of parallel/tensor_parallel.py's plan, or the expert
dimension). Built on the meta device, so a 1T-parameter config costs no memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from scifm.core.errors import ConfigError
from scifm.model.config import ModelConfig
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.tokenizers.scientific import ScientificTokenizer

# vocabulary sizes where no tokenizer is given: the decoder's (model.vocab_size or this), and the
# encoders' input vocabularies (a few hundred thousand parameters at most)
TYPICAL_VOCAB = 32000


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int, ...]
    tp_dim: int | None  # the dimension tensor parallelism splits (None: replicated on the tp ranks)
    expert: bool  # stacked routed experts [E, ...]: split over ep on dimension 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


# parameter-name suffixes inside a block or at the top level -> the dimension tp splits
# (column-parallel weights and biases: 0, row-parallel weights: 1), as tensor_parallel.py plans them
_TP_DIMS = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "attention.wq.bias": 0, "attention.wk.bias": 0, "attention.wv.bias": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "moe.shared_experts.w1.weight": 0, "moe.shared_experts.w3.weight": 0, "moe.shared_experts.w2.weight": 1,
    "tok_embeddings.weight": 0, "output.weight": 0,
}


@dataclass(frozen=True)
class ModelShapes:
    cfg: ModelConfig
    vocab: int  # the decoder's (padded) vocabulary
    front: tuple[Tensor, ...]  # token embeddings and encoders: the first pipeline stage
    layers: tuple[tuple[Tensor, ...], ...]  # per decoder layer
    back: tuple[Tensor, ...]  # final norm and output layer: the last pipeline stage
    n_encoders: int  # modality encoders (front[1:]): each is its own FSDP unit
    total_params: int
    active_params: int  # per token: top_k routed experts of each MoE layer

    @property
    def moe_layer_ids(self) -> list[int]:
        return list(range(self.cfg.n_dense_layers, self.cfg.n_layers))


def vocab_sizes(cfg: ModelConfig, tokenizer_dir: str = "") -> dict[str, int]:
    """The sizes ScientificMoE takes: a saved tokenizer's, or typical ones (model.vocab_size wins)."""
    if tokenizer_dir:
        if not (Path(tokenizer_dir) / "tokenizer.json").exists():
            raise ConfigError(f"plan.tokenizer: {tokenizer_dir} holds no saved tokenizer (tokenizer.json)")
        return vocab_sizes_of(ScientificTokenizer.load(tokenizer_dir))
    vocab = cfg.vocab_size or TYPICAL_VOCAB
    return {"total": vocab, "text": vocab, "latex": 1024, "protein": 32}


def meta_model(cfg: ModelConfig, sizes: dict[str, int]) -> ScientificMoE:
    with torch.device("meta"):
        return ScientificMoE(cfg, sizes)


def model_shapes(cfg: ModelConfig, sizes: dict[str, int]) -> ModelShapes:
    from scifm.model.transformer import count_params

    model = meta_model(cfg, sizes)
    front, back, layers = [], [], [[] for _ in range(cfg.n_layers)]
    # the token embedding comes first (memory_model reads it as front[0]); a tied output matrix is
    # listed once, as the embedding
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "layers":
            suffix = ".".join(parts[2:])
            layers[int(parts[1])].append(Tensor(tuple(p.shape), _TP_DIMS.get(suffix), ".experts." in name))
        else:
            tensor = Tensor(tuple(p.shape), _TP_DIMS.get(name), False)
            (back if parts[0] in ("norm", "output") else front).append(tensor)
    total, active = count_params(model, cfg)
    interned: dict[tuple[Tensor, ...], tuple[Tensor, ...]] = {}  # one object per distinct layer: caches hit
    layer_tuples = tuple(interned.setdefault(tuple(layer), tuple(layer)) for layer in layers)
    return ModelShapes(cfg, model.output.weight.shape[0], tuple(front), layer_tuples, tuple(back),
                       len(model.encoders or {}), total, active)
