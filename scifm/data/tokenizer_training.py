"""Training the run's tokenizer on the train split of its own sources."""

from __future__ import annotations

import itertools

from tokenizers import Tokenizer

from scifm.core.progress import Progress
from scifm.data.config import DataConfig
from scifm.data.documents import Document
from scifm.data.streams import DocumentStream, SourceSpec
from scifm.tokenizers import ScientificTokenizer


def _train_documents(specs: list[SourceSpec], limit: int):
    """Round-robin over sources (one pass each) so every source shapes the vocabulary. Indexed sources
    are left out: their ids already belong to the tokenizer saved beside them."""
    def one_pass(spec: SourceSpec):
        stream = DocumentStream(spec, "train")
        while stream.cursor[0] == 0:
            _, doc, _ = stream.next()
            if isinstance(doc, Document) and stream.cursor[0] == 0:
                yield doc

    passes = [one_pass(s) for s in specs if s.index is None]
    docs = (d for group in itertools.zip_longest(*passes) for d in group if d is not None)
    return itertools.islice(docs, limit)


def train_tokenizer(specs: list[SourceSpec], cfg: DataConfig,
                    pretrained: tuple[Tokenizer, int] | None = None) -> ScientificTokenizer:
    """`pretrained`: (prose tokenizer, its model's vocabulary) to keep; then only the domains are learned."""
    texts, smiles, latex = [], [], []
    progress = Progress("tokenizer: reading its training documents", cfg.tokenizer_train_docs, "docs")
    for doc in _train_documents(specs, cfg.tokenizer_train_docs):
        progress()
        for seg in doc.segments:
            kind = seg["type"]
            if kind == "text":
                texts.append(seg["text"])
            elif kind == "molecule":
                smiles.append(seg["smiles"])
            elif kind == "latex":
                latex.append(seg["latex"])
            elif kind == "table":
                texts.append(" ".join(str(c) for c in seg["columns"]))
                texts.extend(" ".join(str(c) for c in row) for row in seg["rows"])
                texts.append(str(seg.get("caption", "")))
    progress.finish()  # the sources may hold fewer documents than the limit
    return ScientificTokenizer.train(texts, vocab_size=cfg.tokenizer_vocab_size, smiles=smiles, latex=latex,
                                     pretrained=pretrained)
