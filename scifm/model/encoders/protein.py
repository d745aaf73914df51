"""Protein encoder: residue ids of the protein domain vocabulary -> k slots."""

from __future__ import annotations

from scifm.model.encoders.common import TokenSequenceEncoder


class ProteinEncoder(TokenSequenceEncoder):
    """Batch keys `ids`, `mask` [B, L] from scifm.data.features.collate("protein", ...)."""
