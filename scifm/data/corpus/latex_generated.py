"""Expressions drawn with a seeded RNG, shown as LaTeX, with the answer computed by SymPy."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import sympy as sp

from scifm.data.corpus.common import SourceContext, latex_seg, render
from scifm.data.documents import Document

GENERATED_COUNT = 720
x = sp.Symbol("x")

# A maker returns (skill, LaTeX shown, template with a {latex} slot, values for the template).
Made = tuple[str, str, str, dict[str, str]]


def nonzero(rng: random.Random, lo: int, hi: int) -> int:
    return rng.choice([k for k in range(lo, hi + 1) if k != 0])


def poly(rng: random.Random, degree: int) -> sp.Expr:
    return nonzero(rng, -5, 5) * x**degree + sum(rng.randint(-6, 6) * x**k for k in range(degree))


def expand(rng: random.Random) -> Made:
    factors = [nonzero(rng, -3, 3) * x + rng.randint(-6, 6) for _ in range(rng.randint(2, 3))]
    product = sp.Mul(*factors, evaluate=False)
    template = rng.choice(
        ("Expanding {latex} gives {answer}.", "Question: multiply out {latex} fully. Answer: {answer}.")
    )
    return "latex.expand", sp.latex(product), template, {"answer": str(sp.expand(product))}


def factor(rng: random.Random) -> Made:
    roots = [rng.randint(-7, 7) for _ in range(rng.randint(2, 3))]
    expanded = sp.expand(nonzero(rng, -3, 3) * sp.Mul(*[x - r for r in roots]))
    template = rng.choice(
        ("Factoring {latex} gives {answer}.", "Question: factor the polynomial {latex} completely. Answer: {answer}.")
    )
    return "latex.factor", sp.latex(expanded), template, {"answer": str(sp.factor(expanded))}


def diff(rng: random.Random) -> Made:
    f = poly(rng, rng.randint(1, 3))
    if rng.random() < 0.6:
        f = f * rng.choice((sp.sin, sp.cos, sp.exp))(nonzero(rng, -3, 3) * x)
    if rng.random() < 0.3:
        shown, template = sp.latex(sp.Derivative(f, x)), "Evaluating the derivative {latex} gives {answer}."
    else:
        shown = sp.latex(f)
        template = rng.choice(
            (
                "The derivative with respect to x of {latex} is {answer}.",
                "Question: differentiate {latex} with respect to x. Answer: {answer}.",
            )
        )
    return "latex.diff", shown, template, {"answer": str(sp.diff(f, x))}


def integrate(rng: random.Random) -> Made:
    p = poly(rng, rng.randint(1, 4))
    template = rng.choice(
        (
            "An antiderivative of {latex} is {answer}, plus an arbitrary constant.",
            "Question: integrate {latex} with respect to x. Answer: {answer} + C.",
        )
    )
    return "latex.integrate", sp.latex(p), template, {"answer": str(sp.integrate(p, x))}


def definite(rng: random.Random) -> Made:
    a = rng.randint(-3, 2)
    b = rng.randint(a + 1, 4)
    integral = sp.Integral(poly(rng, rng.randint(1, 3)), (x, a, b))
    template = rng.choice(
        ("The definite integral {latex} equals {answer}.", "Question: evaluate {latex} exactly. Answer: {answer}.")
    )
    return "latex.definite_integral", sp.latex(integral), template, {"answer": str(integral.doit())}


def simplify_trig(rng: random.Random) -> Made:
    """Fu's trigonometric simplification: as good as simplify() here, at a tenth of the time."""
    k, c = nonzero(rng, 1, 4), nonzero(rng, -5, 5)
    identity = rng.choice(
        (
            c * sp.sin(k * x) ** 2 + c * sp.cos(k * x) ** 2,
            2 * c * sp.sin(k * x) * sp.cos(k * x),
            c * sp.cos(k * x) ** 2 - c * sp.sin(k * x) ** 2,
        )
    )
    expr = identity + poly(rng, rng.randint(0, 2))
    template = rng.choice(
        (
            "Simplifying {latex} gives {answer}.",
            "Question: simplify {latex} using trigonometric identities. Answer: {answer}.",
        )
    )
    return "latex.simplify", sp.latex(expr), template, {"answer": str(sp.fu(expr))}


def simplify_rational(rng: random.Random) -> Made:
    a, c = nonzero(rng, -6, 6), nonzero(rng, -4, 4)
    expr = c * (x**2 - a**2) / (x - a) + rng.randint(-9, 9)
    template = rng.choice(
        (
            "For x ≠ {a}, {latex} simplifies to {answer}.",
            "Question: cancel the common factor in {latex} (x ≠ {a}). Answer: {answer}.",
        )
    )
    return "latex.simplify", sp.latex(expr), template, {"a": str(a), "answer": str(sp.cancel(expr))}


def solve(rng: random.Random) -> Made:
    r1, r2 = rng.sample(range(-9, 10), 2)
    equation = sp.Eq(sp.expand(nonzero(rng, -3, 3) * (x - r1) * (x - r2)), 0)
    roots = sorted(sp.solve(equation, x))
    template = rng.choice(
        ("The solutions of {latex} are x = {answer}.", "Question: solve {latex} for x. Answer: x = {answer}.")
    )
    return "latex.solve", sp.latex(equation), template, {"answer": " or x = ".join(str(r) for r in roots)}


def limit(rng: random.Random) -> Made:
    k, m = nonzero(rng, -5, 5), nonzero(rng, 1, 4)
    f = rng.choice((sp.sin(k * x) / (m * x), (sp.exp(k * x) - 1) / (m * x), (1 - sp.cos(k * x)) / (m * x**2)))
    template = rng.choice(("The limit {latex} equals {answer}.", "Question: evaluate {latex}. Answer: {answer}."))
    return "latex.limit", sp.latex(sp.Limit(f, x, 0, dir="+-")), template, {"answer": str(sp.limit(f, x, 0, dir="+-"))}


MAKERS: tuple[Callable[[random.Random], Made], ...] = (
    expand, factor, diff, integrate, definite, simplify_trig, simplify_rational, solve, limit,
)  # fmt: skip


def generated_docs(ctx: SourceContext) -> Iterator[Document]:
    """Makers in turn; a draw whose LaTeX was already used is redrawn, so no two documents repeat."""
    seen: set[str] = set()
    made = 0
    while made < GENERATED_COUNT:
        skill, shown, template, values = MAKERS[made % len(MAKERS)](ctx.rng)
        if shown in seen:
            continue
        seen.add(shown)
        yield ctx.doc(f"symgen-{made:04d}", skill, render(template, {"latex": latex_seg(shown)}, **values))
        made += 1
