"""The modalities and the shape of each encoder's input: the contract between the featurizers in
scifm.data.features, which produce these inputs, and the encoders in scifm.model.encoders, which
size their embeddings from the same numbers."""

from __future__ import annotations

from scifm.core.encoders_config import FigureEncoderConfig

MODALITIES = ("latex", "molecule", "protein", "table", "figure")

# molecules: atoms and bonds are columns of integer categories, each with an "other" bucket
ELEMENTS = ("H", "B", "C", "N", "O", "F", "Na", "Si", "P", "S", "Cl", "K", "Se", "Br", "I")
MAX_DEGREE = 6
MAX_CHARGE = 2  # formal charges are clamped to [-2, 2]
MAX_HS = 4
N_HYBRIDIZATIONS = 6  # S, SP, SP2, SP3, SP3D, SP3D2
N_BOND_TYPES = 4  # single, double, triple, aromatic
N_BOND_STEREOS = 6  # none, any, Z, E, cis, trans
# categories per column: element, degree, charge, hybridization, aromatic, hydrogens, in ring
ATOM_CATEGORY_SIZES = (len(ELEMENTS) + 1, MAX_DEGREE + 1, 2 * MAX_CHARGE + 1, N_HYBRIDIZATIONS + 1, 2, MAX_HS + 1, 2)
# categories per column: bond type, conjugated, in ring, stereo
BOND_CATEGORY_SIZES = (N_BOND_TYPES + 1, 2, 2, N_BOND_STEREOS + 1)

# tables: a caption keeps its first CAPTION_TOKENS text tokens
CAPTION_TOKENS = 32

# figures: RGB patches on a grid whose longer side has grid_side(cfg) patches
CHANNELS = 3


def grid_side(cfg: FigureEncoderConfig) -> int:
    """Patches along the longer side of every resized image."""
    return max(1, round(cfg.max_side / cfg.patch_size))
