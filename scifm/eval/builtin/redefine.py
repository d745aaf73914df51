"""Redefinition: the prompt gives a symbol a new value and the right answer contradicts the memorised one.

As in the inverse-scaling "redefine math" task ("Redefine π as 462. Q: What is the first digit of π?
A: 4"), over mathematical constants (values computed by SymPy; the corpus does not state them), and
over held-out element and codon records, asked with the corpus's own question wording after the
redefinition. Each item's `memorised` field is the index of the choice memory would give.
"""

from __future__ import annotations

from collections.abc import Iterator

import sympy as sp
from Bio.Data import CodonTable

from scifm.data.corpus import codons, elements
from scifm.data.corpus.common import num, text_seg
from scifm.eval.builtin.codons import SOURCE as CODON_SOURCE
from scifm.eval.builtin.codons import all_codons, codon_doc_id, neighbour_meanings, spell
from scifm.eval.builtin.common import N_CHOICES, Item, TaskContext, multiple_choice, provenance, split_qa, template_with
from scifm.eval.builtin.elements import SOURCE as ELEMENT_SOURCE
from scifm.eval.builtin.elements import Element, element_doc_id, neighbours, periodic_table
from scifm.eval.builtin.held_out import corpus_documents

CONSTANTS = {"pi": sp.pi, "e": sp.E, "phi": sp.GoldenRatio, "tau": 2 * sp.pi}
VALUES_PER_CONSTANT = 4
REDEFINITIONS = ("Redefine {name} as {value}.", "Let {name} be {value}.", "Suppose {name} equals {value}.")


def redefined(ctx: TaskContext, item_id: str, skill: str, question: list[dict], right: str, memorised: str,
              wrong: list[str], prov: dict) -> Item:
    others = [w for w in dict.fromkeys(wrong) if w not in (right, memorised)][: N_CHOICES - 2]
    item = multiple_choice(ctx, item_id, skill, question, right, [memorised, *others], prov)
    item["memorised"] = item["choices"].index(memorised)
    return item


def constant_items(ctx: TaskContext) -> Iterator[Item]:
    for name, constant in CONSTANTS.items():
        true_value = float(constant)
        first = str(true_value)[0]
        prov = provenance("sympy-constants", [], constant=str(constant), value=true_value)
        for k in range(VALUES_PER_CONSTANT):
            value = ctx.rng.choice([v for v in range(100, 1000) if str(v)[0] != first])
            intro = ctx.rng.choice(REDEFINITIONS).format(name=name, value=value)
            digits = [d for d in "123456789" if d not in (str(value)[0], first)]
            yield redefined(ctx, f"redefine-{name}-{k}-digit", "redefine.constant",
                            [text_seg(f"{intro} Question: what is the first digit of {name}? Answer:")],
                            f" {str(value)[0]}", f" {first}", [f" {d}" for d in ctx.rng.sample(digits, 2)], prov)
            yield redefined(ctx, f"redefine-{name}-{k}-plus", "redefine.constant",
                            [text_seg(f"{intro} Question: what is {name} plus 1? Answer:")],
                            f" {value + 1}", f" {num(true_value + 1, 6)}", [f" {value}", f" {value + 10}"], prov)


def element_items(ctx: TaskContext) -> Iterator[Item]:
    docs = corpus_documents(ELEMENT_SOURCE)
    table = periodic_table()
    by_number = split_qa(template_with(elements.TEMPLATES["chem.element"], "which element has atomic number"))
    number_of = split_qa(template_with(elements.TEMPLATES["chem.element"], "what is the atomic number of"))
    for e in table:
        doc_id = element_doc_id(e.z, "chem.element")
        if not ctx.held_out(doc_id, docs):
            continue
        prov = provenance(ELEMENT_SOURCE, [doc_id], z=e.z)
        near = neighbours(table, e.z)
        other = ctx.rng.choice([o for o in table if o != e and o not in near])

        def fmt(o: Element) -> str:
            return by_number[1].format(name=o.name, symbol=o.symbol)

        intro = f"Suppose element number {e.z} were called {other.name} ({other.symbol})."
        yield redefined(ctx, f"redefine-element-{e.z:03d}-name", "redefine.element",
                        [text_seg(f"{intro} {by_number[0].format(z=e.z)}")],
                        fmt(other), fmt(e), [fmt(o) for o in near], prov)
        z2 = ctx.rng.choice([z for z in range(1, len(table) + 1) if abs(z - e.z) > 3])
        intro = f"Let {e.name} have atomic number {z2}."
        yield redefined(ctx, f"redefine-element-{e.z:03d}-number", "redefine.element",
                        [text_seg(f"{intro} {number_of[0].format(name=e.name)}")],
                        number_of[1].format(z=z2), number_of[1].format(z=e.z),
                        [number_of[1].format(z=z) for z in (e.z + 1, z2 + 1, e.z - 1)], prov)


def codon_items(ctx: TaskContext) -> Iterator[Item]:
    emitted = corpus_documents(CODON_SOURCE)
    standard = CodonTable.unambiguous_dna_by_id[codons.STANDARD_ID]
    code = codons.table_name(standard)
    prompt, answer = split_qa(template_with(codons.CODON_TEMPLATES, "Question:"))
    for dna in all_codons():
        doc_id = codon_doc_id(codons.STANDARD_ID, dna)
        if not ctx.held_out(doc_id, emitted):
            continue
        prov = provenance(CODON_SOURCE, [doc_id], table_id=codons.STANDARD_ID, codon=dna)
        memorised = answer.format(meaning=codons.meaning(standard, dna))
        options = [answer.format(meaning=m) for m in neighbour_meanings(ctx.rng, standard, dna)]
        for k, new in enumerate(options[:2]):
            codon, alphabet = spell(ctx.rng, dna)
            intro = f"Let the {alphabet} codon {codon} code for{new} in {code}."
            question = [text_seg(f"{intro} {prompt.format(code=code, alphabet=alphabet, codon=codon)}")]
            yield redefined(ctx, f"redefine-codon-{dna}-{k}", "redefine.codon", question,
                            new, memorised, [o for o in options if o != new], prov)


def redefine_task(ctx: TaskContext) -> Iterator[Item]:
    yield from constant_items(ctx)
    yield from element_items(ctx)
    yield from codon_items(ctx)
