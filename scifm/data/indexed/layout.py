"""A document as stored in an indexed dataset, and back to what the loader packs.

Stored ids: [BOS], each text segment's prose ids, each latex/molecule/protein segment as
[START_X] its ids in the tokenizer's LaTeX/SMILES/protein block [END_X], each table and figure as
[START_X][END_X] alone, then [EOS]. Beside them, each molecule's atom and bond counts and its graph
features (graphs.py), from its parse when it was stored, and each table's and figure's payload
(payloads.py). A stored document expands to the EncodedDocument that encode_document gives its
JSONL line (same ids, items, skip verdicts and features) without parsing or tokenizing anything:
the checks that do not depend on the run's encoders passed when it was stored; the length limits are
checked against the stored atom counts, the items' id counts (a protein has one id per residue) and
the tables' cell counts; LaTeX and protein features are the stored ids less their block's offset;
and a molecule's graph is unpacked, a table's arrays made and a figure decoded only when a rank
featurizes its row. Packing measures and checks a document from its packing index row
(packing_index.py); `measure` does the same from the stored markers, for where its items' slots
fall when it is cut across rows, and `lay_out` makes its ids and items for a rank that collates it.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scifm.core.encoders_config import EncodersConfig
from scifm.data.documents import Document
from scifm.data.encode import EncodedItem, laid_out_item
from scifm.data.features import Prepared
from scifm.data.features.figure import figure_file
from scifm.data.features.latex import check_latex
from scifm.data.features.molecule import check_atoms_fit, mol_features, parse_molecule
from scifm.data.features.protein import check_protein, check_residues_fit
from scifm.data.features.sequence import check_ids_fit
from scifm.data.features.table import check_cells_fit, table_cells
from scifm.data.indexed.graphs import DTYPE, graph_size, packed_graph, unpacked_graph
from scifm.data.indexed.payloads import stored_figure_features, table_cell_count, table_payload, unpacked_table

# modality stored as token ids -> (its domain vocabulary, the segment field holding the string)
STORED = {"latex": ("latex", "latex"), "molecule": ("smiles", "smiles"), "protein": ("protein", "sequence")}
WITH_PAYLOAD = ("table", "figure")  # stored as their markers alone, and a payload beside the ids
STORED_KINDS = (*STORED, *WITH_PAYLOAD)
# length limits belong to the run's encoders, applied when the loader expands a document
NO_LENGTH_LIMIT = sys.maxsize


@dataclass(frozen=True)
class StoredDocument:
    ids: list[int]
    atoms: list[int]  # per molecule, in order
    bonds: list[int]
    graphs: np.ndarray  # the molecules' packed graphs, one after another (graphs.DTYPE)
    payloads: list[bytes]  # per table and figure, in order (payloads.py)
    # per item, in order: its kind, how many ids it is stored as, and its size in what its
    # featurizer's length check measures (atoms, ids, cells; 0 for a figure, which has no limit)
    items: list[tuple[str, int, int]]


def stored_document(doc: Document, tokenizer, base_dir: Path) -> StoredDocument:
    """Raises DocumentFormatError (a counted reason) for a bad item: what the featurizers refuse
    under any encoder config (a SMILES RDKit cannot parse, letters that are no amino acids,
    unbalanced LaTeX, a ragged table, an image that does not decode) is refused before it is
    stored. Figure paths are relative to `base_dir`, as in training from the JSONL file."""
    ids, atoms, bonds, graphs, payloads, items = [tokenizer.bos_id], [], [], [np.empty(0, DTYPE)], [], []
    for seg in doc.segments:
        kind = seg["type"]
        if kind == "text":
            ids += tokenizer.encode_text(seg["text"])
            continue
        if kind in WITH_PAYLOAD:
            if kind == "table":
                cells, n_columns, caption = table_cells(seg, NO_LENGTH_LIMIT)
                payloads.append(table_payload(cells, n_columns, caption, tokenizer))
                items.append((kind, 0, len(cells)))
            else:
                payloads.append(figure_file(seg, base_dir))
                items.append((kind, 0, 0))
            ids += [tokenizer.start_id(kind), tokenizer.end_id(kind)]
            continue
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
        item_ids = tokenizer.encode_domain(domain, seg[key])
        ids += [tokenizer.start_id(kind), *item_ids, tokenizer.end_id(kind)]
        items.append((kind, len(item_ids), atoms[-1] if kind == "molecule" else len(item_ids)))
    ids.append(tokenizer.eos_id)
    return StoredDocument(ids, atoms, bonds, np.concatenate(graphs), payloads, items)


# slots, not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, about
# 1 us a document on the reading rank; nothing assigns to it
@dataclass(slots=True)
class IndexedDocument:
    """What laying out a stored document needs: its id, source and skill are in the packing index
    and the metadata, read apart (stream.py)."""

    ids: np.ndarray  # stored ids, int64 (see the module docstring)
    atoms: tuple[int, ...]  # per molecule, in order
    bonds: tuple[int, ...]
    graphs: np.ndarray  # the molecules' packed graphs, one after another
    payloads: tuple[np.ndarray, ...]  # per table and figure, in order (payloads.py)

    def measure(self, tokenizer, enc_cfg: EncodersConfig) -> tuple[int, list[tuple[str, int, int]]]:
        """Its laid-out length and where its items' slots fall (what a cut across rows avoids), after
        the length checks; raises DocumentFormatError as encode_document does for the first item over
        its encoder's max_len."""
        atoms, payloads = iter(self.atoms), iter(self.payloads)
        item_spans, shift = [], 0  # shift: laid-out ids gained before this item
        for kind, pos, end in self._stored_items(tokenizer):
            encoder = getattr(enc_cfg, kind)
            n_item_ids = end - pos - 1
            if kind == "molecule":
                check_atoms_fit(next(atoms), encoder.max_len)
            elif kind == "table":
                check_cells_fit(table_cell_count(next(payloads)), encoder.max_len)
            elif kind == "figure":  # no length limit
                next(payloads)
            else:  # what its featurizer checks: its ids (a protein has one per residue)
                _check_ids_fit(kind, n_item_ids, encoder.max_len)
            item_spans.append((kind, pos + shift + 1, encoder.slots))
            shift += encoder.slots - n_item_ids
        return len(self.ids) + shift, item_spans

    def lay_out(self, tokenizer, enc_cfg: EncodersConfig) -> tuple[np.ndarray, list[EncodedItem]]:
        """The ids (int64) and items that encode_document gives its JSONL line, for a document that
        passed its checks (measure, or its packing index row)."""
        pieces: list = []  # stored ids between items, and each item's laid-out block
        items: list[EncodedItem] = []
        molecules, payloads = zip(self.atoms, self.bonds), iter(self.payloads)
        done = stored = n_ids = 0  # stored ids laid out so far; stored graph values passed; ids laid out
        for kind, pos, end in self._stored_items(tokenizer):
            pieces.append(self.ids[done:pos])
            n_ids += pos - done
            if kind == "molecule":
                n_atoms, n_bonds = next(molecules)
                size = graph_size(n_atoms, n_bonds)
                prepared = Prepared(unpacked_graph, (self.graphs[stored : stored + size], n_atoms))
                stored += size
            elif kind == "table":
                prepared = Prepared(unpacked_table, (next(payloads),))
            elif kind == "figure":
                prepared = Prepared(stored_figure_features, (next(payloads), enc_cfg.figure))
            else:  # LaTeX and protein features are the item's ids in its block's own numbering
                local = self.ids[pos + 1 : end] - tokenizer.domain_offset(STORED[kind][0])
                prepared = Prepared.ready({"ids": local})
            block = laid_out_item(items, n_ids, kind, prepared, tokenizer, enc_cfg)
            pieces.append(block)
            n_ids += len(block)
            done = end + 1
        if not pieces:
            return self.ids, items
        pieces.append(self.ids[done:])
        return np.concatenate(pieces), items

    def _stored_items(self, tokenizer) -> zip:
        """Each stored item's kind and the positions of its START and END markers."""
        # markers are special ids, which neither prose nor an item's domain ids contain, and items
        # do not nest: every START is followed by its item's END
        code_at = _marker_codes(tokenizer)[self.ids]
        bounds = code_at.nonzero()[0]  # (np.flatnonzero's wrapper costs more on short ids)
        if not len(bounds):
            return zip()
        starts, ends = bounds[0::2].tolist(), bounds[1::2].tolist()
        return zip([STORED_KINDS[code - 1] for code in code_at[bounds[0::2]].tolist()], starts, ends)


@functools.lru_cache(maxsize=4)
def _marker_codes(tokenizer) -> np.ndarray:
    """Over the vocabulary: at each stored kind's START id its index in STORED_KINDS plus 1, at its END
    id -1, elsewhere 0 (one lookup finds a document's markers and kinds). Made once per tokenizer."""
    codes = np.zeros(tokenizer.vocab_size, dtype=np.int8)
    for code, kind in enumerate(STORED_KINDS, start=1):
        codes[tokenizer.start_id(kind)], codes[tokenizer.end_id(kind)] = code, -1
    return codes


def _check_ids_fit(kind: str, n_ids: int, max_len: int) -> None:
    """The length check of a LaTeX or protein item (for a protein, the residues' check comes first, as
    in featurize_protein)."""
    if kind == "protein":
        check_residues_fit(n_ids, max_len)
    check_ids_fit(n_ids, STORED[kind][0], max_len)
