"""Featurizers and modality encoders: invariances, padding, bad inputs, gradients."""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem

from scifm.data.features import collate, featurize_segment
from scifm.data.features.molecule import featurize_molecule, mol_features
from scifm.core.errors import DocumentFormatError
from scifm.core.encoders_config import EncodersConfig, FigureEncoderConfig
from scifm.model.encoders import build_encoders
from scifm.model.init import init_parameters

D_MODEL = 32
SKIMAGE_DATA = Path(str(importlib.resources.files("skimage") / "data"))
NCI_SMILES = Path(str(importlib.resources.files("rdkit") / "Data" / "NCI" / "first_5K.smi"))


class FakeDomain:
    """Per-character ids 1..len(alphabet); refuses characters outside it, as a domain vocab may."""

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.size = len(alphabet) + 1

    def encode(self, s: str) -> list[int]:
        return [self.alphabet.index(ch) + 1 for ch in s]


class FakeTokenizer:
    text_vocab_size = 257

    def __init__(self) -> None:
        printable = "".join(chr(c) for c in range(32, 127))
        self.domains = {"protein": FakeDomain("ACDEFGHIKLMNPQRSTVWYBZXUO"), "latex": FakeDomain(printable)}

    def domain(self, name: str) -> FakeDomain:
        return self.domains[name]

    def encode_text(self, s: str) -> list[int]:
        return [b + 1 for b in s.encode()]


TOK = FakeTokenizer()
CFG = EncodersConfig()

# per modality: a small item and a larger one (the padding test batches the small one with it)
SEGMENTS = {
    "latex": [{"latex": r"\frac{a}{b}"}, {"latex": r"\int_0^1 x^{2}\,dx = \frac{1}{3} \{ \}"}],
    "molecule": [{"smiles": "CCO"}, {"smiles": "CC(=O)Oc1ccccc1C(=O)O"}],
    "protein": [{"sequence": "MKT"}, {"sequence": "MKTAYIAKQRQISFVKSHFSRQ"}],
    "table": [
        {"columns": ["x"], "rows": [[1]]},
        {"columns": ["name", "mass"], "rows": [["H", 1.008], ["He", None]], "caption": "Atomic masses"},
    ],
    "figure": [{"array": [[0.0, 1.0, 0.5, 0.25, 1.0, 0.0]] * 2}, {"path": "camera.png"}],  # 1 vs 8x8 patches
}


def initialised(encoders: torch.nn.ModuleDict) -> torch.nn.ModuleDict:
    """As inside the full model: name-seeded normal init (the resampler queries start at zero otherwise)."""
    init_parameters(encoders, seed=0, std=0.02, n_layers=2)
    return encoders


def featurize(kind: str, seg: dict) -> dict[str, np.ndarray]:
    return featurize_segment({"type": kind, **seg}, TOK, CFG, SKIMAGE_DATA)


@pytest.fixture(scope="module")
def encoders() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    vocab = {"latex": TOK.domain("latex").size, "protein": TOK.domain("protein").size, "text": TOK.text_vocab_size}
    return initialised(build_encoders(CFG, D_MODEL, vocab)).eval()


