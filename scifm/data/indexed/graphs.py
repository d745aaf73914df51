"""A molecule's graph features as an indexed dataset stores them, and back to the featurizer's arrays.

The features depend on the SMILES alone, so `scifm data tokenize` computes them once from the parse
that checks the molecule, and the loader never parses: a rank unpacks the graphs of its own rows.
Stored per molecule, as uint16: its atom rows (atoms x 7 categories), then one row per bond (begin
atom, end atom, its 4 categories). The featurizer lists every bond twice, begin -> end and then
end -> begin with the same categories, so the second row of each pair is not stored.
"""

from __future__ import annotations

import numpy as np

from scifm.core.errors import DocumentFormatError
from scifm.core.modalities import ATOM_CATEGORY_SIZES, BOND_CATEGORY_SIZES

DTYPE = np.uint16  # categories are small; atom indices are held below 2**16 when stored
ATOM_COLS = len(ATOM_CATEGORY_SIZES)
BOND_COLS = 2 + len(BOND_CATEGORY_SIZES)  # begin, end, categories


def packed_graph(features: dict[str, np.ndarray]) -> np.ndarray:
    """mol_features' arrays -> the stored block; refuses (too_long) a molecule its dtype cannot index."""
    n_atoms = len(features["atom_feats"])
    if n_atoms > np.iinfo(DTYPE).max:
        raise DocumentFormatError("too_long", f"{n_atoms} atoms: an indexed dataset stores molecules of at most "
                                  f"{np.iinfo(DTYPE).max} atoms")
    bonds = np.concatenate([features["edge_index"][::2], features["bond_feats"][::2]], axis=1)
    return np.concatenate([features["atom_feats"].ravel(), bonds.ravel()]).astype(DTYPE)


def graph_size(n_atoms: int, n_bonds: int) -> int:
    """Stored values of one molecule."""
    return n_atoms * ATOM_COLS + n_bonds * BOND_COLS


def unpacked_graph(block: np.ndarray, n_atoms: int) -> dict[str, np.ndarray]:
    """The stored block -> the arrays mol_features gives (int64, both directions of every bond)."""
    block = block.astype(np.int64)
    bonds = block[n_atoms * ATOM_COLS :].reshape(-1, BOND_COLS)
    edge_index = np.repeat(bonds[:, :2], 2, axis=0)
    edge_index[1::2] = edge_index[1::2, ::-1]
    return {
        "atom_feats": block[: n_atoms * ATOM_COLS].reshape(n_atoms, ATOM_COLS),
        "edge_index": edge_index,
        "bond_feats": np.repeat(bonds[:, 2:], 2, axis=0),
    }
