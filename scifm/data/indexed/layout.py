"""A document as stored in an indexed dataset, and back to what the loader packs.

Stored ids: [BOS], each text segment's prose ids, each latex/molecule/protein segment as
[START_X] its ids in the tokenizer's LaTeX/SMILES/protein block [END_X], then [EOS]. Beside them,
each molecule's atom and bond counts and its graph features (graphs.py), from its parse when it was
stored. A stored document expands to the EncodedDocument that encode_document gives its JSONL line
(same ids, items, skip verdicts and features) without parsing anything: the checks that do not
depend on the run's encoders passed when it was stored; the length limits are checked against the
stored atom counts and the items' id counts (a protein has one id per residue); LaTeX and protein
features are the stored ids less their block's offset; and a molecule's stored graph is unpacked
only when a rank featurizes its row. Every rank expands every document (packing needs the lengths
and verdicts), so what stays per document is cheap, and the featurizing falls with dp.

Tables and figures are not token-based (cells keep their types, images their pixels) and are
refused with a counted reason: documents holding them stay in a JSONL source.
"""

from __future__ import annotations

import functools
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
from scifm.data.indexed.graphs import DTYPE, graph_size, packed_graph, unpacked_graph

# modality -> (its domain vocabulary, the segment field holding the string)
STORED = {"latex": ("latex", "latex"), "molecule": ("smiles", "smiles"), "protein": ("protein", "sequence")}
# length limits belong to the run's encoders, applied when the loader expands a document
NO_LENGTH_LIMIT = sys.maxsize


@dataclass(frozen=True)
class StoredDocument:
    ids: list[int]
    atoms: list[int]  # per molecule, in order
    bonds: list[int]
    graphs: np.ndarray  # the molecules' packed graphs, one after another (graphs.DTYPE)


def stored_document(doc: Document, tokenizer) -> StoredDocument:
    """Raises DocumentFormatError (a counted reason) for a table, a figure or a bad item: what the
    featurizers refuse under any encoder config (a SMILES RDKit cannot parse, letters that are no
    amino acids, unbalanced LaTeX) is refused before it is stored."""
    ids, atoms, bonds, graphs = [tokenizer.bos_id], [], [], [np.empty(0, DTYPE)]
    for seg in doc.segments:
        kind = seg["type"]
        if kind == "text":
            ids += tokenizer.encode_text(seg["text"])
            continue
        if kind not in STORED:
            raise DocumentFormatError(f"{kind}_not_indexed", f"a {kind} segment cannot be stored as token ids; "
                                      f"keep documents with {kind}s in a JSONL source")
        if kind == "molecule":
            features = mol_features(parse_molecule(seg["smiles"], NO_LENGTH_LIMIT))
            graphs.append(packed_graph(features))
            atoms.append(len(features["atom_feats"]))
            bonds.append(len(features["edge_index"]) // 2)
        elif kind == "latex":
            check_latex(seg["latex"])
        else:
            check_protein(seg["sequence"])
        domain, key = STORED[kind]
        ids += [tokenizer.start_id(kind), *tokenizer.encode_domain(domain, seg[key]), tokenizer.end_id(kind)]
    ids.append(tokenizer.eos_id)
    return StoredDocument(ids, atoms, bonds, np.concatenate(graphs))


@dataclass(frozen=True)
class IndexedDocument:
    id: str
    source: str
    skill: str
    ids: np.ndarray  # stored ids, int64 (see the module docstring)
    atoms: tuple[int, ...]  # per molecule, in order
    bonds: tuple[int, ...]
    graphs: np.ndarray  # the molecules' packed graphs, one after another

    def encode(self, tokenizer, enc_cfg: EncodersConfig) -> EncodedDocument:
        """Each stored item becomes its slots and (prepared) features; raises DocumentFormatError as
        encode_document does for an item over its encoder's max_len."""
        is_marker, starts = _item_markers(tokenizer)
        # markers are special ids, which neither prose nor an item's domain ids contain, and items
        # do not nest: every START is followed by its item's END
        bounds = np.flatnonzero(is_marker[self.ids]).tolist()
        ids: list[int] = []
        items: list[EncodedItem] = []
        molecules = zip(self.atoms, self.bonds)
        done = stored = 0  # stored ids laid out so far; stored graph values passed
        for pos, end in zip(bounds[0::2], bounds[1::2], strict=True):
            kind = starts[int(self.ids[pos])]
            ids += self.ids[done:pos].tolist()
            graph = None
            if kind == "molecule":
                n_atoms, n_bonds = next(molecules)
                size = graph_size(n_atoms, n_bonds)
                graph, stored = (self.graphs[stored : stored + size], n_atoms), stored + size
            prepared = _prepared(kind, self.ids[pos + 1 : end], graph, tokenizer, getattr(enc_cfg, kind).max_len)
            append_item(ids, items, kind, prepared, tokenizer, enc_cfg)
            done = end + 1
        ids += self.ids[done:].tolist()
        return EncodedDocument(self.id, self.source, self.skill, ids, items)


@functools.lru_cache(maxsize=4)
def _item_markers(tokenizer) -> tuple[np.ndarray, dict[int, str]]:
    """Over the vocabulary, True at the START and END ids of stored items (one lookup finds them in a
    document); and START id -> modality. Made once per tokenizer: every document needs them."""
    is_marker = np.zeros(tokenizer.vocab_size, dtype=bool)
    is_marker[[id_of(kind) for kind in STORED for id_of in (tokenizer.start_id, tokenizer.end_id)]] = True
    return is_marker, {tokenizer.start_id(kind): kind for kind in STORED}


def _prepared(kind: str, item_ids: np.ndarray, graph: tuple[np.ndarray, int] | None, tokenizer,
              max_len: int) -> Prepared:
    """The featurizer's length checks, in its order, and the features, or (a molecule) how to make them:
    `graph` is its stored block and atom count."""
    if kind == "molecule":
        check_atoms_fit(graph[1], max_len)
        return Prepared(unpacked_graph, graph)
    domain = STORED[kind][0]
    local = item_ids - tokenizer.domain_offset(domain)
    if kind == "protein":  # one id per residue: the same number, checked first as the featurizer does
        check_residues_fit(len(local), max_len)
    check_ids_fit(len(local), domain, max_len)
    return Prepared.ready({"ids": local})

