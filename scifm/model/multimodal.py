"""The whole model: token embeddings, modality encoders spliced in at their slots, MoE decoder.

Layers live in a ModuleDict keyed by layer index, so a part of the model (a pipeline stage) can
hold some of them under the full model's parameter names (checkpoints reshard by name). A part
may also lack the embeddings and encoders (it then takes hidden states) or the final norm and
output layer (it then returns hidden states): forward skips a module that is None.
"""

from __future__ import annotations

import torch
from torch import nn

from scifm.model.attention import document_causal_mask
from scifm.model.config import ModelConfig
from scifm.model.encoders import build_encoders
from scifm.model.kv_cache import KVCache
from scifm.model.layers import RMSNorm, rope_cos_sin
from scifm.model.transformer import TransformerBlock


class ScientificMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_sizes: dict[str, int]):
        """`vocab_sizes`: "total" (decoder vocabulary), "text", "latex", "protein" (encoder inputs)."""
        super().__init__()
        self.cfg = cfg
        vocab = cfg.vocab_size or vocab_sizes["total"]
        self.tok_embeddings = nn.Embedding(vocab, cfg.d_model)
        self.encoders = build_encoders(cfg.encoders, cfg.d_model, vocab_sizes)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, vocab, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def embed(self, input_ids_BS: torch.Tensor, items: dict, slot_index: dict) -> torch.Tensor:
        """Token embeddings with every item's projected encoder output written into its slots."""
        h_BSD = self.tok_embeddings(input_ids_BS)
        B, S, D = h_BSD.shape
        h_TD = h_BSD.reshape(B * S, D)
        # a fixed order (not the batch's): sharded encoders gather their weights in the same order
        # on every data-parallel rank
        for modality, encoder in self.encoders.items():
            if modality not in items:
                continue
            out_NKD = encoder(items[modality])
            idx_NK = slot_index[modality]
            if idx_NK.shape[0] == 0:
                # a placeholder item: keeps the encoder in the graph (zero gradient), writes nothing
                h_TD = h_TD + 0.0 * out_NKD.sum().to(h_TD.dtype)
                continue
            h_TD = h_TD.index_copy(0, idx_NK.reshape(-1), out_NKD.reshape(-1, D).to(h_TD.dtype))
        return h_TD.reshape(B, S, D)

    def forward(
        self,
        x: torch.Tensor,
        positions_BS: torch.Tensor,
        doc_ids_BS: torch.Tensor,
        items: dict[str, dict[str, torch.Tensor]] | None = None,
        slot_index: dict[str, torch.Tensor] | None = None,
        *,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: input_ids [B, S], or hidden states [B, S, D] where tok_embeddings is absent. Returns
        logits [B, S, V], or hidden states where the output layer is absent. With a cache the tokens
        continue the cached ones (their positions and doc ids given by the caller) and attend to them
        document-causally; the cache grows by S. Items come with the prompt only."""
        h_BSD = x if self.tok_embeddings is None else self.embed(x, items or {}, slot_index or {})
        cos, sin = rope_cos_sin(positions_BS, self.cfg.rotary_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        if cache is None:
            mask_B1SS = document_causal_mask(doc_ids_BS)
            for layer in self.layers.values():
                h_BSD = layer(h_BSD, cos, sin, mask_B1SS)
        else:
            mask_B1ST = cache.extend(doc_ids_BS)
            for key, layer in self.layers.items():
                h_BSD = layer(h_BSD, cos, sin, mask_B1ST, cache=cache.layer(key))
        if self.norm is not None:
            h_BSD = self.norm(h_BSD)
        return h_BSD if self.output is None else self.output(h_BSD)


# the decoder vocabulary is padded (never-seen rows) so any tensor-parallel degree up to this divides
# it, and the padded size, hence the initial weights, is the same under every layout
VOCAB_MULTIPLE = 64


def vocab_sizes_of(tokenizer) -> dict[str, int]:
    return {
        "total": -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        "text": tokenizer.text_vocab_size,
        "latex": tokenizer.domain("latex").size,
        "protein": tokenizer.domain("protein").size,
    }
