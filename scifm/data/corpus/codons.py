"""Genetic codes from Biopython's NCBI codon tables as text facts."""

from __future__ import annotations

from collections.abc import Iterator

from Bio.Data import CodonTable

from scifm.data.corpus import amino_acids
from scifm.data.corpus.common import SourceContext, render
from scifm.data.documents import Document

STANDARD_ID = 1


def table_name(table: CodonTable.CodonTable) -> str:
    names = [n for n in table.names if n and not n.startswith("SGC")]
    return f"the {' / '.join(names)} code (NCBI table {table.id})"


def meaning(table: CodonTable.CodonTable, codon: str) -> str:
    """What a DNA codon means in a table; some codes read a stop codon as a residue in context."""
    aa = table.forward_table.get(codon)
    if aa is None:
        return "a stop signal"
    if codon in table.stop_codons:
        return f"either {amino_acids.describe(aa)} or a stop signal, depending on context"
    return amino_acids.describe(aa)


def spell(ctx: SourceContext, codon: str) -> tuple[str, str]:
    """(codon, 'DNA'/'mRNA'): the same fact written for the DNA or the RNA alphabet."""
    return (codon.replace("T", "U"), "mRNA") if ctx.rng.random() < 0.5 else (codon, "DNA")


CODON_TEMPLATES = (
    "In {code}, the {alphabet} codon {codon} codes for {meaning}.",
    "Question: what does the {alphabet} codon {codon} specify in {code}? Answer: {meaning}.",
    "Reading the triplet {codon} ({alphabet}) with {code} gives {meaning}.",
)
SET_TEMPLATES = (
    "In {code}, {residue} is encoded by {n} codons: {codons}.",
    "Question: which codons encode {residue} in {code}? Answer: {codons}.",
)
CHANGE_TEMPLATES = (
    "In {code}, the {alphabet} codon {codon} means {meaning}, whereas the standard code reads it as {standard}.",
    "Question: how does {code} read {codon}, and how does that differ from the standard code? "
    "Answer: as {meaning} instead of {standard}.",
)
START_TEMPLATES = (
    "The start codons of {code} are {codons}.",
    "Question: which codons can initiate translation in {code}? Answer: {codons}.",
)


def codon_docs(ctx: SourceContext) -> Iterator[Document]:
    tables = CodonTable.unambiguous_dna_by_id
    standard = tables[STANDARD_ID]
    code = table_name(standard)
    all_codons = sorted(list(standard.forward_table) + standard.stop_codons)
    for dna in all_codons:
        codon, alphabet = spell(ctx, dna)
        segments = render(
            ctx.rng.choice(CODON_TEMPLATES), codon=codon, alphabet=alphabet, code=code, meaning=meaning(standard, dna)
        )
        yield ctx.doc(f"codon-1-{dna}", "bio.codon", segments)
    for aa in sorted(amino_acids.NAMES):
        codons = sorted(c for c, a in standard.forward_table.items() if a == aa)
        segments = render(
            ctx.rng.choice(SET_TEMPLATES),
            code=code,
            residue=amino_acids.describe(aa),
            n=len(codons),
            codons=", ".join(codons),
        )
        yield ctx.doc(f"codon-1-aa-{aa}", "bio.codon", segments)
    for table_id, table in tables.items():
        code = table_name(table)
        for dna in all_codons:
            if table_id == STANDARD_ID or meaning(table, dna) == meaning(standard, dna):
                continue
            codon, alphabet = spell(ctx, dna)
            segments = render(
                ctx.rng.choice(CHANGE_TEMPLATES),
                code=code, alphabet=alphabet, codon=codon, meaning=meaning(table, dna), standard=meaning(standard, dna),
            )  # fmt: skip
            yield ctx.doc(f"codon-{table_id}-{dna}", "bio.codon", segments)
        segments = render(ctx.rng.choice(START_TEMPLATES), code=code, codons=", ".join(table.start_codons))
        yield ctx.doc(f"codon-{table_id}-start", "bio.start_codon", segments)
