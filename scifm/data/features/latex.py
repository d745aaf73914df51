"""LaTeX source -> ids in the LaTeX domain vocabulary."""

from __future__ import annotations

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


def featurize_latex(src: object, tokenizer: Any, max_len: int) -> dict[str, np.ndarray]:
    if not isinstance(src, str) or not src.strip():
        raise DocumentFormatError("bad_latex", "'latex' must be a non-empty string")
    if not braces_balanced(src):
        raise DocumentFormatError("bad_latex", f"unbalanced braces in {src[:40]!r}")
    return encode_domain(tokenizer, "latex", src, max_len, "bad_latex")
