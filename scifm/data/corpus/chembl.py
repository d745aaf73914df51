"""ChEMBL compound sets shipped in RDKit Contrib: facts computed by RDKit, activities from the csv."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from rdkit import Chem
from rdkit.Chem import Descriptors, rdMolDescriptors

from scifm.data.corpus.common import SourceContext, molecule_slot, num, package_file, render
from scifm.data.documents import Document


def read_smiles_file(*parts: str) -> list[tuple[str, str]]:
    """(name, SMILES) per line of a whitespace-separated 'SMILES name' file under RDKit Contrib."""
    lines = package_file("rdkit", "Contrib", *parts).read_text().splitlines()
    return [(fields[1], fields[0]) for fields in (line.split() for line in lines) if len(fields) >= 2]


def read_fraggle_records() -> list[tuple[str, str]]:
    return read_smiles_file("fraggle", "data", "ChEMBL_11265_actives.smi")


def read_freewilson_records() -> list[tuple[str, str, str | None]]:
    """(compound id, SMILES, activity text or None) for CHEMBL2321810.smi joined with its _act.csv."""
    act_text = package_file("rdkit", "Contrib", "FreeWilson", "data", "CHEMBL2321810_act.csv").read_text()
    activity = {row["Name"]: row["Act"] for row in csv.DictReader(io.StringIO(act_text))}
    return [
        (name, smiles, activity.get(name))
        for name, smiles in read_smiles_file("FreeWilson", "data", "CHEMBL2321810.smi")
    ]


FORMULA_TEMPLATES = (
    "The molecular formula of {mol} is {value}.",
    "Question: what is the molecular formula of {mol} as drawn? Answer: {value}.",
    "Counting every atom of {mol} including hydrogens gives the formula {value}.",
)
HEAVY_TEMPLATES = (
    "{label} {mol} has {value} heavy (non-hydrogen) atoms.",
    "Question: how many heavy atoms does {mol} contain? Answer: {value}.",
    "Ignoring hydrogens, {mol} is built from {value} atoms.",
)
AROMATIC_TEMPLATES = (
    "{label} {mol} contains {value} aromatic rings.",
    "Question: how many aromatic rings are in {mol} as perceived by RDKit? Answer: {value}.",
)
MW_TEMPLATES = (
    "The molecular weight of {mol} is {value} g/mol.",
    "Question: what is the average molecular weight of {mol} in g/mol? Answer: {value}.",
)


def fraggle_docs(ctx: SourceContext) -> Iterator[Document]:
    """Three documents per active: formula, heavy atoms, and aromatic rings or molecular weight."""
    for name, smiles in read_fraggle_records():
        doc_id = f"fraggle-{name.rsplit('_', 1)[-1].zfill(3)}"
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            ctx.skip("unparsable_smiles", doc_id)
            continue
        label = f"The ChEMBL_11265 active {name},"
        facts = [
            ("mol.formula", FORMULA_TEMPLATES, rdMolDescriptors.CalcMolFormula(mol)),
            ("mol.heavy_atoms", HEAVY_TEMPLATES, str(mol.GetNumHeavyAtoms())),
            ctx.rng.choice(
                [
                    ("mol.aromatic_rings", AROMATIC_TEMPLATES, str(rdMolDescriptors.CalcNumAromaticRings(mol))),
                    ("mol.mw", MW_TEMPLATES, num(Descriptors.MolWt(mol), 6)),
                ]
            ),
        ]
        for skill, templates, value in facts:
            segments = render(
                ctx.rng.choice(templates), {"mol": molecule_slot(ctx.rng, smiles)}, value=value, label=label
            )
            yield ctx.doc(f"{doc_id}-{skill.split('.')[1]}", skill, segments)


ACTIVITY_TEMPLATES = (
    "Compound {name} of the ChEMBL set CHEMBL2321810, {mol} has a measured activity of {act} (−log10 molar).",
    "Question: what activity was reported for {mol} in CHEMBL2321810? Answer: {act} on the −log10 molar scale.",
    "In the CHEMBL2321810 series, {mol} reaches a pActivity of {act}.",
)
RANK_TEMPLATES = (
    "Compound A, {a} and compound B, {b} were both tested in CHEMBL2321810. Which is more potent? "
    "{winner} is, with an activity of {hi} against {lo} (−log10 molar).",
    "Comparing {a} with {b} in the CHEMBL2321810 assay, the more active compound is {winner_long} "
    "({hi} versus {lo} on the −log10 molar scale).",
)
# Rank pairs only where the difference is clearly beyond rounding of the reported values.
MIN_RANK_GAP = 0.3
RANK_FRACTION = 0.2


def parse_activity(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def freewilson_docs(ctx: SourceContext) -> Iterator[Document]:
    """One activity fact per compound; for some, a potency comparison with an earlier compound."""
    earlier: list[tuple[str, str, float]] = []
    for name, smiles, act in read_freewilson_records():
        doc_id = f"fw-{name}"
        value = parse_activity(act)
        if value is None:
            ctx.skip("missing_activity", doc_id)
            continue
        if Chem.MolFromSmiles(smiles) is None:
            ctx.skip("unparsable_smiles", doc_id)
            continue
        slots = {"mol": molecule_slot(ctx.rng, smiles)}
        yield ctx.doc(doc_id, "mol.activity", render(ctx.rng.choice(ACTIVITY_TEMPLATES), slots, name=name, act=act))
        partners = [e for e in earlier if abs(e[2] - value) >= MIN_RANK_GAP]
        if partners and ctx.rng.random() < RANK_FRACTION:
            other_name, other_smiles, other_value = ctx.rng.choice(partners)
            a_wins = value > other_value
            segments = render(
                ctx.rng.choice(RANK_TEMPLATES),
                {"a": molecule_slot(ctx.rng, smiles), "b": molecule_slot(ctx.rng, other_smiles)},
                winner="A" if a_wins else "B",
                winner_long=f"the first ({name})" if a_wins else f"the second ({other_name})",
                hi=num(max(value, other_value)),
                lo=num(min(value, other_value)),
            )
            yield ctx.doc(f"{doc_id}-vs-{other_name}", "mol.activity_rank", segments)
        earlier.append((name, smiles, value))
