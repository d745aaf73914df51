"""Key/value cache for incremental (prefill + decode) inference.

Each layer keeps the keys (after RoPE) and values of every token fed so far; the cache also keeps
each cached token's document id, so that new queries attend document-causally over cache + new
tokens exactly as one full forward over the whole sequence would.

Shape suffixes: B batch, S new tokens, T cached + new tokens, K kv heads, D head_dim.
"""

from __future__ import annotations

import torch


class LayerKV:
    """One attention layer's cached keys and values, [B, K, T, D]."""

    def __init__(self) -> None:
        self.k_BKTD: torch.Tensor | None = None
        self.v_BKTD: torch.Tensor | None = None

    def append(self, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the new tokens' K/V and returns all of them (cached first, then new)."""
        if self.k_BKTD is None:
            self.k_BKTD, self.v_BKTD = k_BKSD, v_BKSD
        else:
            # concatenation copies, O(T) per step: fine for the short answers this serves
            self.k_BKTD = torch.cat([self.k_BKTD, k_BKSD], dim=2)
            self.v_BKTD = torch.cat([self.v_BKTD, v_BKSD], dim=2)
        return self.k_BKTD, self.v_BKTD


class KVCache:
    """The whole model's cache: one LayerKV per layer key and the document id of every cached token.

    Layers are keyed by the model's layer names (ModuleDict keys), so a model holding only some
    layers still finds its own.
    """

    def __init__(self) -> None:
        self.layers: dict[str, LayerKV] = {}
        self.doc_ids_BT: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.doc_ids_BT is None else self.doc_ids_BT.shape[1]

    def layer(self, key: str) -> LayerKV:
        return self.layers.setdefault(str(key), LayerKV())

    def extend(self, doc_ids_BS: torch.Tensor) -> torch.Tensor:
        """Records the new tokens' document ids; returns their mask over cache + new tokens.

        bool [B, 1, S, T]; True where new query i (the (T0 + i)-th token) may attend key j: same
        document and j <= T0 + i. With an empty cache this is document_causal_mask(doc_ids_BS).
        """
        T0, S = len(self), doc_ids_BS.shape[1]
        all_BT = doc_ids_BS if self.doc_ids_BT is None else torch.cat([self.doc_ids_BT, doc_ids_BS], dim=1)
        same_doc_BST = doc_ids_BS[:, :, None] == all_BT[:, None, :]
        causal_ST = torch.ones(S, T0 + S, dtype=torch.bool, device=doc_ids_BS.device).tril(T0)
        self.doc_ids_BT = all_BT
        return (same_doc_BST & causal_ST)[:, None]
