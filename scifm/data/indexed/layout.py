"""A document as stored in an indexed dataset, and back to what the loader packs.

Stored ids: [BOS], each text segment's prose ids, each latex/molecule/protein segment as
[START_X] its ids in the tokenizer's LaTeX/SMILES/protein block [END_X], then [EOS]. Beside them,
each molecule's atom count, from its parse when it was stored. Decoding an item's ids gives its
LaTeX, SMILES or sequence back exactly, so a stored document expands to the EncodedDocument that
encode_document gives its JSONL line (same ids, items, skip verdicts and features) without parsing
anything: the checks that do not depend on the run's encoders passed when it was stored; the length
limits are checked against the stored atom counts and the items' id counts (a protein has one id per
residue); LaTeX and protein features are the stored ids less their block's offset; and a molecule is
decoded and parsed only when a rank featurizes its row. Every rank expands every document (packing
needs the lengths and verdicts), so what stays per document is cheap, and the featurizing falls with dp.

Tables and figures are not token-based (cells keep their types, images their pixels) and are
refused with a counted reason: documents holding them stay in a JSONL source.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from scifm.core.encoders_config import EncodersConfig
from scifm.core.errors import DocumentFormatError
from scifm.data.documents import Document
from scifm.data.encode import EncodedDocument, EncodedItem, append_item
from scifm.data.features import Prepared
from scifm.data.features.latex import check_latex
from scifm.data.features.molecule import check_atoms_fit, mol_features, parse_molecule
from scifm.data.features.protein import check_protein, check_residues_fit
from scifm.data.features.sequence import check_ids_fit

# modality -> (its domain vocabulary, the segment field holding the string)
STORED = {"latex": ("latex", "latex"), "molecule": ("smiles", "smiles"), "protein": ("protein", "sequence")}
# length limits belong to the run's encoders, applied when the loader expands a document
NO_LENGTH_LIMIT = sys.maxsize


def stored_document(doc: Document, tokenizer) -> tuple[list[int], list[int]]:
    """(stored ids, each molecule's atoms); raises DocumentFormatError (a counted reason) for a table,
    a figure or a bad item."""
    ids, atoms = [tokenizer.bos_id], []
    for seg in doc.segments:
        kind = seg["type"]
        if kind == "text":
            ids += tokenizer.encode_text(seg["text"])
        elif kind in STORED:
            domain, key = STORED[kind]
            n_atoms = check_item(seg)
            ids += [tokenizer.start_id(kind), *tokenizer.encode_domain(domain, seg[key]), tokenizer.end_id(kind)]
            if n_atoms is not None:
                atoms.append(n_atoms)
        else:
            raise DocumentFormatError(f"{kind}_not_indexed", f"a {kind} segment cannot be stored as token ids; "
                                      f"keep documents with {kind}s in a JSONL source")
    ids.append(tokenizer.eos_id)
    return ids, atoms


def check_item(seg: dict) -> int | None:
    """What the featurizers refuse under any encoder config (a SMILES RDKit cannot parse, letters that
    are no amino acids, unbalanced LaTeX), refused before it is stored; a molecule's atom count."""
    kind = seg["type"]
    if kind == "molecule":
        return parse_molecule(seg["smiles"], NO_LENGTH_LIMIT).GetNumAtoms()
    if kind == "latex":
        check_latex(seg["latex"])
    else:
        check_protein(seg["sequence"])
    return None


@dataclass(frozen=True)
class IndexedDocument:
    id: str
    source: str
    skill: str
    ids: np.ndarray  # stored ids, int64 (see the module docstring)
    atoms: tuple[int, ...]  # per molecule, in order

    def encode(self, tokenizer, enc_cfg: EncodersConfig) -> EncodedDocument:
        """Each stored item becomes its slots and (prepared) features; raises DocumentFormatError as
        encode_document does for an item over its encoder's max_len."""
        starts = {tokenizer.start_id(kind): kind for kind in STORED}
        # markers are special ids, which neither prose nor an item's domain ids contain, and items
        # do not nest: the k-th START and the k-th END enclose the k-th item
        first = _positions(self.ids, list(starts))
        last = _positions(self.ids, [tokenizer.end_id(kind) for kind in STORED])
        ids: list[int] = []
        items: list[EncodedItem] = []
        atoms = iter(self.atoms)
        done = 0  # stored ids laid out so far
        for pos, end in zip(first, last, strict=True):
            kind = starts[int(self.ids[pos])]
            ids += self.ids[done:pos].tolist()
            n_atoms = next(atoms) if kind == "molecule" else 0
            prepared = _prepared(kind, self.ids[pos + 1 : end], n_atoms, tokenizer, getattr(enc_cfg, kind).max_len)
            append_item(ids, items, kind, prepared, tokenizer, enc_cfg)
            done = end + 1
        ids += self.ids[done:].tolist()
        return EncodedDocument(self.id, self.source, self.skill, ids, items)


def _positions(ids: np.ndarray, wanted: list[int]) -> list[int]:
    """Where `ids` holds any of `wanted` (a few ids: faster than np.isin on short documents)."""
    hit = ids == wanted[0]
    for i in wanted[1:]:
        hit |= ids == i
    return np.flatnonzero(hit).tolist()


def _prepared(kind: str, item_ids: np.ndarray, n_atoms: int, tokenizer, max_len: int) -> Prepared:
    """The featurizer's length checks, in its order, and the features, or (a molecule) how to make them."""
    domain = STORED[kind][0]
    local = item_ids - tokenizer.domain_offset(domain)
    if kind == "molecule":
        check_atoms_fit(n_atoms, max_len)
        return Prepared(_molecule_features, (tokenizer.domain(domain), local))
    if kind == "protein":  # one id per residue: the same number, checked first as the featurizer does
        check_residues_fit(len(local), max_len)
    check_ids_fit(len(local), domain, max_len)
    return Prepared.ready({"ids": local})


def _molecule_features(vocab, local_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Decoded and parsed for a rank's own rows only; it parsed when it was stored."""
    return mol_features(parse_molecule(vocab.decode(local_ids.tolist()), NO_LENGTH_LIMIT))
