"""Pieces every built-in task shares: the context it writes through, item records, distractors, templates."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scifm.data.corpus.common import FIGURES_DIR
from scifm.data.documents import split_of

# One line of a task file (format of scifm/eval/tasks.py) plus a `provenance` field the loader ignores.
Item = dict
MAX_ITEMS = 300
N_CHOICES = 4


@dataclass
class TaskContext:
    """What a task needs: its name, its own seeded RNG, the output root and the skip counts."""

    name: str
    rng: random.Random
    root: Path
    skipped: Counter[str] = field(default_factory=Counter)

    def held_out(self, doc_id: str, emitted: Container[str] | None = None) -> bool:
        """True if the record's corpus document is in the test split (and, given `emitted`, is
        written by the corpus at all); counts why a record is left out otherwise."""
        if emitted is not None and doc_id not in emitted:
            self.skip("not_in_corpus")
            return False
        split = split_of(doc_id)
        if split != "test":
            self.skip(f"{split}_split")
            return False
        return True

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def figure(self, stem: str) -> tuple[Path, str]:
        """(absolute path to write, path relative to the task directory for the figure segment)."""
        rel = f"{FIGURES_DIR}/{stem}.png"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, rel


Task = Callable[[TaskContext], Iterator[Item]]


def provenance(source: str, doc_ids: Sequence[str], **record: object) -> dict:
    """Where an item comes from: the corpus source, every corpus document that states its fact
    (all in the test split; none for records the corpus does not use) and the record's key fields."""
    return {"source": source, "doc_ids": list(doc_ids), "record": record}


def multiple_choice(ctx: TaskContext, item_id: str, skill: str, question: list[dict], right: str,
                    wrong: Sequence[str], prov: dict) -> Item:
    """Choices in a seeded random order. Choices are continuations, so each starts with a space."""
    choices = [right, *wrong]
    if len(set(choices)) != len(choices) or not all(c.startswith(" ") and c.strip() for c in choices):
        raise ValueError(f"{item_id}: choices must be distinct and start with a space: {choices}")
    ctx.rng.shuffle(choices)
    return {"id": item_id, "skill": skill, "type": "multiple_choice", "question": question,
            "choices": choices, "answer": choices.index(right), "provenance": prov}


def short_answer(item_id: str, skill: str, question: list[dict], answer: str | float, prov: dict, *,
                 rel_tol: float = 0.0, abs_tol: float = 0.0) -> Item:
    return {"id": item_id, "skill": skill, "type": "short_answer", "question": question, "answer": answer,
            "rel_tol": rel_tol, "abs_tol": abs_tol, "provenance": prov}


def relative_gap(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude: 0 for equal values, at most 2."""
    return abs(a - b) / max(abs(a), abs(b)) if a != b else 0.0


def far(a: float, b: float, gap: float) -> bool:
    """a and b differ by at least `gap` relative to the larger magnitude."""
    return relative_gap(a, b) >= gap


def nearby(rng: random.Random, value: float, pool: Iterable[float], fmt: Callable[[float], str], *,
           gap: float = 0.1, k: int = N_CHOICES - 1) -> list[str] | None:
    """k values of the same property from other records, at least `gap` (relative) from the answer
    and from each other: drawn within 50% of the answer where there are enough, wider otherwise,
    so options are plausible yet unambiguous."""
    right = fmt(value)
    pool = sorted(set(pool))
    for window in (0.5, 1.0, 2.0):
        candidates = [v for v in pool if gap <= relative_gap(v, value) <= window]
        rng.shuffle(candidates)
        chosen: list[float] = []
        for v in candidates:
            if fmt(v) != right and all(far(v, c, gap) and fmt(v) != fmt(c) for c in chosen):
                chosen.append(v)
                if len(chosen) == k:
                    return [fmt(c) for c in chosen]
    return None


def nearby_ints(rng: random.Random, value: int, fmt: Callable[[int], str], *, lo: int = 0,
                hi: int = 10**9, spread: int = 3, k: int = N_CHOICES - 1) -> list[str]:
    """k other integers within `spread` of a count (there are always enough with spread >= k)."""
    candidates = [v for v in range(max(lo, value - spread), min(hi, value + spread) + 1) if v != value]
    return [fmt(v) for v in rng.sample(candidates, k)]


def template_with(templates: Iterable[str], phrase: str) -> str:
    """The corpus template that contains `phrase` (chosen by wording, not by position in the tuple)."""
    found = [t for t in templates if phrase in t]
    if not found:
        raise LookupError(f"no corpus template contains {phrase!r}")
    return found[0]


def split_qa(template: str) -> tuple[str, str]:
    """A corpus 'Question: ... Answer: ...' template -> (prompt ending in 'Answer:', answer part).

    The answer part keeps its leading space and loses the final period, so formatting it with a
    record's values gives a choice written exactly as the training documents write the answer.
    """
    head, sep, tail = template.partition("Answer:")
    if not sep:
        raise ValueError(f"not a question template: {template!r}")
    return head + sep, tail.removesuffix(".")


def cap(items: list[Item], limit: int = MAX_ITEMS) -> list[Item]:
    """At most `limit` items, taken round-robin over (skill, type) so no kind of question is crowded out."""
    if len(items) <= limit:
        return items
    strata: dict[tuple[str, str], list[int]] = {}
    for i, item in enumerate(items):
        strata.setdefault((item["skill"], item["type"]), []).append(i)
    queues = [strata[k] for k in sorted(strata)]
    keep: list[int] = []
    for depth in range(max(len(q) for q in queues)):
        for q in queues:
            if depth < len(q) and len(keep) < limit:
                keep.append(q[depth])
    return [items[i] for i in sorted(keep)]
