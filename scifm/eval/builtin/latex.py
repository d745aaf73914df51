"""LaTeX equivalence on the held-out generated-expression documents, decided by SymPy.

A sympy-generated document shows an expression as LaTeX and states what SymPy turns it into. For
the makers whose answer is the same mathematical object (expand, factor, simplify, a limit or a
definite integral, an evaluated derivative) the shown LaTeX and the answer are equivalent, so
  - which SymPy expression is the shown LaTeX equivalent to? (latex_pairs' wording; slips as distractors)
  - is the shown LaTeX equivalent to this LaTeX? (the answer printed as LaTeX: yes; a slip: no)
A slip is the answer's text with one integer off by one or one sign flipped, and is kept only if
SymPy evaluates it to something different from the answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import sympy as sp

from scifm.data.corpus import latex_pairs
from scifm.data.corpus.common import compose, latex_seg, render
from scifm.eval.builtin.common import N_CHOICES, Item, TaskContext, multiple_choice, provenance, template_with
from scifm.eval.builtin.held_out import corpus_documents

SOURCE = "sympy-generated"
EQUIVALENT_SKILLS = {"latex.expand", "latex.factor", "latex.simplify", "latex.limit", "latex.definite_integral"}
DERIVATIVE = r"\frac{d}{d x}"  # latex.diff shows either f (answer f', not equivalent) or d/dx f
# In every template of the makers above the answer follows one of these words and ends the sentence.
ANSWER = re.compile(r"(?:gives|Answer:|simplifies to|equals) (?P<answer>.+?)\.$")
x = sp.Symbol("x")
POINTS = (0.37, 1.93, -2.71)  # not integers: the generated rational functions have integer poles


def value(text: str) -> sp.Expr:
    return sp.sympify(text, locals={"x": x})


def as_latex(text: str) -> str:
    """The expression printed as LaTeX in the form the text writes it (3 (x + 2) (x + 3), not expanded);
    a number as its value (unevaluated, 1/4 would print as 1 times 1/4)."""
    if value(text).is_Number:
        return sp.latex(value(text))
    return sp.latex(sp.parse_expr(text, local_dict={"x": x}, evaluate=False))


def differs(a: sp.Expr, b: sp.Expr) -> bool:
    """Certainly inequivalent: the difference is non-zero at some point."""
    return any(abs(complex(sp.N((a - b).subs(x, p)))) > 1e-9 for p in POINTS)


def slips(text: str) -> list[str]:
    """The answer with one integer off by one or one sign flipped (a number: also doubled, halved,
    negated): the mistakes people make."""
    out = []
    for m in re.finditer(r"\d+", text):
        for new in (int(m[0]) + 1, int(m[0]) - 1):
            # a coefficient or exponent of 1 or 0 would print oddly (1*x, x**0)
            if new >= 2 or (new == 1 and not text[m.end():].startswith("*") and not text[:m.start()].endswith("**")):
                out.append(text[: m.start()] + str(new) + text[m.end():])
    for m in re.finditer(r" [+-] ", text):
        out.append(text[: m.start()] + (" - " if m[0] == " + " else " + ") + text[m.end():])
    n = value(text)
    if n.is_Number:  # a limit or an integral: also the value doubled, halved, negated, one off
        out += [str(v) for v in (-n, 2 * n, n / 2, n + 1, n - 1)]
    return [s for s in dict.fromkeys(out) if s != text]


def held_out_answers(ctx: TaskContext) -> Iterator[tuple[str, str, str]]:
    """(document id, shown LaTeX, answer text) of held-out documents whose answer is equivalent to the LaTeX."""
    for doc_id, doc in corpus_documents(SOURCE).items():
        if not ctx.held_out(doc_id):
            continue
        shown = next(s["latex"] for s in doc.segments if s["type"] == "latex")
        if doc.skill not in EQUIVALENT_SKILLS and not (doc.skill == "latex.diff" and shown.startswith(DERIVATIVE)):
            ctx.skip("not_an_equivalence")
            continue
        after = "".join(s.get("text", "") for s in doc.segments[doc.segments.index(latex_seg(shown)) + 1:])
        found = ANSWER.search(after)
        if found is None or not value(found["answer"]).free_symbols <= {x}:
            ctx.skip("answer_not_found")
            continue
        yield doc_id, shown, found["answer"]


def latex_equiv_task(ctx: TaskContext) -> Iterator[Item]:
    # "The LaTeX {latex} is equivalent to the SymPy expression"
    prompt = template_with(latex_pairs.TEMPLATES, "is equivalent to the SymPy expression").split(" {expr}")[0]
    for doc_id, shown, answer in held_out_answers(ctx):
        truth = value(answer)
        seen = {truth}
        wrong = []
        for s in slips(answer):
            v = value(s)
            # distinct values, so no two options are the same answer; numbers in lowest terms (not 8/2)
            if v not in seen and differs(truth, v) and (not v.is_Number or str(v) == s):
                seen.add(v)
                wrong.append(s)
        if len(wrong) < N_CHOICES - 1:
            ctx.skip("no_distractors")
            continue
        picked = ctx.rng.sample(wrong, N_CHOICES - 1)
        question = render(prompt, {"latex": latex_seg(shown)})
        prov = provenance(SOURCE, [doc_id], answer=answer)
        yield multiple_choice(ctx, f"latex-{doc_id}-sympy", "latex.equiv_sympy", question, f" {answer}",
                              [f" {s}" for s in picked], prov)
        for kind, other in (("same", answer), ("slip", picked[0])):
            question = compose(["Question: is ", latex_seg(shown), " equivalent to ", latex_seg(as_latex(other)),
                                "? Answer:"])
            right, wrong_choice = (" yes", " no") if kind == "same" else (" no", " yes")
            prov = provenance(SOURCE, [doc_id], answer=answer, other=other)
            yield multiple_choice(ctx, f"latex-{doc_id}-{kind}", "latex.equiv", question, right, [wrong_choice], prov)
