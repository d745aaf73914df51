"""LaTeX encoder: ids of the LaTeX domain vocabulary (commands, symbols) -> k slots."""

from __future__ import annotations

from scifm.model.encoders.common import TokenSequenceEncoder


class LatexEncoder(TokenSequenceEncoder):
    """Batch keys `ids`, `mask` [B, L] from scifm.data.features.collate("latex", ...)."""
