"""Protein domain: one token per residue letter; anything else falls back to byte tokens."""

from __future__ import annotations

import re

SPLIT = re.compile(r".", re.DOTALL)

# Nothing is learned: the residue alphabet is closed.
LEARNABLE = None

STANDARD = "ACDEFGHIKLMNPQRSTVWY"
# IUPAC ambiguity/rare residues (B, Z, X, U, O), stop `*` and gap `-`.
BASE_TOKENS: list[str] = list(STANDARD + "BZXUO") + ["*", "-"]
