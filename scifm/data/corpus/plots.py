"""Small matplotlib renderings of real table slices, with questions answered from the plotted data."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from scifm.data.corpus.common import SourceContext, figure_seg, num, render, text_seg
from scifm.data.corpus.table_data import DataTable, all_tables
from scifm.data.corpus.tables import TableSlice, extreme, take_slice
from scifm.data.documents import Document

PLOT_COUNT = 210  # each is a PNG; keeps the build fast and the figure set modest
SIZE_INCHES = (1.6, 1.2)
DPI = 100  # -> 160 x 120 pixels
WITH_TABLE_FRACTION = 0.3
MIN_ABS_CORRELATION = 0.5  # weaker trends are not clear enough to ask about
# An extreme is asked about only if it beats the runner-up by this share of the axis span,
# so the answer can be read off the picture and not only off the numbers.
MIN_VISIBLE_GAP = 0.04


def apart(a: float, b: float, span: float) -> bool:
    return span > 0 and abs(a - b) / span >= MIN_VISIBLE_GAP


def stands_out(values: list[float], best: float, span: float) -> bool:
    return all(apart(best, v, span) for v in values if v != best)


def new_axes(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=6)
    ax.tick_params(labelsize=4)
    ax.yaxis.set_major_locator(MaxNLocator(4))  # few ticks: legible at 120 px, and ticks dominate draw time
    return fig, ax


def save(fig: Figure, path: Path) -> None:
    # fixed margins: tight_layout would measure every label and cost more than the drawing
    fig.subplots_adjust(left=0.18, right=0.97, bottom=0.28, top=0.85)
    # no Software tag: the PNG bytes then do not depend on the matplotlib version
    fig.savefig(path, format="png", metadata={"Software": None})


BAR_TEMPLATES = (
    "The bars show {col} for {n} {key}s. Which bar is {word}? The one for {key} {label}, at {value}.",
    "Question: in this bar chart of {col}, which {key} has the {word} bar? Answer: {key} {label} ({value}).",
)


def bar_plot(rng: random.Random, table: DataTable, path: Path) -> tuple[TableSlice, str, str] | None:
    sl = take_slice(rng, table, 4, 8, 1)
    col = sl.numeric[0]
    largest = rng.random() < 0.6
    found = extreme(sl, col, largest)
    values = sl.values(col)
    # bars start at zero, so the axis spans from zero to the tallest bar; negative bars hang down,
    # where "tallest" would be ambiguous
    if found is None or min(values) < 0 or not stands_out(values, found[1], max(values)):
        return None
    fig, ax = new_axes(col)
    ax.bar(range(len(sl.rows)), values)
    ax.set_xticks(range(len(sl.rows)), sl.labels, rotation=90)
    save(fig, path)
    word = "tallest" if largest else "shortest"
    text = rng.choice(BAR_TEMPLATES).format(
        col=col, n=len(sl.rows), key=sl.key_word, word=word, label=found[0], value=num(found[1], 6)
    )
    return sl, ("fig.bar_max" if largest else "fig.bar_min"), text


PEAK_TEMPLATES = (
    "The line traces {col} from {key} {first} to {last}. It peaks at {value} in {key} {label}.",
    "Question: at which {key} does the plotted {col} reach its maximum? Answer: {key} {label} ({value}).",
)
TREND_TEMPLATES = (
    "Question: is {col} higher or lower at the end of the plotted range ({key} {last}) than at the start "
    "({key} {first})? Answer: {direction}, {end} against {start}.",
    "Between {key} {first} and {key} {last} the plotted {col} ends {direction} than it starts ({start} to {end}).",
)


def line_plot(rng: random.Random, table: DataTable, path: Path) -> tuple[TableSlice, str, str] | None:
    sl = take_slice(rng, table, 8, 24, 1)
    col = sl.numeric[0]
    values = sl.values(col)
    fig, ax = new_axes(f"{col} by {sl.key_word}")
    ax.plot(range(len(values)), values, marker=".", markersize=2, linewidth=0.8)
    ticks = list(range(0, len(values), max(1, len(values) // 4)))
    ax.set_xticks(ticks, [sl.labels[i] for i in ticks])
    save(fig, path)
    first, last = sl.labels[0], sl.labels[-1]
    peak = extreme(sl, col, True)
    if peak is not None and stands_out(values, peak[1], max(values) - min(values)) and rng.random() < 0.5:
        text = rng.choice(PEAK_TEMPLATES).format(
            col=col, key=sl.key_word, first=first, last=last, label=peak[0], value=num(peak[1], 6)
        )
        return sl, "fig.line_peak", text
    if not apart(values[0], values[-1], max(values) - min(values)):
        return None
    direction = "higher" if values[-1] > values[0] else "lower"
    text = rng.choice(TREND_TEMPLATES).format(
        col=col,
        key=sl.key_word,
        first=first,
        last=last,
        direction=direction,
        start=num(values[0], 6),
        end=num(values[-1], 6),
    )
    return sl, "fig.line_trend", text


def correlation(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def scatter_plot(rng: random.Random, table: DataTable, path: Path) -> tuple[TableSlice, str, str] | None:
    sl = take_slice(rng, table, 10, 30, 2)
    if len(sl.numeric) < 2:
        return None
    x_col, y_col = sl.numeric[:2]
    xs, ys = sl.values(x_col), sl.values(y_col)
    fig, ax = new_axes(f"{y_col} vs {x_col}")
    ax.scatter(xs, ys, s=3)
    save(fig, path)
    r = correlation(xs, ys)
    if r is not None and abs(r) >= MIN_ABS_CORRELATION:
        sign = "positive" if r > 0 else "negative"
        text = rng.choice(
            (
                "Does {y} rise or fall with {x} in this scatter plot? It tends to {verb}: the correlation is {sign} "
                "(r = {r}).",
                "Question: what is the sign of the correlation between {x} and {y} here? Answer: {sign}, r = {r}.",
            )
        ).format(x=x_col, y=y_col, verb="rise" if r > 0 else "fall", sign=sign, r=f"{r:.2f}")
        return sl, "fig.scatter_trend", text
    text = rng.choice(
        (
            "How many {key}s are plotted in this scatter of {y} against {x}? {n}.",
            "Question: how many points (one per {key}) does the scatter plot of {y} versus {x} hold? Answer: {n}.",
        )
    ).format(key=sl.key_word, x=x_col, y=y_col, n=len(xs))
    return sl, "fig.scatter_count", text


INTRO_TEMPLATES = (
    "A chart drawn from the {title}:",
    "Figure: data from the {title}.",
    "The plot below shows part of the {title}.",
)


def plot_docs(ctx: SourceContext) -> Iterator[Document]:
    """Bar, line and scatter plots in turn; a draw with no clean answer is redrawn from a new slice."""
    tables = all_tables()
    makers = (
        (bar_plot, tables),
        (line_plot, [t for t in tables if t.ordered]),
        (scatter_plot, [t for t in tables if len(t.numeric) >= 2]),
    )
    made = 0
    while made < PLOT_COUNT:
        maker, eligible = makers[made % len(makers)]
        table = ctx.rng.choice(eligible)
        doc_id = f"plot-{made:04d}"
        path, rel = ctx.figure(doc_id)
        drawn = maker(ctx.rng, table, path)
        if drawn is None:
            continue
        sl, skill, text = drawn
        intro = render(ctx.rng.choice(INTRO_TEMPLATES), title=table.title)
        segments = intro + [figure_seg(rel)]
        if ctx.rng.random() < WITH_TABLE_FRACTION:
            segments += [text_seg(" The plotted values:"), sl.segment()]
        yield ctx.doc(doc_id, skill, segments + [text_seg(" " + text)])
        made += 1
