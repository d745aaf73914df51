"""Table documents: a slice of a real table and a question whose answer is computed from that slice."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from scifm.data.corpus.common import SourceContext, num, render, table_seg, text_seg
from scifm.data.corpus.table_data import DataTable
from scifm.data.documents import Document


@dataclass(frozen=True)
class TableSlice:
    table: DataTable
    columns: list[str]  # key first
    rows: list[list]

    @property
    def key_word(self) -> str:
        return self.table.key.lower()

    @property
    def labels(self) -> list[str]:
        return [r[0] for r in self.rows]

    @property
    def numeric(self) -> list[str]:
        return [c for c in self.columns if c in self.table.numeric]

    def values(self, column: str) -> list:
        j = self.columns.index(column)
        return [r[j] for r in self.rows]

    def segment(self) -> dict:
        if self.table.ordered:
            span = f"{self.key_word} {self.labels[0]} to {self.labels[-1]}"
        else:
            span = f"a sample of {len(self.rows)} rows"
        return table_seg(self.columns, self.rows, f"{self.table.title}, {span}")


def take_slice(rng: random.Random, table: DataTable, min_rows: int, max_rows: int, max_numeric: int) -> TableSlice:
    """Consecutive rows of a series, a sorted random sample otherwise; the key plus a few columns."""
    n = rng.randint(min(min_rows, len(table.rows)), min(max_rows, len(table.rows)))
    if table.ordered:
        start = rng.randrange(len(table.rows) - n + 1)
        picked = list(range(start, start + n))
    else:
        picked = sorted(rng.sample(range(len(table.rows)), n))
    numeric = rng.sample(table.numeric, min(len(table.numeric), rng.randint(1, max_numeric)))
    categorical = [c for c in table.categorical if rng.random() < 0.5]
    chosen = [c for c in table.columns if c == table.key or c in numeric or c in categorical]
    idx = [table.columns.index(c) for c in chosen]
    return TableSlice(table, chosen, [[table.rows[i][j] for j in idx] for i in picked])


def extreme(sl: TableSlice, column: str, largest: bool) -> tuple[str, float] | None:
    """(label, value) of the unique largest/smallest value of a column; None on a tie."""
    values = sl.values(column)
    best = max(values) if largest else min(values)
    winners = [label for label, v in zip(sl.labels, values) if v == best]
    return (winners[0], best) if len(winners) == 1 else None


# A question maker returns (skill, question-and-answer text) or None where the slice has no clean answer.
Question = Callable[[random.Random, TableSlice, str], tuple[str, str] | None]

EXTREME_TEMPLATES = (
    "Which {key} has the {word} {col}? {key_cap} {label}, with {value}.",
    "Question: which {key} shows the {word} value in the '{col}' column? Answer: {key} {label} ({value}).",
    "Scanning the '{col}' column, the {word} entry is {value}, belonging to {key} {label}.",
)


def ask_extreme(largest: bool) -> Question:
    def ask(rng: random.Random, sl: TableSlice, col: str) -> tuple[str, str] | None:
        found = extreme(sl, col, largest)
        if found is None:
            return None
        word = rng.choice(("highest", "largest") if largest else ("lowest", "smallest"))
        text = rng.choice(EXTREME_TEMPLATES).format(
            key=sl.key_word,
            key_cap=sl.key_word.capitalize(),
            word=word,
            col=col,
            label=found[0],
            value=num(found[1], 6),
        )
        return ("table.argmax" if largest else "table.argmin"), text

    return ask


MEAN_TEMPLATES = (
    "What is the mean of '{col}' over these {n} rows? About {mean}.",
    "Question: average the {col} column of the table. Answer: {mean} (over {n} rows, to 4 significant digits).",
    "Across the {n} rows shown, {col} averages {mean}.",
)


def ask_mean(rng: random.Random, sl: TableSlice, col: str) -> tuple[str, str] | None:
    values = sl.values(col)
    mean = num(sum(values) / len(values))
    text = rng.choice(MEAN_TEMPLATES)
    return "table.mean", text.format(col=col, n=len(values), mean=mean)


def ask_count(rng: random.Random, sl: TableSlice, col: str) -> tuple[str, str] | None:
    values = sl.values(col)
    threshold = rng.choice(values)
    count = sum(v > threshold for v in values)
    text = rng.choice(
        (
            "How many rows have {col} greater than {t}? {count}.",
            "Question: count the rows whose '{col}' value exceeds {t}. Answer: {count} of {n}.",
        )
    )
    return "table.count", text.format(col=col, t=num(threshold, 6), count=count, n=len(values))


def ask_lookup(rng: random.Random, sl: TableSlice, col: str) -> tuple[str, str] | None:
    i = rng.randrange(len(sl.rows))
    text = rng.choice(
        (
            "What is the {col} of {key} {label}? {value}.",
            "Question: read off '{col}' for {key} {label}. Answer: {value}.",
        )
    )
    return "table.lookup", text.format(col=col, key=sl.key_word, label=sl.labels[i], value=num(sl.values(col)[i], 6))


def ask_difference(rng: random.Random, sl: TableSlice, col: str) -> tuple[str, str] | None:
    i, j = rng.sample(range(len(sl.rows)), 2)
    values = sl.values(col)
    text = rng.choice(
        (
            "By how much does {col} of {key} {a} differ from that of {key} {b}? {a_v} - {b_v} = {diff}.",
            "Question: subtract the '{col}' value of {key} {b} from that of {key} {a}. Answer: {diff}.",
        )
    )
    diff = num(values[i] - values[j], 6)  # 6 digits hide float noise such as 1.7999999999999998
    return "table.difference", text.format(
        col=col,
        key=sl.key_word,
        a=sl.labels[i],
        b=sl.labels[j],
        a_v=num(values[i], 6),
        b_v=num(values[j], 6),
        diff=diff,
    )


def ask_order(rng: random.Random, sl: TableSlice, col: str) -> tuple[str, str] | None:
    values = sl.values(col)
    if len(set(values)) != len(values) or len(values) > 8:
        return None
    order = [label for _, label in sorted(zip(values, sl.labels))]
    text = rng.choice(
        (
            "Sort the rows by {col}, smallest first. The order of {key}s is: {order}.",
            "Question: list the {key}s in increasing order of '{col}'. Answer: {order}.",
        )
    )
    return "table.sort", text.format(col=col, key=sl.key_word, order=", ".join(order))


def ask_category(rng: random.Random, sl: TableSlice, col: str) -> tuple[str, str] | None:
    categorical = [c for c in sl.columns if c in sl.table.categorical]
    if not categorical:
        return None
    cat = categorical[0]
    values = sl.values(cat)
    target = rng.choice(values)
    text = rng.choice(
        (
            "How many rows have {cat} equal to {target}? {count}.",
            "Question: in how many of the {n} rows is the {cat} '{target}'? Answer: {count}.",
        )
    )
    return "table.category_count", text.format(cat=cat, target=target, count=values.count(target), n=len(values))


QUESTIONS: tuple[Question, ...] = (
    ask_extreme(True), ask_extreme(False), ask_mean, ask_count, ask_lookup, ask_difference, ask_order, ask_category,
)  # fmt: skip

INTRO_TEMPLATES = (
    "Rows from the {title}:",
    "The table below is a slice of the {title}.",
    "Consider these {n} rows taken from the {title}.",
    "Data ({title}):",
)


def quota(table: DataTable) -> int:
    """Documents per table grow with its size, capped so large tables do not crowd out small ones."""
    return min(80, 8 + len(table.rows) // 4)


def table_docs(ctx: SourceContext, load: Callable[[], tuple[DataTable, ...]]) -> Iterator[Document]:
    """Round-robin over the tables `load` returns, so a capped build still covers every dataset."""
    tables = load()
    made = {t.name: 0 for t in tables}
    while any(made[t.name] < quota(t) for t in tables):
        for table in tables:
            if made[table.name] >= quota(table):
                continue
            sl = take_slice(ctx.rng, table, 5, 12, 4)
            qa = None
            for ask in ctx.rng.sample(QUESTIONS, len(QUESTIONS)):
                qa = ask(ctx.rng, sl, ctx.rng.choice(sl.numeric))
                if qa is not None:
                    break
            assert qa is not None  # ask_mean always answers
            skill, text = qa
            intro = render(ctx.rng.choice(INTRO_TEMPLATES), title=table.title, n=len(sl.rows))
            segments = intro + [sl.segment(), text_seg(" " + text)]
            yield ctx.doc(f"tab-{table.name}-{made[table.name]:03d}", skill, segments)
            made[table.name] += 1
