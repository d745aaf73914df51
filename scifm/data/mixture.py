"""Mixture sampling probabilities over streams.

Sources are drawn with probability ~ weight ** (1 / temperature): temperature 1 follows the
weights, larger temperatures flatten the mixture toward uniform. With skill balancing each
source is split into one stream per skill and its probability is shared equally among them,
so a rare skill is seen as often as a common one of the same source. A source without documents
(in the split the counts are of) has no stream, and the others share its probability.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def source_probabilities(weights: list[float], temperature: float) -> np.ndarray:
    tempered = np.asarray(weights, dtype=np.float64) ** (1.0 / temperature)
    return tempered / tempered.sum()


def stream_probabilities(
    weights: list[float], temperature: float, skills_per_source: list[Counter] | None
) -> tuple[np.ndarray, list[tuple[int, str | None]]]:
    """Returns (probabilities, [(source index, skill or None)]) with one entry per stream."""
    p_source = source_probabilities(weights, temperature)
    if skills_per_source is None:
        return p_source, [(i, None) for i in range(len(weights))]
    probs, streams = [], []
    for i, counts in enumerate(skills_per_source):
        skills = sorted(s for s, n in counts.items() if n > 0)
        for skill in skills:
            probs.append(p_source[i] / len(skills))
            streams.append((i, skill))
    total = sum(probs)  # less than 1 when a source has no documents; 0 when none has any
    return np.asarray(probs) / (total or 1.0), streams
