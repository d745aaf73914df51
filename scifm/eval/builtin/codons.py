"""Codon tasks on Biopython's NCBI codon tables: what a codon specifies, and which codons start translation."""

from __future__ import annotations

import random
from collections.abc import Iterator

from Bio.Data import CodonTable

from scifm.data.corpus import codons
from scifm.data.corpus.common import render
from scifm.eval.builtin.common import N_CHOICES, Item, TaskContext, multiple_choice, provenance, split_qa, template_with
from scifm.eval.builtin.held_out import corpus_documents

SOURCE = "biopython-codons"
BASES = "TCAG"


def all_codons() -> list[str]:
    standard = CodonTable.unambiguous_dna_by_id[codons.STANDARD_ID]
    return sorted(list(standard.forward_table) + standard.stop_codons)


def codon_doc_id(table_id: int, dna: str) -> str:
    """The corpus document that states what `dna` means in table `table_id`. A codon a code reads
    like the standard code has no document of its own (codons.codon_docs writes only the changes),
    so the standard code's document is the one that states it."""
    tables = CodonTable.unambiguous_dna_by_id
    standard = tables[codons.STANDARD_ID]
    if codons.meaning(tables[table_id], dna) == codons.meaning(standard, dna):
        table_id = codons.STANDARD_ID
    return f"codon-{table_id}-{dna}"


def spell(rng: random.Random, dna: str) -> tuple[str, str]:
    """(codon, 'DNA'/'mRNA'): both alphabets, as the corpus writes them."""
    return (dna.replace("T", "U"), "mRNA") if rng.random() < 0.5 else (dna, "DNA")


def neighbour_meanings(rng: random.Random, table: CodonTable.CodonTable, dna: str) -> list[str]:
    """Meanings of codons one base away (the plausible misreadings), then any others, without the answer."""
    right = codons.meaning(table, dna)
    near = {codons.meaning(table, dna[:i] + b + dna[i + 1:]) for i in range(3) for b in BASES} - {right}
    rest = {codons.meaning(table, c) for c in all_codons()} - near - {right}
    picked = rng.sample(sorted(near), min(len(near), N_CHOICES - 1))
    return picked + rng.sample(sorted(rest), N_CHOICES - 1 - len(picked))


def codon_task(ctx: TaskContext) -> Iterator[Item]:
    emitted = corpus_documents(SOURCE)
    tables = CodonTable.unambiguous_dna_by_id
    prompt, answer = split_qa(template_with(codons.CODON_TEMPLATES, "Question:"))
    for table_id, table in tables.items():
        code = codons.table_name(table)
        for dna in all_codons():
            doc_id = codon_doc_id(table_id, dna)
            if not ctx.held_out(doc_id, emitted):
                continue
            codon, alphabet = spell(ctx.rng, dna)
            question = render(prompt, code=code, alphabet=alphabet, codon=codon)
            right = answer.format(meaning=codons.meaning(table, dna))
            wrong = [answer.format(meaning=m) for m in neighbour_meanings(ctx.rng, table, dna)]
            prov = provenance(SOURCE, [doc_id], table_id=table_id, codon=dna)
            yield multiple_choice(ctx, f"codon-{table_id}-{dna}", "bio.codon", question, right, wrong, prov)
    prompt, answer = split_qa(template_with(codons.START_TEMPLATES, "Question:"))
    starts = {tid: answer.format(codons=", ".join(t.start_codons)) for tid, t in tables.items()}
    for table_id, table in tables.items():
        doc_id = f"codon-{table_id}-start"  # as codons.codon_docs names it
        if not ctx.held_out(doc_id, emitted):
            continue
        others = sorted(set(starts.values()) - {starts[table_id]})
        question = render(prompt, code=codons.table_name(table))
        prov = provenance(SOURCE, [doc_id], table_id=table_id)
        wrong = ctx.rng.sample(others, N_CHOICES - 1)
        yield multiple_choice(ctx, f"codon-{table_id}-start", "bio.start_codon", question, starts[table_id], wrong,
                              prov)
