"""Molecule tasks on RDKit's NCI data: TPSA (reference csv) and SDF properties (MW, rings, H-bond donors)."""

from __future__ import annotations

from collections.abc import Iterator

from rdkit import Chem

from scifm.data.corpus import nci
from scifm.data.corpus.common import molecule_seg, num, render
from scifm.data.documents import split_of
from scifm.eval.builtin.common import (
    Item,
    TaskContext,
    multiple_choice,
    nearby,
    nearby_ints,
    provenance,
    short_answer,
    split_qa,
    template_with,
)
from scifm.eval.builtin.held_out import corpus_documents

TPSA_SOURCE = "rdkit-nci"
PROPS_SOURCE = "rdkit-nci-props"
PROPS = ("mol.mw", "mol.rings", "mol.hbd")


def tpsa_doc_id(entry: str) -> str:
    return f"nci-{int(entry):05d}"  # as nci.tpsa_docs names it


def props_doc_ids(index: str, skill: str) -> tuple[str, str]:
    """(profile document, fact document) ids, as nci.property_docs names them."""
    return f"nciprop-{index}-profile", f"nciprop-{index}-{skill.split('.')[1]}"


def tpsa_task(ctx: TaskContext) -> Iterator[Item]:
    emitted = corpus_documents(TPSA_SOURCE)  # duplicate structures are skipped by the corpus
    records = nci.read_tpsa_records()
    pool = [t for _, _, t in records]
    prompt, answer = split_qa(template_with(nci.TPSA_TEMPLATES, "Question:"))

    def fmt(v: float) -> str:
        return answer.format(tpsa=f"{v:.2f}")

    for entry, smiles, tpsa in records:
        doc_id = tpsa_doc_id(entry)
        if not ctx.held_out(doc_id, emitted):
            continue
        wrong = nearby(ctx.rng, tpsa, pool, fmt)
        if wrong is None:
            ctx.skip("no_distractors")
            continue
        question = render(prompt, {"mol": molecule_seg(smiles)})
        prov = provenance(TPSA_SOURCE, [doc_id], entry=entry, smiles=smiles)
        yield multiple_choice(ctx, f"tpsa-{doc_id}-mc", "mol.tpsa", question, fmt(tpsa), wrong, prov)
        yield short_answer(f"tpsa-{doc_id}-sa", "mol.tpsa", question, tpsa, prov, rel_tol=0.01, abs_tol=0.01)


def mol_props_task(ctx: TaskContext) -> Iterator[Item]:
    emitted = corpus_documents(PROPS_SOURCE)
    records = [(index, mol) for index, mol in nci.read_property_records() if mol is not None]
    values = {index: nci.property_values(mol) for index, mol in records}
    prompt, answer = split_qa(template_with(nci.PROPERTY_TEMPLATES, "Question:"))
    for index, mol in records:
        smiles = Chem.MolToSmiles(mol)
        for skill in PROPS:
            profile_id, fact_id = props_doc_ids(index, skill)
            # the profile table lists every property, so it and the fact's own document (where the
            # corpus wrote one) must both be held out
            if not ctx.held_out(profile_id, emitted):
                continue
            if fact_id in emitted and split_of(fact_id) != "test":
                ctx.skip("fact_document_not_test")
                continue
            unit = nci.PROPERTY_UNITS.get(skill, "")

            def fmt(v: float, unit: str = unit) -> str:
                return answer.format(value=num(v, 6), unit=unit)

            value = values[index][skill]
            if skill == "mol.mw":
                wrong = nearby(ctx.rng, value, (v["mol.mw"] for v in values.values()), fmt)
            else:
                wrong = nearby_ints(ctx.rng, int(value), fmt)
            if wrong is None:
                ctx.skip("no_distractors")
                continue
            question = render(prompt, {"mol": molecule_seg(smiles)}, phrase=nci.PROPERTIES[skill][1])
            doc_ids = [profile_id] + ([fact_id] if fact_id in emitted else [])
            prov = provenance(PROPS_SOURCE, doc_ids, index=index, field=nci.PROPERTIES[skill][0], smiles=smiles)
            item_id = f"props-{fact_id}"
            yield multiple_choice(ctx, f"{item_id}-mc", skill, question, fmt(value), wrong, prov)
            if skill == "mol.mw":
                yield short_answer(f"{item_id}-sa", skill, question, value, prov, rel_tol=0.01)