def test_molecule_output_is_invariant_to_atom_order(encoders):
    mol = Chem.MolFromSmiles("C[C@H](N)C(=O)Oc1ccc(/C=C/Cl)cc1")
    perm = np.random.default_rng(0).permutation(mol.GetNumAtoms()).tolist()
    permuted = Chem.RenumberAtoms(mol, perm)
    a, b = mol_features(mol), mol_features(permuted)
    assert not np.array_equal(a["atom_feats"], b["atom_feats"])  # the order really changed
    np.testing.assert_array_equal(a["atom_feats"][perm], b["atom_feats"])
    with torch.no_grad():
        out_a = encoders["molecule"](collate("molecule", [a]))
        out_b = encoders["molecule"](collate("molecule", [b]))
    assert out_a.shape == (1, CFG.molecule.slots, D_MODEL)
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(SEGMENTS))
def test_padding_does_not_change_an_item(encoders, kind):
    small, large = (featurize(kind, seg) for seg in SEGMENTS[kind])
    slots = getattr(CFG, kind).slots
    batch = collate(kind, [large, small, large])
    padded = (batch["patch_figure"][2] < 0).any() if kind == "figure" else any(
        not m[1].all() for k, m in batch.items() if k.endswith("mask"))
    assert padded, "nothing was padded"
    with torch.no_grad():
        alone = encoders[kind](collate(kind, [small]))
        batched = encoders[kind](batch)
    assert alone.shape == (1, slots, D_MODEL) and batched.shape == (3, slots, D_MODEL)
    assert (alone - batched[0]).abs().max() > 1e-4  # the two items really differ
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kind", "seg", "reason"),
    [
        ("molecule", {"smiles": "C1CC(=O"}, "bad_smiles"),
        ("molecule", {"smiles": "C" * (CFG.molecule.max_len + 1)}, "too_long"),
        ("protein", {"sequence": "MKTJ1"}, "bad_protein"),
        ("protein", {"sequence": "A" * (CFG.protein.max_len + 1)}, "too_long"),
        ("latex", {"latex": "\\frac{a}{b"}, "bad_latex"),
        ("latex", {"latex": "a}{"}, "bad_latex"),
        ("latex", {"latex": "  "}, "bad_latex"),
        ("latex", {"latex": "\u00e9"}, "bad_latex"),  # outside the domain vocabulary
        ("table", {"columns": ["a", "b"], "rows": [[1, 2], [3]]}, "bad_table"),
        ("table", {"columns": ["a"], "rows": [[{"x": 1}]]}, "bad_table"),
        ("table", {"columns": ["a"], "rows": [[i] for i in range(CFG.table.max_len)]}, "too_long"),
        ("figure", {"path": "no_such_image.png"}, "bad_figure"),
        ("figure", {"path": "README.txt"}, "bad_figure"),
        ("figure", {"array": [[0.1, 0.2], [0.3]]}, "bad_figure"),
        ("figure", {"array": [[-5.0]]}, "bad_figure"),
    ],
)
def test_bad_inputs_raise_their_reason(kind, seg, reason):
    with pytest.raises(DocumentFormatError) as info:
        featurize(kind, seg)
    assert info.value.reason == reason


def test_aspect_ratio_sets_the_patch_grid():
    rng = np.random.default_rng(0)
    wide = featurize("figure", {"array": rng.random((30, 90)).tolist()})
    tall = featurize("figure", {"array": rng.random((90, 30, 3)).tolist()})
    p, side = CFG.figure.patch_size, CFG.figure.max_side // CFG.figure.patch_size
    short = round(30 * side / 90)  # 30 px scaled by 64/90, in whole patches
    for feats, (rows, cols) in ((wide, (short, side)), (tall, (side, short))):
        assert feats["patches"].shape == (rows * cols, p * p * 3)
        expected = np.array([(r, c) for r in range(rows) for c in range(cols)])
        np.testing.assert_array_equal(feats["patch_pos"], expected)


