"""NCI molecules shipped with RDKit: reference TPSA values (first 5K) and SDF property records (first 200)."""

from __future__ import annotations

import io
from collections.abc import Iterator

from rdkit import Chem, RDLogger
from rdkit.Chem import Crippen, Descriptors, rdMolDescriptors

from scifm.data.corpus.common import SourceContext, cell, molecule_slot, num, package_file, render, table_seg
from scifm.data.documents import Document

# Parse failures are counted per source; RDKit's own stderr chatter would only duplicate them.
RDLogger.DisableLog("rdApp.*")


def read_tpsa_records() -> list[tuple[str, str, float]]:
    """(entry number, SMILES, reference TPSA): first_5K.smi joined with first_5k.tpsa.csv by SMILES."""
    base = package_file("rdkit", "Data", "NCI")
    tpsa: dict[str, float] = {}
    for line in (base / "first_5k.tpsa.csv").read_text().splitlines():
        if line and not line.startswith("#"):
            smiles, value = line.rsplit(",", 1)
            tpsa[smiles] = float(value)
    records = []
    for line in (base / "first_5K.smi").read_text().splitlines():
        smiles, entry = line.split("\t")
        if smiles in tpsa:
            records.append((entry, smiles, tpsa[smiles]))
    return records


# A molecule slot is always followed by a space and a word, so an inline SMILES stays a clean token.
TPSA_TEMPLATES = (
    "The topological polar surface area of {mol} is {tpsa} Å².",
    "Computed from its polar atoms, the TPSA of {mol} comes to {tpsa} Å².",
    "Question: what is the topological polar surface area of {mol} in Å²? Answer: {tpsa}.",
    "Entry {entry} of the NCI set, {mol} has a topological polar surface area of {tpsa} Å².",
    "Summing the polar fragment contributions of {mol} gives a TPSA of {tpsa} Å².",
)


def tpsa_docs(ctx: SourceContext) -> Iterator[Document]:
    seen: set[str] = set()
    for entry, smiles, tpsa in read_tpsa_records():
        doc_id = f"nci-{int(entry):05d}"
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            ctx.skip("unparsable_smiles", doc_id)
            continue
        canonical = Chem.MolToSmiles(mol)
        if canonical in seen:  # the same structure twice would leak between splits
            ctx.skip("duplicate_structure", doc_id)
            continue
        seen.add(canonical)
        template = ctx.rng.choice(TPSA_TEMPLATES)
        segments = render(template, {"mol": molecule_slot(ctx.rng, smiles)}, tpsa=f"{tpsa:.2f}", entry=entry)
        yield ctx.doc(doc_id, "mol.tpsa", segments)


# skill -> (SDF field, phrase)
PROPERTIES: dict[str, tuple[str, str]] = {
    "mol.mw": ("AMW", "average molecular weight"),
    "mol.rings": ("NUM_RINGS", "number of rings"),
    "mol.hbd": ("NUM_HDONORS", "number of hydrogen-bond donors"),
    "mol.hba": ("NUM_HACCEPTORS", "number of hydrogen-bond acceptors"),
    "mol.rotb": ("NUM_ROTATABLEBONDS", "number of rotatable bonds"),
    "mol.heteroatoms": ("NUM_HETEROATOMS", "number of heteroatoms"),
}
PROPERTY_UNITS = {"mol.mw": " g/mol"}

PROPERTY_TEMPLATES = (
    "For {mol} the {phrase} is {value}{unit}.",
    "Question: what is the {phrase} of {mol} according to its record? Answer: {value}{unit}.",
    "The record for entry {name} of the NCI property file, {mol} lists a {phrase} of {value}{unit}.",
    "Looking at {mol} again, its {phrase} works out to {value}{unit}.",
)
PROFILE_TEMPLATES = (
    "Property sheet for {mol} from the NCI set:",
    "Descriptors of entry {name} of the NCI property file, drawn as {mol} here:",
    "Here is {mol} together with its descriptors.",
)


def read_property_records() -> Iterator[tuple[str, Chem.Mol | None]]:
    """(record index, molecule with its SDF fields, or None where RDKit rejects the record)."""
    data = package_file("rdkit", "Data", "NCI", "first_200.props.sdf").read_bytes()
    for i, mol in enumerate(Chem.ForwardSDMolSupplier(io.BytesIO(data))):
        yield f"{i:03d}", mol


def property_values(mol: Chem.Mol) -> dict[str, float]:
    """The SDF's own fields where present, RDKit descriptors where a field is missing."""
    fallback = {
        "mol.mw": Descriptors.MolWt,
        "mol.rings": rdMolDescriptors.CalcNumRings,
        "mol.hbd": rdMolDescriptors.CalcNumHBD,
        "mol.hba": rdMolDescriptors.CalcNumHBA,
        "mol.rotb": rdMolDescriptors.CalcNumRotatableBonds,
        "mol.heteroatoms": rdMolDescriptors.CalcNumHeteroatoms,
    }
    values = {}
    for skill, (field, _) in PROPERTIES.items():
        values[skill] = float(mol.GetProp(field)) if mol.HasProp(field) else float(fallback[skill](mol))
    values["mol.logp"] = round(Crippen.MolLogP(mol), 2)
    return values


def property_docs(ctx: SourceContext) -> Iterator[Document]:
    """Per molecule: a property sheet (molecule + table), two SDF-property facts and a logP estimate."""
    for index, mol in read_property_records():
        if mol is None:
            ctx.skip("unparsable_molblock", f"nciprop-{index}")
            continue
        smiles = Chem.MolToSmiles(mol)
        name = mol.GetProp("_Name").strip() or str(int(index) + 1)
        values = property_values(mol)
        rows: list[list] = [[PROPERTIES[s][1], cell(values[s])] for s in PROPERTIES]
        rows.append(["Crippen logP", cell(values["mol.logp"])])
        intro = render(ctx.rng.choice(PROFILE_TEMPLATES), {"mol": molecule_slot(ctx.rng, smiles)}, name=name)
        table = table_seg(["property", "value"], rows, f"Descriptors of NCI property-file entry {name}")
        yield ctx.doc(f"nciprop-{index}-profile", "mol.profile", intro + [table])
        for skill in ctx.rng.sample(sorted(PROPERTIES), 2):
            segments = render(
                ctx.rng.choice(PROPERTY_TEMPLATES),
                {"mol": molecule_slot(ctx.rng, smiles)},
                phrase=PROPERTIES[skill][1],
                value=num(values[skill], 6),
                unit=PROPERTY_UNITS.get(skill, ""),
                name=name,
            )
            yield ctx.doc(f"nciprop-{index}-{skill.split('.')[1]}", skill, segments)
        yield ctx.doc(
            f"nciprop-{index}-logp",
            "mol.logp",
            render(
                "The Wildman-Crippen logP estimate for {mol} is {value}.",
                {"mol": molecule_slot(ctx.rng, smiles)},
                value=num(values["mol.logp"], 6),
            ),
        )
