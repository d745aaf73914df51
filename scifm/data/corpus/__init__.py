"""The built-in corpus: documents made from real data that ships inside pip packages.

    from scifm.data.corpus import build_corpus, default_corpus_dir
    report = build_corpus(default_corpus_dir())

`build_corpus` and `DEFAULT_SOURCES` are imported on first use: they pull in RDKit, SymPy,
matplotlib and friends, which callers that only need `default_corpus_dir` should not pay for.
"""

from __future__ import annotations

from scifm.data.corpus.version import CORPUS_VERSION, default_corpus_dir

__all__ = ["build_corpus", "default_corpus_dir", "CORPUS_VERSION", "DEFAULT_SOURCES"]


def __getattr__(name: str) -> object:
    if name == "build_corpus":
        from scifm.data.corpus.build import build_corpus

        return build_corpus
    if name == "DEFAULT_SOURCES":
        from scifm.data.corpus.registry import SOURCES

        return tuple(SOURCES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