def test_figures_packed_in_one_row_each_give_their_own_output(encoders):
    """Figures of 15, 4 and 1 patches share a row beside a 64-patch one, in the items' order out of
    the batch; each attends within itself only, so each equals its output alone (1e-5: the same
    arithmetic over rows of another length, which may sum in another order)."""
    rng = np.random.default_rng(0)
    segs = [{"array": rng.random((24, 40)).tolist()}, {"path": "camera.png"},
            {"array": rng.random((16, 16, 3)).tolist()}, SEGMENTS["figure"][0]]
    items = [featurize("figure", seg) for seg in segs]
    batch = collate("figure", items)
    assert [len(item["patches"]) for item in items] == [15, 64, 4, 1]
    assert batch["patches"].shape[:2] == (2, 64) and batch["figure_row"].tolist() == [1, 0, 1, 1]
    with torch.no_grad():
        batched = encoders["figure"](batch)
        alone = torch.cat([encoders["figure"](collate("figure", [item])) for item in items])
    assert (alone[0] - alone[2]).abs().max() > 1e-4  # the figures' outputs really differ
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("upscale", [False, True])
def test_a_figure_under_max_side_is_enlarged_only_with_upscale(upscale):
    """patch_size 8, max_side 64. Not enlarged, a 24 x 40 image is 3 x 5 patches of its own pixels
    (no resize at whole patches) and one under a patch is one patch; enlarged, 24 x 40 fills the
    64-pixel side (8 patches, 24 x 64 / 40 -> 5 rows) and 3 x 5 fills it too."""
    cfg = EncodersConfig(figure=FigureEncoderConfig(upscale=upscale))
    pixels_HW = np.random.default_rng(0).integers(0, 256, (24, 40)).astype(float)
    tiny_HW = np.full((3, 5), 255.0)
    grids = {}
    for name, image in (("small", pixels_HW), ("under a patch", tiny_HW)):
        feats = featurize_segment({"type": "figure", "array": image.tolist()}, TOK, cfg, SKIMAGE_DATA)
        grids[name] = tuple(int(n) for n in feats["patch_pos"].max(axis=0) + 1)
        assert feats["patches"].shape == (grids[name][0] * grids[name][1], 8 * 8 * 3)
        if name == "small" and not upscale:
            first_patch = feats["patches"][0].reshape(8, 8, 3)
            np.testing.assert_array_equal(first_patch, np.repeat(pixels_HW[:8, :8, None], 3, axis=2))
    expected = {"small": (5, 8), "under a patch": (5, 8)} if upscale else {"small": (3, 5), "under a patch": (1, 1)}
    assert grids == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_figure_encoder_embeds_pixel_bytes_as_values_in_0_1(encoders, dtype):
    """Patches travel as bytes (a quarter of floats' size); the patch embedding must see each byte /
    255 as fp32 computes it, in the weights' dtype (bf16 where FSDP2's parameters are)."""
    batch = collate("figure", [featurize("figure", seg) for seg in SEGMENTS["figure"]])
    assert batch["patches"].dtype == torch.uint8 and int(batch["patches"].max()) > 200
    encoder = copy.deepcopy(encoders["figure"]).to(dtype)
    seen = []
    encoder.patch_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        encoder(batch)
    assert torch.equal(seen[0], (batch["patches"].float() / 255.0).to(dtype))
    assert seen[0].dtype == dtype and float(seen[0].max()) <= 1.0


def test_molecule_features_match_rdkit():
    feats = featurize_molecule("C=CC#N", CFG.molecule.max_len)
    assert feats["atom_feats"].shape == (4, 7)
    assert feats["edge_index"].shape == (6, 2) and feats["bond_feats"].shape == (6, 4)
    assert {tuple(e) for e in feats["edge_index"]} == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)}


def real_batches() -> dict[str, dict[str, torch.Tensor]]:
    smiles = [line.split()[0] for line in NCI_SMILES.read_text().splitlines()[:16]]
    segments = {
        "molecule": [{"smiles": s} for s in smiles],
        "figure": [{"path": "camera.png"}, {"path": "astronaut.png"}, {"array": np.eye(12).tolist()}],
        **{k: v for k, v in SEGMENTS.items() if k not in ("molecule", "figure")},
    }
    return {kind: collate(kind, [featurize(kind, seg) for seg in segs]) for kind, segs in segments.items()}


def test_gradient_reaches_every_encoder_parameter():
    torch.manual_seed(0)
    vocab = {"latex": TOK.domain("latex").size, "protein": TOK.domain("protein").size, "text": TOK.text_vocab_size}
    encoders = initialised(build_encoders(CFG, D_MODEL, vocab))
    loss = sum((encoders[kind](batch) * torch.randn(D_MODEL)).sum() for kind, batch in real_batches().items())
    loss.backward()
    for name, p in encoders.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
