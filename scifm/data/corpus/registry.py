"""The corpus sources, by name: each is a generator of documents over a SourceContext."""

from __future__ import annotations

from functools import partial

from scifm.data.corpus import (
    chembl,
    codons,
    elements,
    images,
    latex_generated,
    latex_pairs,
    nci,
    plots,
    proteins,
    tables,
)
from scifm.data.corpus.common import Source
from scifm.data.corpus.table_data import sklearn_tables, statsmodels_tables

# Order is the build order; names are the JSONL file stems and the documents' `source` field.
SOURCES: dict[str, Source] = {
    "rdkit-nci": nci.tpsa_docs,
    "rdkit-nci-props": nci.property_docs,
    "chembl-fraggle": chembl.fraggle_docs,
    "chembl-freewilson": chembl.freewilson_docs,
    "rdkit-elements": elements.element_docs,
    "pyhmmer-proteome": proteins.protein_docs,
    "biopython-codons": codons.codon_docs,
    "sklearn-tables": partial(tables.table_docs, load=sklearn_tables),
    "statsmodels-tables": partial(tables.table_docs, load=statsmodels_tables),
    "matplotlib-plots": plots.plot_docs,
    "skimage-images": images.image_docs,
    "sympy-latex-pairs": latex_pairs.latex_pair_docs,
    "sympy-generated": latex_generated.generated_docs,
}
