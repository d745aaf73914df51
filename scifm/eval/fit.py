"""Whether a request fits the model: the one rule of scoring, generation, item selection and the
lm-evaluation-harness adapter. The model reads at most seq_len input ids, as in training, so a
request fits when the ids it feeds (every id but the last one predicted) number at most seq_len."""

from __future__ import annotations

from scifm.core.errors import DocumentFormatError


def check_fits(n_inputs: int, seq_len: int, what: str) -> None:
    """A counted `too_long` skip reason (DocumentFormatError) when `n_inputs` ids exceed seq_len."""
    if n_inputs > seq_len:
        raise DocumentFormatError("too_long", f"{what} of {n_inputs} input tokens exceeds the sequence length {seq_len}")
