"""Names of the 20 standard amino acids, shared by the protein and codon sources."""

from __future__ import annotations

from Bio.Data.IUPACData import protein_letters, protein_letters_1to3

STANDARD = frozenset(protein_letters)

NAMES: dict[str, str] = {
    "A": "alanine", "C": "cysteine", "D": "aspartic acid", "E": "glutamic acid", "F": "phenylalanine",
    "G": "glycine", "H": "histidine", "I": "isoleucine", "K": "lysine", "L": "leucine",
    "M": "methionine", "N": "asparagine", "P": "proline", "Q": "glutamine", "R": "arginine",
    "S": "serine", "T": "threonine", "V": "valine", "W": "tryptophan", "Y": "tyrosine",
}  # fmt: skip


def describe(letter: str) -> str:
    """'leucine (Leu, L)'."""
    return f"{NAMES[letter]} ({protein_letters_1to3[letter]}, {letter})"
