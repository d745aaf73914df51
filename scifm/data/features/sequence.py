"""Shared featurization of token sequences in a domain vocabulary (LaTeX, protein)."""

from __future__ import annotations

from typing import Any

import numpy as np

from scifm.data.features.padding import Groups
from scifm.core.errors import DocumentFormatError

# collate output: ids [B, L] int64 local domain ids, mask [B, L]
GROUPS: Groups = {"mask": ("ids",)}


def encode_domain(tokenizer: Any, domain: str, text: str, max_len: int, bad_reason: str) -> dict[str, np.ndarray]:
    try:
        ids = tokenizer.domain(domain).encode(text)
    except (KeyError, ValueError) as e:  # a domain vocabulary refuses characters it does not cover
        raise DocumentFormatError(bad_reason, f"does not tokenize in the {domain} vocabulary: {e}") from None
    if not ids:
        raise DocumentFormatError(bad_reason, f"no {domain} tokens")
    check_ids_fit(len(ids), domain, max_len)
    return {"ids": np.asarray(ids, dtype=np.int64)}


def check_ids_fit(n_ids: int, domain: str, max_len: int) -> None:
    if n_ids > max_len:
        raise DocumentFormatError("too_long", f"{n_ids} {domain} tokens > max_len {max_len}")
