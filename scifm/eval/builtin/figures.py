"""Figure QA: matplotlib renderings of the held-out table slices, asked about from the picture alone.

Drawn as plots.py draws its corpus figures (same size, style and checks that the answer is visible),
but from the held-out table documents' slices: bar charts (tallest / shortest bar) for every slice,
line charts (peak, and whether the series ends higher or lower) for slices of ordered series.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from scifm.data.corpus import plots
from scifm.data.corpus.common import figure_seg, render, text_seg
from scifm.data.corpus.tables import TableSlice, extreme
from scifm.eval.builtin.common import Item, TaskContext, multiple_choice, provenance, split_qa, template_with
from scifm.eval.builtin.tables import HeldOutSlice, held_out_slices, other_rows, row_choice

# the corpus's own question wordings, up to "Answer:"
BAR_PROMPT, _ = split_qa(template_with(plots.BAR_TEMPLATES, "Question:"))
PEAK_PROMPT, _ = split_qa(template_with(plots.PEAK_TEMPLATES, "Question:"))
TREND_PROMPT, _ = split_qa(template_with(plots.TREND_TEMPLATES, "Question:"))


def draw_bars(sl: TableSlice, col: str, path: Path) -> None:
    fig, ax = plots.new_axes(col)
    ax.bar(range(len(sl.rows)), sl.values(col))
    ax.set_xticks(range(len(sl.rows)), sl.labels, rotation=90)
    plots.save(fig, path)


def draw_line(sl: TableSlice, col: str, path: Path) -> None:
    values = sl.values(col)
    fig, ax = plots.new_axes(f"{col} by {sl.key_word}")
    ax.plot(range(len(values)), values, marker=".", markersize=2, linewidth=0.8)
    ticks = list(range(0, len(values), max(1, len(values) // 4)))
    ax.set_xticks(ticks, [sl.labels[i] for i in ticks])
    plots.save(fig, path)


def bar_items(ctx: TaskContext, held: HeldOutSlice, prov: dict) -> Iterator[Item]:
    """One chart of the first column whose tallest or shortest bar stands out; bars start at zero,
    so columns with negative values are not drawn."""
    sl = held.slice
    for col in sl.numeric:
        values = sl.values(col)
        if min(values) < 0:
            continue
        asks = []
        for largest, word in ((True, "tallest"), (False, "shortest")):
            found = extreme(sl, col, largest)
            if found is not None and plots.stands_out(values, found[1], max(values)):
                asks.append((word, found[0]))
        if not asks:
            continue
        path, rel = ctx.figure(f"{held.doc_id}-bar")
        draw_bars(sl, col, path)
        for word, label in asks:
            question = figure_question(ctx, held, rel, BAR_PROMPT.format(col=col, key=sl.key_word, word=word))
            skill = "fig.bar_max" if word == "tallest" else "fig.bar_min"
            yield multiple_choice(ctx, f"figure-{held.doc_id}-{word}", skill, question, row_choice(sl, label),
                                  other_rows(ctx, sl, label), prov)
        return
    ctx.skip("no_visible_bar_extreme")


def line_items(ctx: TaskContext, held: HeldOutSlice, prov: dict) -> Iterator[Item]:
    sl = held.slice
    col = sl.numeric[0]
    values = sl.values(col)
    span = max(values) - min(values)
    peak = extreme(sl, col, True)
    has_peak = peak is not None and plots.stands_out(values, peak[1], span)
    has_trend = plots.apart(values[0], values[-1], span)
    if not (has_peak or has_trend):
        ctx.skip("no_visible_line_feature")
        return
    path, rel = ctx.figure(f"{held.doc_id}-line")
    draw_line(sl, col, path)
    if has_peak:
        question = figure_question(ctx, held, rel, PEAK_PROMPT.format(key=sl.key_word, col=col))
        yield multiple_choice(ctx, f"figure-{held.doc_id}-peak", "fig.line_peak", question, row_choice(sl, peak[0]),
                              other_rows(ctx, sl, peak[0]), prov)
    if has_trend:
        text = TREND_PROMPT.format(col=col, key=sl.key_word, first=sl.labels[0], last=sl.labels[-1])
        right, wrong = (" higher", " lower") if values[-1] > values[0] else (" lower", " higher")
        question = figure_question(ctx, held, rel, text)
        yield multiple_choice(ctx, f"figure-{held.doc_id}-trend", "fig.line_trend", question, right, [wrong], prov)


def figure_question(ctx: TaskContext, held: HeldOutSlice, rel: str, text: str) -> list[dict]:
    intro = render(ctx.rng.choice(plots.INTRO_TEMPLATES), title=held.slice.table.title)
    return intro + [figure_seg(rel), text_seg(" " + text)]


def figure_qa_task(ctx: TaskContext) -> Iterator[Item]:
    for held in held_out_slices(ctx):
        prov = provenance(held.source, [held.doc_id], table=held.slice.table.name)
        yield from bar_items(ctx, held, prov)
        if held.slice.table.ordered:
            yield from line_items(ctx, held, prov)

