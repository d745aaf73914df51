"""Element facts from RDKit's periodic table."""

from __future__ import annotations

from collections.abc import Iterator

from rdkit import Chem

from scifm.data.corpus.common import SourceContext, num, render
from scifm.data.documents import Document

TEMPLATES: dict[str, tuple[str, ...]] = {
    "chem.element": (
        "Element number {z} is {name}, with the chemical symbol {symbol}.",
        "Question: which element has atomic number {z}? Answer: {name} ({symbol}).",
        "The symbol {symbol} stands for {name}, whose nucleus holds {z} protons.",
        "Question: what is the atomic number of {name}? Answer: {z}.",
    ),
    "chem.atomic_weight": (
        "The atomic weight of {name} ({symbol}) is {weight}.",
        "Question: what atomic weight is tabulated for {name}? Answer: {weight}.",
        "{name_cap}, element {z}, has an atomic weight of {weight}.",
    ),
    "chem.period": (
        "{name_cap} ({symbol}, Z = {z}) sits in period {period} of the periodic table.",
        "Question: in which period of the periodic table is {name} found? Answer: period {period}.",
    ),
    "chem.isotope": (
        "The most common isotope of {name} is {symbol}-{isotope}, with a mass of {isotope_mass} u.",
        "Question: what is the mass number of the most common isotope of {name}? Answer: {isotope}.",
    ),
}


def element_docs(ctx: SourceContext) -> Iterator[Document]:
    table = Chem.GetPeriodicTable()
    for z in range(1, table.GetMaxAtomicNumber() + 1):
        name = table.GetElementName(z).lower()
        facts = {
            "z": z,
            "name": name,
            "name_cap": name.capitalize(),
            "symbol": table.GetElementSymbol(z),
            "weight": num(table.GetAtomicWeight(z), 6),
            "period": table.GetRow(z),
            "isotope": table.GetMostCommonIsotope(z),
            "isotope_mass": num(table.GetMostCommonIsotopeMass(z), 8),
        }
        for skill, templates in TEMPLATES.items():
            yield ctx.doc(f"element-{z:03d}-{skill.split('.')[1]}", skill, render(ctx.rng.choice(templates), **facts))
