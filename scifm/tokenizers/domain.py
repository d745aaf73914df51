"""A domain vocabulary: a splitter regex, a token list, and 256 byte tokens so any string round-trips."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, NamedTuple, Sequence

from scifm.tokenizers import latex, protein, smiles


class DomainSpec(NamedTuple):
    split: re.Pattern[str]  # total split: the pieces of any string concatenate back to it
    learnable: re.Pattern[str] | None  # pieces that training data may add to the vocabulary
    base_tokens: list[str]


SPECS: dict[str, DomainSpec] = {
    "smiles": DomainSpec(smiles.SPLIT, smiles.LEARNABLE, smiles.BASE_TOKENS),
    "protein": DomainSpec(protein.SPLIT, protein.LEARNABLE, protein.BASE_TOKENS),
    "latex": DomainSpec(latex.SPLIT, latex.LEARNABLE, latex.BASE_TOKENS),
}
DOMAINS: tuple[str, ...] = tuple(SPECS)

# Bounds the vocabulary on large corpora (user macros, exotic bracket atoms); rare ones spell out.
MAX_LEARNED = 1024
N_BYTES = 256


class DomainVocab:
    """Local ids: [0, len(tokens)) are tokens, then one id per byte value for the fallback."""

    def __init__(self, name: str, tokens: Sequence[str]):
        if name not in SPECS:
            raise ValueError(f"unknown domain {name!r}; expected one of {DOMAINS}")
        self.name = name
        self.tokens = list(tokens)
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        if len(self._ids) != len(self.tokens) or not all(isinstance(t, str) and t for t in self.tokens):
            raise ValueError(f"{name} vocabulary has duplicate or empty tokens")
        self._split = SPECS[name].split
        self.size = len(self.tokens) + N_BYTES

    @classmethod
    def build(cls, name: str, seen: Iterable[str] = ()) -> "DomainVocab":
        """Base tokens plus the learnable pieces of `seen`, most frequent first."""
        spec = SPECS[name]
        tokens = list(dict.fromkeys(spec.base_tokens))
        if spec.learnable is not None:
            known = set(tokens)
            counts = Counter(m for s in seen for m in spec.learnable.findall(s) if m not in known)
            tokens += [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_LEARNED]]
        return cls(name, tokens)

    def encode(self, s: str) -> list[int]:
        pieces = self._split.findall(s)
        known = list(map(self._ids.get, pieces))
        if None not in known:  # the common case, in one pass (proteins are thousands of pieces)
            return known
        out: list[int] = []
        for piece, tid in zip(pieces, known):
            if tid is not None:
                out.append(tid)
                continue
            for ch in piece:  # unknown unit: spell it, bytes for characters without a token
                cid = self._ids.get(ch)
                if cid is not None:
                    out.append(cid)
                else:
                    out.extend(len(self.tokens) + b for b in ch.encode("utf-8"))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        pending = bytearray()  # consecutive byte ids form one UTF-8 run
        for i in ids:
            if not 0 <= i < self.size:
                raise ValueError(f"id {i} is outside the {self.name} vocabulary (size {self.size})")
            if i >= len(self.tokens):
                pending.append(i - len(self.tokens))
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            out.append(self.tokens[i])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_dict(self) -> dict:
        # Tokens are stored in full, so a later change of the base lists never shifts saved ids.
        return {"name": self.name, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "DomainVocab":
        return cls(d["name"], d["tokens"])
