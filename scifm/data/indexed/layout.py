"""A document as stored in an indexed dataset, and back to what the loader packs.

Stored ids: [BOS], each text segment's prose ids, each latex/molecule/protein segment as
[START_X] its ids in the tokenizer's LaTeX/SMILES/protein block [END_X], then [EOS]. Decoding an
item's ids gives its LaTeX, SMILES or sequence back exactly, which the featurizers then read as
they read the JSONL field; the prose ids are used as stored. So a stored document expands to the
EncodedDocument that encode_document gives its JSONL line (same ids, items and features).

Tables and figures are not token-based (cells keep their types, images their pixels) and are
refused with a counted reason: documents holding them stay in a JSONL source.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from scifm.core.encoders_config import EncodersConfig
from scifm.core.errors import DocumentFormatError
from scifm.data.documents import Document
from scifm.data.encode import EncodedDocument, EncodedItem, append_item
from scifm.data.features.latex import check_latex
from scifm.data.features.molecule import parse_molecule
from scifm.data.features.protein import check_protein

# modality -> (its domain vocabulary, the segment field holding the string)
STORED = {"latex": ("latex", "latex"), "molecule": ("smiles", "smiles"), "protein": ("protein", "sequence")}
# length limits belong to the run's encoders, applied when the loader featurizes
NO_LENGTH_LIMIT = sys.maxsize


def stored_ids(doc: Document, tokenizer) -> list[int]:
    """Raises DocumentFormatError (a counted reason) for a table, a figure or a bad item."""
    ids = [tokenizer.bos_id]
    for seg in doc.segments:
        kind = seg["type"]
        if kind == "text":
            ids += tokenizer.encode_text(seg["text"])
        elif kind in STORED:
            domain, key = STORED[kind]
            check_item(seg)
            ids += [tokenizer.start_id(kind), *tokenizer.encode_domain(domain, seg[key]), tokenizer.end_id(kind)]
        else:
            raise DocumentFormatError(f"{kind}_not_indexed", f"a {kind} segment cannot be stored as token ids; "
                                      f"keep documents with {kind}s in a JSONL source")
    ids.append(tokenizer.eos_id)
    return ids


def check_item(seg: dict) -> None:
    """What the featurizers refuse under any encoder config (a SMILES RDKit cannot parse, letters that
    are no amino acids, unbalanced LaTeX), refused before it is stored; features are the loader's work."""
    kind = seg["type"]
    if kind == "latex":
        check_latex(seg["latex"])
    elif kind == "molecule":
        parse_molecule(seg["smiles"], NO_LENGTH_LIMIT)
    else:
        check_protein(seg["sequence"])


@dataclass(frozen=True)
class IndexedDocument:
    id: str
    source: str
    skill: str
    ids: list[int]  # stored ids (see the module docstring)

    def encode(self, tokenizer, enc_cfg: EncodersConfig) -> EncodedDocument:
        """Each stored item becomes its slots and features; raises DocumentFormatError as encode_document."""
        starts = {tokenizer.start_id(kind): kind for kind in STORED}
        ids: list[int] = []
        items: list[EncodedItem] = []
        pos = 0
        while pos < len(self.ids):
            kind = starts.get(self.ids[pos])
            if kind is None:
                ids.append(self.ids[pos])
                pos += 1
                continue
            end = self.ids.index(tokenizer.end_id(kind), pos + 1)
            seg = {"type": kind, STORED[kind][1]: tokenizer.decode(self.ids[pos + 1 : end])}
            append_item(ids, items, seg, tokenizer, enc_cfg, Path("."))
            pos = end + 1
        return EncodedDocument(self.id, self.source, self.skill, ids, items)
