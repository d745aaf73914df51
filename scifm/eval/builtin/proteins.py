"""Protein tasks on pyhmmer's shipped proteome: length, molecular weight and pI by Biopython's ProtParam."""

from __future__ import annotations

from collections.abc import Iterator

from scifm.data.corpus import proteins
from scifm.data.corpus.common import protein_seg, render
from scifm.eval.builtin.common import (
    Item,
    TaskContext,
    multiple_choice,
    nearby,
    provenance,
    short_answer,
    split_qa,
    template_with,
)
from scifm.eval.builtin.held_out import corpus_documents

SOURCE = "pyhmmer-proteome"
# skill -> (template field, how the corpus formats the value)
FIELDS = {"protein.length": ("length", "{:.0f}"), "protein.mw": ("mw", "{:.1f}"), "protein.pi": ("pi", "{:.2f}")}


def protein_doc_id(record_id: str) -> str:
    return f"prot-{record_id}"  # as proteins.protein_docs names it


def protein_props_task(ctx: TaskContext) -> Iterator[Item]:
    emitted = corpus_documents(SOURCE)
    records = [r for r in proteins.read_protein_records() if protein_doc_id(r.id) in emitted]
    sequences = {r.id: r.sequence.rstrip("*") for r in records}  # the corpus drops the stop marker too
    # every protein's values, as pools of plausible distractors
    facts = {r.id: proteins.protein_facts(r, sequences[r.id]) for r in records}
    for record in records:
        doc_id = protein_doc_id(record.id)
        if not ctx.held_out(doc_id):
            continue
        slots = {"protein": protein_seg(sequences[record.id])}
        prov = provenance(SOURCE, [doc_id], protein_id=record.id)
        for skill, (name, spec) in FIELDS.items():
            prompt, answer = split_qa(template_with(proteins.TEMPLATES[skill], "Question:"))

            def fmt(v: float, name: str = name, spec: str = spec, answer: str = answer) -> str:
                return answer.format(**{name: spec.format(v)})

            value = float(facts[record.id][name])
            wrong = nearby(ctx.rng, value, (float(f[name]) for f in facts.values()), fmt, gap=0.05)
            if wrong is None:
                ctx.skip("no_distractors")
                continue
            question = render(prompt, slots)
            yield multiple_choice(ctx, f"protein-{doc_id}-{name}-mc", skill, question, fmt(value), wrong, prov)
            if skill == "protein.length":
                yield short_answer(f"protein-{doc_id}-{name}-sa", skill, question, int(value), prov)
