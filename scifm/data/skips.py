"""Counting of skipped documents per source and reason, with a bad-fraction budget per source.

A loader keeps one counter for its split, and its streams hand it only the records of that split
(bad ones included, see DocumentStream), so the budget compares like with like.
"""

from __future__ import annotations

from collections import defaultdict

from scifm.core.errors import BadFractionExceeded

# A source is judged only after this many documents, so one early bad record cannot stop a run.
MIN_DOCS_BEFORE_BUDGET = 50


class SkipCounter:
    def __init__(self, max_bad_fraction: float = 0.05, split: str = ""):
        self.max_bad_fraction = max_bad_fraction
        self.split = split  # named in the error, so a stop in validation is not taken for training data
        self.seen: dict[str, int] = defaultdict(int)
        self.skipped: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.examples: dict[tuple[str, str], str] = {}

    def ok(self, source: str, n: int = 1) -> None:
        self.seen[source] += n

    def skip(self, source: str, reason: str, doc_id: str) -> None:
        self.seen[source] += 1
        self.skipped[source][reason] += 1
        self.examples.setdefault((source, reason), doc_id)
        self.check(source)

    def check(self, source: str) -> None:
        n_seen = self.seen[source]
        n_bad = sum(self.skipped[source].values())
        if n_seen >= MIN_DOCS_BEFORE_BUDGET and n_bad / n_seen > self.max_bad_fraction:
            reason = max(self.skipped[source], key=self.skipped[source].get)
            where = f"source '{source}'" + (f" ({self.split} split)" if self.split else "")
            raise BadFractionExceeded(
                f"{where}: {n_bad} of {n_seen} documents were bad "
                f"(budget {self.max_bad_fraction:.1%}); most common reason '{reason}', "
                f"e.g. document '{self.examples[(source, reason)]}'. Fix the data or raise "
                f"data.max_bad_fraction."
            )

    def as_dict(self) -> dict:
        return {
            src: {"seen": self.seen[src], "skipped": dict(self.skipped.get(src, {}))}
            for src in sorted(self.seen)
        }

    def state_dict(self) -> dict:
        return {
            "seen": dict(self.seen),
            "skipped": {s: dict(r) for s, r in self.skipped.items()},
            "examples": [[s, r, d] for (s, r), d in self.examples.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.seen = defaultdict(int, state["seen"])
        self.skipped = defaultdict(lambda: defaultdict(int))
        for s, reasons in state["skipped"].items():
            self.skipped[s].update(reasons)
        self.examples = {(s, r): d for s, r, d in state["examples"]}
