"""Split text into prose, tags and domain spans (explicit tags first, then auto-detection in prose).

Pieces concatenate back to the input exactly: whitespace and punctuation around a span stay prose.
"""

from __future__ import annotations

import functools
import re

from rdkit import Chem, rdBase

Piece = tuple[str, str]  # (kind, text); kind is "text", "tag", or a domain name

# group name -> (open tag, close tag, domain)
_GROUPS: dict[str, tuple[str, str, str]] = {
    "smiles": ("<smiles>", "</smiles>", "smiles"),
    "protein": ("<protein>", "</protein>", "protein"),
    "latex": ("<latex>", "</latex>", "latex"),
    "display": ("$$", "$$", "latex"),
    "inline": ("$", "$", "latex"),
}
_EXPLICIT = re.compile(
    r"<smiles>(?P<smiles>.*?)</smiles>"
    r"|<protein>(?P<protein>.*?)</protein>"
    r"|<latex>(?P<latex>.*?)</latex>"
    r"|\$\$(?P<display>.+?)\$\$"
    # Pandoc's rule for `$...$`, so that prices ("$5 and $10") stay prose: no space inside the
    # delimiters, no digit right after the closing one, no escaped or doubled opening `$`.
    r"|(?<![\\$])\$(?P<inline>[^\s$][^\n$]*?(?<=[^\s\\]))\$(?!\d)",
    re.DOTALL,
)

SMILES_MIN_LEN = 10
PROTEIN_MIN_LEN = 27
# Residue letters of the protein vocabulary (20 standard + B, Z, X, U, O), as a whole word.
_PROTEIN_RUN = re.compile(r"(?<![A-Za-z])[ACDEFGHIKLMNPQRSTVWYBZXUO]{%d,}(?![A-Za-z])" % PROTEIN_MIN_LEN)
_SMILES_CHARS = re.compile(r"[A-Za-z0-9@+\-\[\]()=#$%/\\.:~*]+")
# a word of fewer characters is no SMILES (is_smiles), with or without its trailing punctuation
_SMILES_CANDIDATE = re.compile(r"\S{%d,}" % SMILES_MIN_LEN)
_NUMBER = re.compile(r"[+-]?[0-9.,]+(?:[eE][+-]?[0-9]+)?")
_SENTENCE_PUNCT = ".,;:!?"


def split_spans(text: str) -> list[Piece]:
    pieces: list[Piece] = []
    pos = 0
    for m in _EXPLICIT.finditer(text):
        pieces += _detect(text[pos : m.start()])
        group = m.lastgroup
        assert group is not None
        open_tag, close_tag, domain = _GROUPS[group]
        pieces += [("tag", open_tag), (domain, m.group(group)), ("tag", close_tag)]
        pos = m.end()
    pieces += _detect(text[pos:])
    return [p for p in pieces if p[1]]


def is_smiles(candidate: str) -> bool:
    """A long, non-word, non-number token made of SMILES characters that RDKit parses."""
    if len(candidate) < SMILES_MIN_LEN or candidate.isalpha() or _NUMBER.fullmatch(candidate):
        return False
    return _SMILES_CHARS.fullmatch(candidate) is not None and _rdkit_parses(candidate)


@functools.lru_cache(maxsize=1 << 16)  # corpora repeat the same molecules many times
def _rdkit_parses(candidate: str) -> bool:
    with rdBase.BlockLogs():  # a failed parse is the common case here, not worth a log line
        return Chem.MolFromSmiles(candidate) is not None


def _detect(prose: str) -> list[Piece]:
    pieces: list[Piece] = []
    pos = 0
    for m in _SMILES_CANDIDATE.finditer(prose):
        candidate = m.group().rstrip(_SENTENCE_PUNCT)
        if is_smiles(candidate):
            pieces += _proteins(prose[pos : m.start()])
            pieces.append(("smiles", candidate))
            pos = m.start() + len(candidate)
    return pieces + _proteins(prose[pos:])


def _proteins(prose: str) -> list[Piece]:
    pieces: list[Piece] = []
    pos = 0
    for m in _PROTEIN_RUN.finditer(prose):
        pieces += [("text", prose[pos : m.start()]), ("protein", m.group())]
        pos = m.end()
    pieces.append(("text", prose[pos:]))
    return pieces
