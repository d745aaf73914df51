"""Which corpus documents a default build writes, and the rule that keeps eval items off the train split."""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path

from scifm.data.corpus.build import source_context
from scifm.data.documents import Document
from scifm.data.skips import SkipCounter

# `scifm data build` and training build the corpus with seed 0. Only documents drawn with the
# source's RNG (table slices, generated LaTeX, chosen templates) depend on it; ids do not.
CORPUS_SEED = 0


@functools.cache
def corpus_documents(source: str) -> dict[str, Document]:
    """The documents of one corpus source by id, produced by running the source as a build does.

    Running the source (not re-deriving its rules) gives exactly the ids it writes, so records it
    skips (duplicates, unparsable) and documents that exist only by an RNG draw are known.
    """
    from scifm.data.corpus.registry import SOURCES

    with tempfile.TemporaryDirectory() as root:
        ctx = source_context(source, CORPUS_SEED, SkipCounter(max_bad_fraction=1.0), Path(root))
        return {doc.id: doc for doc in SOURCES[source](ctx)}


def text_of(doc: Document) -> str:
    return "".join(s["text"] for s in doc.segments if s["type"] == "text")


def states(doc: Document, *values: str) -> bool:
    """Whether the document's prose mentions every value as a whole word (case-insensitive).

    Conservative on purpose: a false match only drops an eval item, a miss would leak one.
    """
    text = text_of(doc)
    return all(re.search(rf"(?<![\w.]){re.escape(v)}(?!\w|\.\d)", text, re.IGNORECASE) for v in values)
