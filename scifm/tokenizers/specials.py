"""Special tokens: control, modality markers and slots, and inline-span tags, with their fixed order."""

from __future__ import annotations

from scifm.core.modalities import MODALITIES

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"

# Tags that switch the inline vocabulary; `$$` and `$` open and close LaTeX math.
TAGS: dict[str, str] = {
    "<smiles>": "smiles", "</smiles>": "smiles",
    "<protein>": "protein", "</protein>": "protein",
    "<latex>": "latex", "</latex>": "latex",
    "$$": "latex", "$": "latex",
}


def marker(kind: str, modality: str) -> str:
    """`marker("START", "molecule") == "[START_MOLECULE]"`; kind is START, END or SLOT."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    return f"[{kind}_{modality.upper()}]"


MARKERS: list[str] = [marker(kind, m) for m in MODALITIES for kind in ("START", "END", "SLOT")]
SPECIAL_TOKENS: list[str] = [PAD, BOS, EOS, *MARKERS, *TAGS]

# Not predicted by the LM: padding, the BOS it is conditioned on, and the marker/slot frame of an
# item, which the data pipeline inserts itself; everything else (EOS and tags too) is a target.
NON_TARGETS: list[str] = [PAD, BOS, *MARKERS]
