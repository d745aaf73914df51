"""Protein sequences -> residue ids in the protein domain vocabulary."""

from __future__ import annotations

from typing import Any

import numpy as np

from scifm.data.features.sequence import encode_domain
from scifm.core.errors import DocumentFormatError

# the 20 standard residues, ambiguity codes B Z X, selenocysteine U, pyrrolysine O
AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWYBZXUO")


def featurize_protein(sequence: object, tokenizer: Any, max_len: int) -> dict[str, np.ndarray]:
    check_protein(sequence)
    check_residues_fit(len(sequence), max_len)
    return encode_domain(tokenizer, "protein", sequence, max_len, "bad_protein")


def check_residues_fit(n_residues: int, max_len: int) -> None:
    if n_residues > max_len:  # cropping would silently change the protein
        raise DocumentFormatError("too_long", f"{n_residues} residues > max_len {max_len}")


def check_protein(sequence: object) -> None:
    """DocumentFormatError for what no protein encoder takes, whatever its length limit."""
    if not isinstance(sequence, str) or not sequence:
        raise DocumentFormatError("bad_protein", "'sequence' must be a non-empty string")
    bad = sorted(set(sequence) - AMINO_ACIDS)
    if bad:
        raise DocumentFormatError("bad_protein", f"letters outside the amino-acid alphabet: {''.join(bad)!r}")
