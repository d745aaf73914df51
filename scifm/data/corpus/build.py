"""`scifm data build`: writes the built-in corpus, its split manifest and a build report.

Layout of a corpus directory:
  <source>.jsonl      documents of one source (docs/architecture.md, "Document format")
  figures/*.png       images that figure segments point to, by paths relative to the directory
  splits.json         the split rule, counts, and the validation and test ids
  build_report.json   version, parameters, documents per source and skill, skipped records
The directory is built beside its final place and swapped in, so a reader never sees half a corpus.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

from scifm.data.build_once import build_once
from scifm.data.corpus.common import FIGURES_DIR, SourceContext
from scifm.data.corpus.version import CORPUS_VERSION
from scifm.data.documents import SPLITS, split_of, write_jsonl
from scifm.data.skips import SkipCounter
from scifm.core.errors import DataError
from scifm.core.progress import Progress

REPORT_FILE = "build_report.json"
SPLITS_FILE = "splits.json"
# Raw records a source may lose (unparsable, duplicate ...) before the build stops: a broken
# package upgrade shows up as an error, the few bad records real data holds do not.
MAX_BAD_FRACTION = 0.2
SPLIT_RULE = (
    "split_of(id) in scifm.data.documents: u = first 8 bytes of sha256(id) as a big-endian integer / 2**64; "
    "test if u < 0.05, validation if u < 0.10, train otherwise"
)


def build_corpus(out_dir: str | Path, *, max_docs_per_source: int | None = None, seed: int = 0) -> dict:
    """Builds the corpus into `out_dir` and returns its report; an up-to-date corpus is not rebuilt.

    Safe to call from several processes at once (e.g. every rank of a job): see build_once.
    """
    out_dir = Path(out_dir)
    params = {"max_docs_per_source": max_docs_per_source, "seed": seed}
    return build_once(out_dir, marker=REPORT_FILE, kind="scifm corpus",
                      is_current=lambda d: cached_report(d, params), write=lambda root: write_corpus(root, params))


def cached_report(out_dir: Path, params: dict) -> dict | None:
    try:
        report = json.loads((out_dir / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if report.get("version") != CORPUS_VERSION or report.get("params") != params:
        return None
    files = [out_dir / SPLITS_FILE] + [out_dir / f"{name}.jsonl" for name in report.get("docs_per_source", {})]
    return report if all(f.is_file() for f in files) else None


def source_context(name: str, seed: int, skips: SkipCounter, root: Path) -> SourceContext:
    """The context source `name` is run with in a build of seed `seed`: one RNG per source, seeded by
    name, so a source's documents do not depend on the others."""
    return SourceContext(name, random.Random(f"{seed}:{name}"), skips, root)


def write_corpus(root: Path, params: dict) -> dict:
    # imported here: the sources pull in RDKit, SymPy, matplotlib ..., which a cached corpus does not need
    from scifm.data.corpus.registry import SOURCES

    skips = SkipCounter(max_bad_fraction=MAX_BAD_FRACTION)
    per_source: dict[str, int] = {}
    per_skill: Counter[str] = Counter()
    held_out: dict[str, list[str]] = {"validation": [], "test": []}
    split_counts: Counter[str] = Counter()
    ids: set[str] = set()
    progress = Progress("building the corpus", len(SOURCES), "sources")
    for name, source in SOURCES.items():
        ctx = source_context(name, params["seed"], skips, root)
        docs = []
        for doc in itertools.islice(source(ctx), params["max_docs_per_source"]):
            skips.ok(name)  # counted as they come, so the bad-fraction budget sees good and bad in order
            docs.append(doc)
            if doc.id in ids:
                raise DataError(f"source '{name}' repeats document id '{doc.id}'")
            ids.add(doc.id)
            per_skill[doc.skill] += 1
            split = split_of(doc.id)
            split_counts[split] += 1
            if split in held_out:
                held_out[split].append(doc.id)
        per_source[name] = write_jsonl(root / f"{name}.jsonl", docs)
        progress()
    progress.finish()
    manifest = {
        "rule": SPLIT_RULE,
        "counts": {s: split_counts[s] for s in SPLITS},
        **{s: sorted(v) for s, v in held_out.items()},
    }
    write_json(root / SPLITS_FILE, manifest)
    report = {
        "version": CORPUS_VERSION,
        "params": params,
        "total_docs": sum(per_source.values()),
        "figures": len(list((root / FIGURES_DIR).glob("*.png"))),
        "docs_per_source": per_source,
        "docs_per_skill": dict(sorted(per_skill.items())),
        "splits": manifest["counts"],
        "skipped": skips.as_dict(),
    }
    write_json(root / REPORT_FILE, report)  # written last: its presence marks a complete corpus
    return report


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
