"""SMILES domain: atom-level split (the regex of Schwaller et al., Molecular Transformer) and base tokens."""

from __future__ import annotations

import re

from scifm.tokenizers.charset import PRINTABLE_ASCII

# Bracket atoms, two-letter organic atoms, organic subset, aromatic atoms, bonds, branches, ring
# closures (%nn and digits); the trailing `.` makes the split total so any string round-trips.
SPLIT = re.compile(
    r"\[[^\]]+\]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9]|.",
    re.DOTALL,
)

# Only multi-character units are worth learning: single characters already have tokens.
LEARNABLE = re.compile(r"\[[^\]]+\]|%[0-9]{2}")

_ORGANIC = ["B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I", "b", "c", "n", "o", "p", "s"]
_BRACKETS = [
    "[C@H]", "[C@@H]", "[C@]", "[C@@]", "[nH]", "[NH]", "[NH+]", "[NH2+]", "[NH3+]", "[N+]", "[N-]",
    "[n+]", "[n-]", "[O-]", "[O+]", "[OH-]", "[S+]", "[S-]", "[s+]", "[P+]", "[B-]", "[H]", "[2H]",
    "[H+]", "[Si]", "[Se]", "[se]", "[Na+]", "[K+]", "[Li+]", "[Cl-]", "[Br-]", "[I-]", "[F-]",
    "[Ca+2]", "[Mg+2]", "[Zn+2]", "[Fe+2]", "[Fe+3]", "[Cu+2]", "[Pt]", "[Fe]", "[Na]", "[K]",
    "[Sn]", "[As]", "[Hg]", "[Al]", "[13C]", "[13CH]", "[14C]", "[CH2]", "[CH]", "[C-]", "[c-]",
]
_RING_CLOSURES = [f"%{i}" for i in range(10, 100)]

BASE_TOKENS: list[str] = PRINTABLE_ASCII + _ORGANIC + _BRACKETS + _RING_CLOSURES
