"""LaTeX domain: command-aware split (`\\frac` is one unit), a built-in command list."""

from __future__ import annotations

import re

from scifm.tokenizers.charset import PRINTABLE_ASCII

# Control words, control symbols (`\\{`, `\\,`, `\\\\`), whitespace runs, then single characters.
SPLIT = re.compile(r"\\[A-Za-z]+|\\.|\s+|.", re.DOTALL)

LEARNABLE = re.compile(r"\\[A-Za-z]+")

_GREEK = (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi "
    "pi varpi rho varrho sigma varsigma tau upsilon phi varphi chi psi omega "
    "Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega"
)
_COMMANDS = (
    "frac dfrac tfrac sqrt sum prod coprod int iint iiint oint lim limsup liminf infty partial nabla "
    "cdot times div pm mp ast star circ bullet leq le geq ge neq ne approx equiv sim simeq cong "
    "propto ll gg in notin ni subset subseteq supset supseteq cup cap setminus emptyset varnothing "
    "forall exists neg land lor wedge vee to rightarrow leftarrow Rightarrow Leftarrow "
    "leftrightarrow Leftrightarrow iff implies mapsto uparrow downarrow left right big Big bigg Bigg "
    "langle rangle lfloor rfloor lceil rceil mathrm mathbf mathbb mathcal mathit mathsf mathfrak "
    "boldsymbol text textbf textit operatorname displaystyle log ln lg exp sin cos tan sec csc cot "
    "arcsin arccos arctan sinh cosh tanh min max sup inf arg det dim ker deg gcd Pr hat bar vec dot "
    "ddot tilde widetilde widehat overline underline overbrace underbrace binom choose cdots ldots "
    "dots vdots ddots quad qquad begin end hbar ell Re Im angle perp parallel mid prime "
    "otimes oplus dagger"
)
_SYMBOLS = ["\\\\", "\\{", "\\}", "\\,", "\\;", "\\:", "\\!", "\\ ", "\\|", "\\%", "\\$", "\\&", "\\#", "\\_"]
_WHITESPACE = ["  ", "\n\n"]

_CONTROL_WORDS = ["\\" + name for name in (_GREEK + " " + _COMMANDS).split()]

BASE_TOKENS: list[str] = PRINTABLE_ASCII + _CONTROL_WORDS + _SYMBOLS + _WHITESPACE
