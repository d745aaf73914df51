"""LaTeX strings and the SymPy expressions they denote, from SymPy's own LaTeX-parser test tables."""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Iterator

from scifm.data.corpus.common import SourceContext, latex_seg, render
from scifm.data.documents import Document

PAIR_MODULES = ("sympy.parsing.tests.test_latex", "sympy.parsing.tests.test_latex_lark")


def read_latex_pairs() -> list[tuple[str, object]]:
    """Every module-level *_PAIRS list, except the lark tests' UNEVALUATED_* tables (same strings,
    expected values spelled out unevaluated). A module missing from this SymPy is left out."""
    pairs = []
    for module in PAIR_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name, value in vars(mod).items():
            if name.endswith("PAIRS") and not name.startswith("UNEVALUATED") and isinstance(value, list):
                pairs.extend(value)
    return pairs


def one_line(expr: object) -> str:
    """SymPy's str form on one line (it prints a Matrix as one row per line, aligned with spaces)."""
    return re.sub(r" {2,}", " ", re.sub(r"\s*\n\s*", "", str(expr)))


TEMPLATES = (
    "The LaTeX {latex} is equivalent to the SymPy expression {expr}.",
    "Question: what expression does {latex} denote? Answer: {expr}.",
    "Parsing {latex} with SymPy's LaTeX parser yields {expr}.",
    "Written as SymPy code, {latex} becomes {expr}.",
)


def latex_pair_docs(ctx: SourceContext) -> Iterator[Document]:
    seen: set[str] = set()
    for pair in read_latex_pairs():
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and pair[0].strip()):
            ctx.skip("malformed_pair", f"latexpair-{len(seen)}")
            continue
        latex, expected = pair
        if latex in seen:  # the two test modules share many strings; keep the first meaning
            continue
        seen.add(latex)
        doc_id = f"latexpair-{hashlib.sha256(latex.encode()).hexdigest()[:12]}"
        segments = render(ctx.rng.choice(TEMPLATES), {"latex": latex_seg(latex)}, expr=one_line(expected))
        yield ctx.doc(doc_id, "latex.parse", segments)
