"""Multiple-choice items scored by the log-likelihood of each choice as a continuation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from scifm.eval.loglikelihood import Request, score_continuations
from scifm.eval.scoring import Score, by_skill, multiple_choice, option_probabilities
from scifm.eval.tasks import MultipleChoiceItem
from scifm.core.encoders_config import EncodersConfig


def evaluate_multiple_choice(model, tokenizer, enc_cfg: EncodersConfig, items: list[MultipleChoiceItem], *,
                             seq_len: int, batch_size: int = 16, base_dir: Path = Path("."),
                             progress: Callable[[int], None] | None = None) -> dict:
    """acc, acc_norm, ece, brier (95% intervals) over all items, accuracy per skill, the chance
    accuracy of guessing, and one sample per item. `progress(n)` is told of n finished items."""
    requests = [Request(item.question, choice) for item in items for choice in item.choices]
    n_choices = np.array([len(item.choices) for item in items])
    # progress counts items: a batch of requests finishes (requests / mean choices) of them
    per_item = float(n_choices.mean()) if items else 1.0
    on_batch = None if progress is None else (lambda n: progress(round(n / per_item)))
    results = score_continuations(model, tokenizer, enc_cfg, requests, seq_len=seq_len,
                                  batch_size=batch_size, base_dir=base_dir, progress=on_batch)
    logprobs, k = [], 0
    for item in items:
        n = len(item.choices)
        logprobs.append(np.array([r.logprob for r in results[k : k + n]]))
        k += n
    answers = np.array([item.answer for item in items])
    scores: dict[str, Score] = multiple_choice(logprobs, [item.choices for item in items], answers)
    predicted = [int(np.argmax(lp)) for lp in logprobs]
    correct = np.array([float(p == a) for p, a in zip(predicted, answers)])
    probs = option_probabilities(logprobs)
    return {
        "chance": float((1.0 / n_choices).mean()),
        "scores": {name: s.as_dict() for name, s in scores.items()},
        "by_skill": {skill: s.as_dict() for skill, s in by_skill([i.skill for i in items], correct).items()},
        "samples": [
            {"id": item.id, "skill": item.skill, "predicted": p, "answer": item.answer,
             "probs": [round(float(x), 6) for x in pr], "correct": bool(c)}
            for item, p, pr, c in zip(items, predicted, probs, correct)
        ],
    }
