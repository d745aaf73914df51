"""The predicted proteome shipped with pyhmmer's tests, with facts from Biopython's ProtParam."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

from Bio import SeqIO
from Bio.SeqUtils.ProtParam import ProteinAnalysis

from scifm.data.corpus import amino_acids
from scifm.data.corpus.common import INLINE_FRACTION, Slot, SourceContext, package_file, protein_seg, render
from scifm.data.documents import Document

# Every protein here is longer than the tokenizer's 27-letter auto-detection threshold;
# only short ones are written into prose, where a long one would swamp the sentence.
INLINE_MAX_LENGTH = 150


@dataclass(frozen=True)
class ProteinRecord:
    id: str
    description: str  # Prodigal-style: "id # start # end # strand # ID=...;partial=..."
    sequence: str  # as in the file, stop marker included


def read_protein_records() -> list[ProteinRecord]:
    text = package_file("pyhmmer", "tests", "data", "seqs", "938293.PRJEB85.HG003687.faa").read_text()
    return [ProteinRecord(r.id, r.description, str(r.seq)) for r in SeqIO.parse(io.StringIO(text), "fasta")]


def gene_location(record: ProteinRecord) -> dict[str, str]:
    """Template values for where the gene lies; empty where the header does not say."""
    try:
        start, end, strand = (int(f) for f in record.description.split(" # ")[1:4])
    except ValueError:
        return {}
    return {
        "strand": "forward" if strand == 1 else "reverse",
        "contig": record.id.rsplit("_", 1)[0].rsplit(".", 1)[-1],
        "start": str(start),
        "end": str(end),
        "nt": str(end - start + 1),
    }


def protein_slot(ctx: SourceContext, sequence: str) -> Slot:
    if len(sequence) <= INLINE_MAX_LENGTH and ctx.rng.random() < INLINE_FRACTION:
        return f"the sequence {sequence}"
    return protein_seg(sequence)


TEMPLATES: dict[str, tuple[str, ...]] = {
    "protein.length": (
        "Predicted protein {pid} is {protein} and it is {length} residues long.",
        "Question: how many amino acids make up {protein} in total? Answer: {length}.",
        "Counting residues of {protein} one by one gives a chain length of {length}.",
    ),
    "protein.mw": (
        "The molecular weight of {protein} as computed from its residues is {mw} Da.",
        "Question: what is the average molecular mass of {protein} in daltons? Answer: {mw} Da.",
        "Protein {pid}, {protein} weighs about {kda} kDa ({mw} Da).",
    ),
    "protein.pi": (
        "The isoelectric point of {protein} is estimated at pH {pi}.",
        "Question: at what pH is {protein} expected to carry no net charge? Answer: about {pi}.",
        "Protein {pid}, {protein} has a theoretical pI of {pi}.",
    ),
    "protein.composition": (
        "The most frequent residue in {protein} is {residue}, which occurs {count} times out of {length}.",
        "Question: which amino acid is most common in {protein} and how often? Answer: {residue}, "
        "{count} of {length} residues ({percent}%).",
    ),
    "protein.gravy": (
        "The grand average of hydropathy (GRAVY) of {protein} is {gravy}, so it is {polarity} on average.",
        "Question: what is the Kyte-Doolittle GRAVY score of {protein} overall? Answer: {gravy}.",
    ),
    "protein.gene": (
        "Protein {pid} is encoded on the {strand} strand of contig {contig} at positions {start}-{end}, "
        "a gene of {nt} nucleotides. Its product is {protein} with {length} residues.",
        "Question: where is the gene for {protein} located? Answer: on the {strand} strand of contig "
        "{contig}, from position {start} to {end} ({nt} nt).",
    ),
}


# the value a skill's templates need beyond those every protein has
NEEDS = {"protein.composition": "residue", "protein.gene": "start"}


def protein_facts(record: ProteinRecord, sequence: str) -> dict[str, str]:
    """Template values for one protein; composition only where one residue leads, location where known."""
    analysis = ProteinAnalysis(sequence)
    mw = analysis.molecular_weight()
    gravy = analysis.gravy()
    facts = {
        "pid": record.id,
        "length": str(len(sequence)),
        "mw": f"{mw:.1f}",
        "kda": f"{mw / 1000:.1f}",
        "pi": f"{analysis.isoelectric_point():.2f}",
        "gravy": f"{gravy:.3f}",
        "polarity": "hydrophobic" if gravy > 0 else "hydrophilic",
        **gene_location(record),
    }
    counts = analysis.count_amino_acids()
    top = max(counts.values())
    leaders = [aa for aa, c in counts.items() if c == top]
    if len(leaders) == 1:
        facts |= {
            "residue": amino_acids.describe(leaders[0]),
            "count": str(top),
            "percent": f"{100 * top / len(sequence):.1f}",
        }
    return facts


def protein_docs(ctx: SourceContext) -> Iterator[Document]:
    """One document per protein, about one property chosen by the source's RNG."""
    for record in read_protein_records():
        doc_id = f"prot-{record.id}"
        sequence = record.sequence.rstrip("*")  # the trailing '*' marks the stop codon, not a residue
        if not sequence:
            ctx.skip("empty_sequence", doc_id)
            continue
        if not set(sequence) <= amino_acids.STANDARD:
            ctx.skip("non_amino_acid", doc_id)
            continue
        facts = protein_facts(record, sequence)
        # skills whose values are missing (a tie for the top residue, no location) are not asked
        skills = [s for s in sorted(TEMPLATES) if NEEDS.get(s, "pid") in facts]
        skill = ctx.rng.choice(skills)
        template = ctx.rng.choice(TEMPLATES[skill])
        yield ctx.doc(doc_id, skill, render(template, {"protein": protein_slot(ctx, sequence)}, **facts))
