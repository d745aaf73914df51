"""SMILES -> molecular graph: integer atom categories and directed bonds with bond categories."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from rdkit import Chem, rdBase

from scifm.data.features.padding import Groups
from scifm.core.errors import DocumentFormatError
from scifm.core.modalities import (
    BOND_CATEGORY_SIZES,
    ELEMENTS,
    MAX_CHARGE,
    MAX_DEGREE,
    MAX_HS,
    N_BOND_STEREOS,
    N_BOND_TYPES,
    N_HYBRIDIZATIONS,
)

# collate output: atom_feats [B, A, 7], atom_mask [B, A]; edge_index [B, E, 2] (src, dst, local
# atom indices, both directions of every bond), bond_feats [B, E, 4], edge_mask [B, E]
GROUPS: Groups = {"atom_mask": ("atom_feats",), "edge_mask": ("edge_index", "bond_feats")}

# the rdkit values behind the category counts of scifm.core.modalities, in bucket order
_H = Chem.HybridizationType
HYBRIDIZATIONS = (_H.S, _H.SP, _H.SP2, _H.SP3, _H.SP3D, _H.SP3D2)
BOND_TYPES = (Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC)
_S = Chem.BondStereo
STEREOS = (_S.STEREONONE, _S.STEREOANY, _S.STEREOZ, _S.STEREOE, _S.STEREOCIS, _S.STEREOTRANS)
assert (len(HYBRIDIZATIONS), len(BOND_TYPES), len(STEREOS)) == (N_HYBRIDIZATIONS, N_BOND_TYPES, N_BOND_STEREOS)


def _buckets(choices: Sequence[object]) -> dict[object, int]:
    """Value -> its bucket; a value not listed goes to the extra bucket len(choices)."""
    return {value: i for i, value in enumerate(choices)}


_ELEMENT_BUCKETS, _HYBRIDIZATION_BUCKETS = _buckets(ELEMENTS), _buckets(HYBRIDIZATIONS)
_BOND_TYPE_BUCKETS, _STEREO_BUCKETS = _buckets(BOND_TYPES), _buckets(STEREOS)


# Python's min and max, not np.clip: a molecule's rows cost a few atom calls each, and np.clip on
# one number cost more than all of them together
def _atom_row(atom: Chem.Atom) -> list[int]:
    return [
        _ELEMENT_BUCKETS.get(atom.GetSymbol(), len(ELEMENTS)),
        min(atom.GetDegree(), MAX_DEGREE),
        min(max(atom.GetFormalCharge(), -MAX_CHARGE), MAX_CHARGE) + MAX_CHARGE,
        _HYBRIDIZATION_BUCKETS.get(atom.GetHybridization(), len(HYBRIDIZATIONS)),
        int(atom.GetIsAromatic()),
        min(atom.GetTotalNumHs(), MAX_HS),
        int(atom.IsInRing()),
    ]


def _bond_row(bond: Chem.Bond) -> list[int]:
    return [
        _BOND_TYPE_BUCKETS.get(bond.GetBondType(), len(BOND_TYPES)),
        int(bond.GetIsConjugated()),
        int(bond.IsInRing()),
        _STEREO_BUCKETS.get(bond.GetStereo(), len(STEREOS)),
    ]


def mol_features(mol: Chem.Mol) -> dict[str, np.ndarray]:
    """Arrays for one parsed molecule; atom i of the arrays is atom i of `mol`."""
    # by index: RDKit's atom and bond sequences are slower to iterate
    atom_feats = np.array([_atom_row(mol.GetAtomWithIdx(i)) for i in range(mol.GetNumAtoms())], dtype=np.int64)
    edges, bond_rows = [], []
    for b in range(mol.GetNumBonds()):
        bond = mol.GetBondWithIdx(b)
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        row = _bond_row(bond)
        edges += [(i, j), (j, i)]  # messages flow both ways along a bond
        bond_rows += [row, row]
    return {
        "atom_feats": atom_feats,
        "edge_index": np.array(edges, dtype=np.int64).reshape(-1, 2),
        "bond_feats": np.array(bond_rows, dtype=np.int64).reshape(-1, len(BOND_CATEGORY_SIZES)),
    }


def featurize_molecule(smiles: object, max_len: int) -> dict[str, np.ndarray]:
    return mol_features(parse_molecule(smiles, max_len))


def parse_molecule(smiles: object, max_len: int) -> Chem.Mol:
    """The molecule, or DocumentFormatError with the reason the featurizer counts."""
    if not isinstance(smiles, str) or not smiles.strip():
        raise DocumentFormatError("bad_smiles", "'smiles' must be a non-empty string")
    with rdBase.BlockLogs():  # a bad SMILES is counted by the caller, not printed to stderr
        mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        raise DocumentFormatError("bad_smiles", f"RDKit cannot parse {smiles[:60]!r}")
    check_atoms_fit(mol.GetNumAtoms(), max_len)
    return mol


def check_atoms_fit(n_atoms: int, max_len: int) -> None:
    if n_atoms > max_len:
        raise DocumentFormatError("too_long", f"{n_atoms} atoms > max_len {max_len}")
