"""Scores of scientific QA items: accuracy (raw and length-normalised), calibration, answer matching,
each with a 95% interval and per-skill slices.

Multiple-choice items are scored from the summed log-likelihood of each option's continuation:
the prediction is the option with the highest sum (`acc`) or the highest sum per character of the
option's text (`acc_norm`), and the softmax of the sums over the options is the model's probability
for each, which calibration is measured on.

`acc_norm` counts characters the way lm-evaluation-harness does: it scores the continuation
"<target delimiter><choice>" (the delimiter is a space by default) but divides by the length of
the choice alone. A scifm choice carries its separator itself (" 63.6"), so its leading whitespace
is not counted.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
ECE_BINS = 10
BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class Score:
    value: float
    low: float  # 95% interval
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


def proportion(successes: np.ndarray) -> Score:
    """Mean of 0/1 outcomes with a Wilson score interval (sound at 0%, 100% and small n)."""
    n = int(successes.size)
    if n == 0:
        return Score(float("nan"), float("nan"), float("nan"), 0)
    p = float(successes.mean())
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return Score(p, max(0.0, centre - half), min(1.0, centre + half), n)


def bootstrap(statistic, *columns: np.ndarray, seed: int = 0) -> Score:
    """A statistic of item-level columns with a percentile bootstrap interval over items."""
    n = int(columns[0].shape[0])
    value = float(statistic(*columns))
    if n < 2:
        return Score(value, float("nan"), float("nan"), n)
    rng = np.random.default_rng(seed)
    samples = [statistic(*(c[idx] for c in columns)) for idx in rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))]
    low, high = np.percentile(samples, [2.5, 97.5])
    return Score(value, float(low), float(high), n)


def option_probabilities(option_logprobs: list[np.ndarray]) -> list[np.ndarray]:
    """Softmax over each item's options of their summed continuation log-likelihoods."""
    out = []
    for lp in option_logprobs:
        z = np.exp(lp - lp.max())
        out.append(z / z.sum())
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Equal-width bins of the predicted option's probability; |accuracy - confidence| weighted by
    the bin's share of items."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def brier(probs: list[np.ndarray], answers: np.ndarray) -> np.ndarray:
    """Per item: sum over options of (p - 1[option is the answer])^2 (0 is perfect, 2 the worst)."""
    return np.array([((p - np.eye(p.size)[a]) ** 2).sum() for p, a in zip(probs, answers)])


def normalising_length(choice: str) -> int:
    """Characters of a choice that acc_norm divides by: those after its leading separator (at least 1)."""
    return max(len(choice.lstrip()), 1)


def multiple_choice(option_logprobs: list[np.ndarray], choices: list[list[str]],
                    answers: np.ndarray) -> dict[str, Score]:
    """acc, acc_norm, ece and brier (each with a 95% interval) over items with any number of options."""
    answers = np.asarray(answers)
    pred = np.array([int(np.argmax(lp)) for lp in option_logprobs])
    pred_norm = np.array([int(np.argmax(lp / np.array([normalising_length(c) for c in cs])))
                          for lp, cs in zip(option_logprobs, choices)])
    probs = option_probabilities(option_logprobs)
    confidence = np.array([p[i] for p, i in zip(probs, pred)])
    correct = (pred == answers).astype(float)
    return {
        "acc": proportion(correct),
        "acc_norm": proportion((pred_norm == answers).astype(float)),
        "ece": bootstrap(expected_calibration_error, confidence, correct),
        "brier": bootstrap(np.mean, brier(probs, answers)),
    }


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(prediction: str, target: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(target)


def numeric_match(prediction: str, target: float, rel_tol: float, abs_tol: float) -> bool:
    """The first number in the prediction is within max(rel_tol * |target|, abs_tol) of the target
    (relative to the target alone, so a wild prediction cannot widen its own tolerance)."""
    found = _NUMBER.search(prediction.replace(",", ""))
    return found is not None and abs(float(found.group()) - target) <= max(rel_tol * abs(target), abs_tol)


def by_skill(skills: list[str], correct: np.ndarray) -> dict[str, Score]:
    """Accuracy per skill, so a rare skill is not hidden inside the aggregate."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, skill in enumerate(skills):
        groups[skill].append(i)
    return {skill: proportion(np.asarray(correct)[idx]) for skill, idx in sorted(groups.items())}
