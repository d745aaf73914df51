"""Table QA on the held-out table documents: which row holds a column's max or min, and a column's mean.

The record is a corpus table document: a slice of a scikit-learn or statsmodels table. The question
keeps the document's own context (its intro and its table segment) and asks about that slice.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass

from scifm.data.corpus import tables
from scifm.data.corpus.common import compose, num
from scifm.data.corpus.table_data import all_tables
from scifm.data.corpus.tables import TableSlice, extreme
from scifm.eval.builtin.common import (
    N_CHOICES,
    Item,
    TaskContext,
    far,
    multiple_choice,
    provenance,
    short_answer,
    split_qa,
    template_with,
)
from scifm.eval.builtin.held_out import corpus_documents

SOURCES = ("sklearn-tables", "statsmodels-tables")


@dataclass(frozen=True)
class HeldOutSlice:
    source: str
    doc_id: str
    context: list[dict]  # the document's segments up to and including its table
    slice: TableSlice


def table_name(doc_id: str) -> str:
    return doc_id.removeprefix("tab-").rsplit("-", 1)[0]  # tables.table_docs: tab-{table.name}-{k:03d}


def held_out_slices(ctx: TaskContext) -> list[HeldOutSlice]:
    by_name = {t.name: t for t in all_tables()}
    out = []
    for source in SOURCES:
        for doc_id, doc in corpus_documents(source).items():
            if not ctx.held_out(doc_id):
                continue
            k = next(i for i, s in enumerate(doc.segments) if s["type"] == "table")
            seg = doc.segments[k]
            sl = TableSlice(by_name[table_name(doc_id)], seg["columns"], seg["rows"])
            out.append(HeldOutSlice(source, doc_id, doc.segments[: k + 1], sl))
    return out


def row_choice(sl: TableSlice, label: str) -> str:
    """A row as an option: the corpus's answer "{key} {label} ({value})" without the value, so
    options differ only in the row."""
    return f" {sl.key_word} {label}"


def other_rows(ctx: TaskContext, sl: TableSlice, label: str) -> list[str]:
    """The wrong options for a which-row question: other rows of the same slice."""
    return [row_choice(sl, o) for o in ctx.rng.sample([o for o in sl.labels if o != label], N_CHOICES - 1)]


def mean_distractors(values: list[float], mean: float) -> list[str] | None:
    """Slips in averaging: the median, the mean without the largest or the smallest value, the
    midrange, the sum over n - 1; kept when they print differently and differ by 2% or more."""
    n = len(values)
    slips = [statistics.median(values), (sum(values) - max(values)) / (n - 1), (sum(values) - min(values)) / (n - 1),
             (max(values) + min(values)) / 2, sum(values) / (n - 1)]
    out: list[str] = []
    for s in slips:
        text = f" {num(s)}"
        if far(s, mean, 0.02) and text != f" {num(mean)}" and text not in out:
            out.append(text)
    return out[: N_CHOICES - 1] if len(out) >= N_CHOICES - 1 else None


def table_qa_task(ctx: TaskContext) -> Iterator[Item]:
    prompt, _ = split_qa(template_with(tables.EXTREME_TEMPLATES, "Question:"))
    mean_prompt, _ = split_qa(template_with(tables.MEAN_TEMPLATES, "Question:"))
    for held in held_out_slices(ctx):
        sl = held.slice
        prov = provenance(held.source, [held.doc_id], table=sl.table.name)

        for col in sl.numeric:
            for largest, words in ((True, ("highest", "largest")), (False, ("lowest", "smallest"))):
                found = extreme(sl, col, largest)
                if found is None:
                    ctx.skip("tied_extreme")
                    continue
                text = prompt.format(key=sl.key_word, word=ctx.rng.choice(words), col=col)
                question = compose([*held.context, " " + text])
                skill = "table.argmax" if largest else "table.argmin"
                yield multiple_choice(ctx, f"table-{held.doc_id}-{col}-{skill.split('.')[1]}", skill, question,
                                      row_choice(sl, found[0]), other_rows(ctx, sl, found[0]), prov)
            values = sl.values(col)
            mean = sum(values) / len(values)
            question = compose([*held.context, " " + mean_prompt.format(col=col)])
            wrong = mean_distractors(values, mean)
            if wrong is None:
                ctx.skip("no_distractors")
            else:
                yield multiple_choice(ctx, f"table-{held.doc_id}-{col}-mean-mc", "table.mean", question,
                                      f" {num(mean)}", wrong, prov)
            yield short_answer(f"table-{held.doc_id}-{col}-mean-sa", "table.mean", question, mean, prov, rel_tol=0.01)
