"""Element facts from RDKit's periodic table: name, symbol, atomic number and atomic weight."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from rdkit import Chem

from scifm.data.corpus import elements
from scifm.data.corpus.common import num, render
from scifm.data.documents import split_of
from scifm.eval.builtin.common import (
    N_CHOICES,
    Item,
    TaskContext,
    multiple_choice,
    nearby_ints,
    provenance,
    short_answer,
    split_qa,
    template_with,
)
from scifm.eval.builtin.held_out import corpus_documents, states

SOURCE = "rdkit-elements"


@dataclass(frozen=True)
class Element:
    z: int
    name: str  # lower case, as the corpus writes it
    symbol: str
    weight: str  # as the corpus formats it
    period: int
    isotope: int  # mass number of the most common isotope


def periodic_table() -> list[Element]:
    table = Chem.GetPeriodicTable()
    return [
        Element(z, table.GetElementName(z).lower(), table.GetElementSymbol(z), num(table.GetAtomicWeight(z), 6),
                table.GetRow(z), table.GetMostCommonIsotope(z))
        for z in range(1, table.GetMaxAtomicNumber() + 1)
    ]


def element_doc_id(z: int, skill: str) -> str:
    return f"element-{z:03d}-{skill.split('.')[1]}"  # as elements.element_docs names it


def neighbours(table: list[Element], z: int, k: int = N_CHOICES - 1) -> list[Element]:
    """The k elements closest in atomic number: the usual confusions."""
    return sorted((e for e in table if e.z != z), key=lambda e: (abs(e.z - z), e.z))[:k]


def lookalikes(table: list[Element], e: Element, k: int = N_CHOICES - 1) -> list[Element]:
    """Elements whose symbol starts with the same letter, nearest first; neighbours fill up."""
    same = sorted((o for o in table if o.z != e.z and o.symbol[0] == e.symbol[0]), key=lambda o: abs(o.z - e.z))
    rest = [o for o in neighbours(table, e.z, 2 * k) if o not in same]
    return (same + rest)[:k]


def elements_task(ctx: TaskContext) -> Iterator[Item]:
    docs = corpus_documents(SOURCE)
    table = periodic_table()
    for e in table:
        yield from identity_items(ctx, docs, table, e)
        yield from single_fact_items(ctx, docs, table, e)


def identity_items(ctx: TaskContext, docs: dict, table: list[Element], e: Element) -> Iterator[Item]:
    """Number -> name, name -> number, symbol -> name, from a held-out chem.element document."""
    doc_id = element_doc_id(e.z, "chem.element")
    if not ctx.held_out(doc_id, docs):
        return
    templates = elements.TEMPLATES["chem.element"]
    by_number = split_qa(template_with(templates, "which element has atomic number"))
    number_of = split_qa(template_with(templates, "what is the atomic number of"))
    symbol_prompt = template_with(templates, "The symbol {symbol} stands for").split(" {name}")[0]
    # The element's other documents repeat its name, symbol or number; a pair of them that a train
    # document states is not held out, so that question is not asked.
    train = [d for i, d in docs.items() if i.startswith(f"element-{e.z:03d}-") and split_of(i) == "train"]
    prov = provenance(SOURCE, [doc_id], z=e.z)
    questions = (
        ((str(e.z), e.name), "by_number", render(by_number[0], z=e.z),
         [by_number[1].format(name=o.name, symbol=o.symbol) for o in [e, *neighbours(table, e.z)]]),
        ((e.name, str(e.z)), "number", render(number_of[0], name=e.name),
         [number_of[1].format(z=e.z),
          *nearby_ints(ctx.rng, e.z, lambda z: number_of[1].format(z=z), lo=1, hi=len(table))]),
        ((e.symbol, e.name), "symbol", render(symbol_prompt, symbol=e.symbol),
         [f" {o.name}" for o in [e, *lookalikes(table, e)]]),
    )
    for pair, kind, question, (right, *wrong) in questions:
        if any(states(d, *pair) for d in train):
            ctx.skip("stated_in_train_document")
            continue
        yield multiple_choice(ctx, f"element-{e.z:03d}-{kind}", "chem.element", question, right, wrong, prov)


# skill -> (Element field, template field); each is stated by that skill's document only
SINGLE_FACTS = {"chem.atomic_weight": ("weight", "weight"), "chem.period": ("period", "period"),
                "chem.isotope": ("isotope", "isotope")}


def single_fact_items(ctx: TaskContext, docs: dict, table: list[Element], e: Element) -> Iterator[Item]:
    """Atomic weight, period and most common isotope, each from its own held-out document; the other
    options are the neighbouring elements' values (for the period, the other periods)."""
    for skill, (attr, field) in SINGLE_FACTS.items():
        doc_id = element_doc_id(e.z, skill)
        if not ctx.held_out(doc_id, docs):
            continue
        prompt, answer = split_qa(template_with(elements.TEMPLATES[skill], "Question:"))
        right = answer.format(**{field: getattr(e, attr)})
        pool = range(1, 8) if skill == "chem.period" else (getattr(o, attr) for o in neighbours(table, e.z, 8))
        wrong = [c for c in dict.fromkeys(answer.format(**{field: v}) for v in pool) if c != right]
        wrong = ctx.rng.sample(wrong[:6], N_CHOICES - 1)  # the 6 nearest, so options stay plausible
        question = render(prompt, name=e.name)
        prov = provenance(SOURCE, [doc_id], z=e.z)
        item_id = f"element-{e.z:03d}-{attr}"
        yield multiple_choice(ctx, f"{item_id}-mc", skill, question, right, wrong, prov)
        if skill != "chem.period":
            yield short_answer(f"{item_id}-sa", skill, question, float(getattr(e, attr)), prov, rel_tol=0.001)
