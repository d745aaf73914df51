"""LaTeX source -> ids in the LaTeX domain vocabulary."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from scifm.data.features.sequence import encode_domain
from scifm.core.errors import DocumentFormatError


def braces_balanced(src: str) -> bool:
    """Group braces nest and close; escaped \\{ \\} and the \\\\ line break are not groups."""
    depth = 0
    escaped = False
    for ch in src:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


# one control sequence: \begin or \end with its {name} when given, any other command, or an
# escaped character (so the \\ line break never starts a \begin)
_CONTROL = re.compile(r"\\(?:(begin|end)(?![A-Za-z])\s*(?:\{([^{}\\]*)\})?|[A-Za-z]+|.)", re.DOTALL)


def environments_balanced(src: str) -> bool:
    """Every \\begin{X} is closed by its own \\end{X}, innermost first."""
    open_envs: list[str] = []
    for m in _CONTROL.finditer(src):
        command, name = m.group(1), m.group(2)
        if command is None:
            continue
        if name is None or not name.strip():
            return False  # \begin or \end without an environment name
        if command == "begin":
            open_envs.append(name.strip())
        elif not open_envs or open_envs.pop() != name.strip():
            return False
    return not open_envs


def featurize_latex(src: object, tokenizer: Any, max_len: int) -> dict[str, np.ndarray]:
    check_latex(src)
    return encode_domain(tokenizer, "latex", src, max_len, "bad_latex")


def check_latex(src: object) -> None:
    """DocumentFormatError for what no LaTeX encoder takes, whatever its length limit."""
    if not isinstance(src, str) or not src.strip():
        raise DocumentFormatError("bad_latex", "'latex' must be a non-empty string")
    if not braces_balanced(src):
        raise DocumentFormatError("bad_latex", f"unbalanced braces in {src[:40]!r}")
    if not environments_balanced(src):
        raise DocumentFormatError("bad_latex", f"unbalanced \\begin/\\end environments in {src[:40]!r}")
