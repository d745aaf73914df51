"""ScientificTokenizer: prose BPE + special tokens + SMILES/protein/LaTeX vocabularies in one id space.

Id layout (total `vocab_size`):
  [0, B)                         byte-level BPE for prose (HF `tokenizer.json`, B <= the trained target);
                                 a pretrained tokenizer's block is its model's vocabulary (`text_ids`),
                                 which may reserve ids past the tokenizer's own
  [B, text_vocab_size)           special tokens in `specials.SPECIAL_TOKENS` order: PAD, BOS, EOS,
                                 START/END/SLOT per modality, inline tags (<smiles>, ..., $$, $)
  then one block per domain      smiles, protein, latex (`domain_offset(name)`), each ending in 256
                                 byte-fallback ids
The special tokens are not in the BPE: a `$` special would take the id of the byte `$`, and a literal
"[PAD]" in prose would be read as padding. Prose is always plain bytes to the BPE.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tokenizers import Tokenizer

from scifm.core.errors import ScifmError
from scifm.core.modalities import MODALITIES
from scifm.tokenizers.bpe import BYTE_ALPHABET_SIZE, train_bpe
from scifm.tokenizers.domain import DOMAINS, DomainVocab
from scifm.tokenizers.spans import split_spans
from scifm.tokenizers.specials import BOS, EOS, NON_TARGETS, PAD, SPECIAL_TOKENS, marker

BPE_FILE = "tokenizer.json"
DOMAINS_FILE = "domains.json"
FORMAT = "scifm-tokenizer/1"


class TokenizerError(ScifmError):
    """A tokenizer directory is missing or corrupt, or training was asked for an impossible size."""


class ScientificTokenizer:
    def __init__(self, bpe: Tokenizer, domains: Sequence[DomainVocab], special_tokens: Sequence[str],
                 text_ids: int | None = None):
        """`text_ids`: ids given to prose, from 0 (default: the BPE's vocabulary, added tokens included)."""
        self._bpe = bpe
        self._domains = {d.name: d for d in domains}
        if tuple(self._domains) != DOMAINS:
            raise ValueError(f"domains must be {DOMAINS} in that order, got {tuple(self._domains)}")
        missing = set(SPECIAL_TOKENS) - set(special_tokens)
        if missing or len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special tokens are duplicated or lack {sorted(missing)}")
        self._specials = list(special_tokens)
        self._bpe_size = bpe.get_vocab_size(with_added_tokens=True)
        if text_ids is not None:
            if text_ids < self._bpe_size:
                raise ValueError(f"text_ids={text_ids} is below the prose tokenizer's {self._bpe_size} ids")
            self._bpe_size = text_ids
        self._special_ids = {t: self._bpe_size + i for i, t in enumerate(self._specials)}
        self.text_vocab_size = self._bpe_size + len(self._specials)
        self._offsets: dict[str, int] = {}
        end = self.text_vocab_size
        for d in domains:
            self._offsets[d.name] = end
            end += d.size
        self.vocab_size = end
        self.pad_id = self._special_ids[PAD]
        self.bos_id = self._special_ids[BOS]
        self.eos_id = self._special_ids[EOS]
        self._non_targets = [self._special_ids[t] for t in NON_TARGETS]
        # the data path asks for these per item: looked up once here
        self._marker_ids = {(kind, m): self._special_ids[marker(kind, m)]
                            for kind in ("START", "END", "SLOT") for m in MODALITIES}
        # Block starts and what each block holds, for decode.
        self._starts = [0, self._bpe_size, *self._offsets.values()]
        self._kinds = ["text", "special", *self._offsets]

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4096,
        smiles: Iterable[str] = (),
        latex: Iterable[str] = (),
        pretrained: tuple[Tokenizer, int] | None = None,
    ) -> "ScientificTokenizer":
        """`vocab_size` is the BPE target; inline domain spans in `texts` feed the domain vocabularies.
        `pretrained` = (prose tokenizer, its model's vocabulary size) is kept instead of training a BPE."""
        if pretrained is None and vocab_size < BYTE_ALPHABET_SIZE:
            raise TokenizerError(
                f"vocab_size {vocab_size} is below the {BYTE_ALPHABET_SIZE} byte tokens; use 256 or more"
            )
        seen: dict[str, list[str]] = {"smiles": list(smiles), "protein": [], "latex": list(latex)}

        def prose() -> Iterator[str]:
            # Domain spans are kept out of the BPE so its merges are spent on prose.
            for text in texts:
                for kind, piece in split_spans(text):
                    if kind == "text":
                        yield piece
                    elif kind in seen:
                        seen[kind].append(piece)

        if pretrained is None:
            bpe, text_ids = train_bpe(prose(), vocab_size), None
        else:
            for _ in prose():  # the pass still fills the domain vocabularies' `seen`
                pass
            bpe, text_ids = pretrained
        return cls(bpe, [DomainVocab.build(name, seen[name]) for name in DOMAINS], SPECIAL_TOKENS, text_ids)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._bpe.save(str(directory / BPE_FILE))
        meta = {
            "format": FORMAT,
            "special_tokens": self._specials,
            "text_ids": self._bpe_size,
            "domains": [d.to_dict() for d in self._domains.values()],
        }
        text = json.dumps(meta, ensure_ascii=False, indent=1)
        (directory / DOMAINS_FILE).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> "ScientificTokenizer":
        directory = Path(directory)
        for name in (BPE_FILE, DOMAINS_FILE):
            if not (directory / name).is_file():
                raise TokenizerError(
                    f"tokenizer file {directory / name} not found; point to a directory written by "
                    "ScientificTokenizer.save, or train one with ScientificTokenizer.train"
                )
        try:
            meta = json.loads((directory / DOMAINS_FILE).read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            bpe = Tokenizer.from_file(str(directory / BPE_FILE))
            domains = [DomainVocab.from_dict(d) for d in meta["domains"]]
            return cls(bpe, domains, meta["special_tokens"], meta.get("text_ids"))
        except Exception as e:  # HF raises a bare Exception on a bad tokenizer.json
            raise TokenizerError(f"tokenizer in {directory} is corrupt ({e}); save or train it again") from e

    def fingerprint(self) -> str:
        """SHA-256 of everything that decides an id: the prose BPE, the special tokens and their place,
        the domain vocabularies. Ids stored under one tokenizer are only meaningful under another
        with the same fingerprint (scifm.data.indexed checks it)."""
        content = {
            "format": FORMAT,
            "bpe": json.loads(self._bpe.to_str()),
            "text_ids": self._bpe_size,
            "special_tokens": self._specials,
            "domains": [d.to_dict() for d in self._domains.values()],
        }
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def prose(self) -> Tokenizer:
        """The prose BPE (ids [0, text_ids)); read-only use."""
        return self._bpe

    @property
    def text_ids(self) -> int:
        return self._bpe_size

    @property
    def special_tokens(self) -> list[str]:
        """In id order, starting at `text_ids`."""
        return list(self._specials)

    def domain(self, name: str) -> DomainVocab:
        if name not in self._domains:
            raise ValueError(f"unknown domain {name!r}; expected one of {DOMAINS}")
        return self._domains[name]

    def domain_offset(self, name: str) -> int:
        self.domain(name)
        return self._offsets[name]

    def encode_domain(self, name: str, s: str) -> list[int]:
        offset = self.domain_offset(name)
        return [offset + i for i in self._domains[name].encode(s)]

    def encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for kind, piece in split_spans(text):
            if kind == "text":
                ids += self._bpe.encode(piece, add_special_tokens=False).ids
            elif kind == "tag":
                ids.append(self._special_ids[piece])
            else:
                ids += self.encode_domain(kind, piece)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        for kind, group in itertools.groupby((int(i) for i in ids), key=self._kind):
            run = list(group)
            if kind == "text":
                out.append(self._bpe.decode(run, skip_special_tokens=False))
            elif kind == "special":
                out += [self._specials[i - self._bpe_size] for i in run]
            else:
                out.append(self._domains[kind].decode([i - self._offsets[kind] for i in run]))
        return "".join(out)

    def start_id(self, modality: str) -> int:
        return self._marker_id("START", modality)

    def end_id(self, modality: str) -> int:
        return self._marker_id("END", modality)

    def slot_id(self, modality: str) -> int:
        return self._marker_id("SLOT", modality)

    def _marker_id(self, kind: str, modality: str) -> int:
        try:
            return self._marker_ids[kind, modality]
        except KeyError:
            marker(kind, modality)  # raises the error naming the modalities
            raise

    def loss_target_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """False for pad, bos, slot and START/END ids; True for everything the LM should predict."""
        return ~torch.isin(ids, torch.tensor(self._non_targets, dtype=ids.dtype, device=ids.device))

    def _kind(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self._kinds[bisect.bisect_right(self._starts, i) - 1]
