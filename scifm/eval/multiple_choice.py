"""Multiple-choice items scored by the log-likelihood of each choice as a continuation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scifm.eval.loglikelihood import Request, score_continuations
from scifm.eval.scoring import Score, by_skill, multiple_choice
from scifm.eval.tasks import MultipleChoiceItem
from scifm.model.config import EncodersConfig


def evaluate_multiple_choice(model, tokenizer, enc_cfg: EncodersConfig, items: list[MultipleChoiceItem], *,
                             seq_len: int, batch_size: int = 16, base_dir: Path = Path(".")) -> dict:
    """acc, acc_norm, ece, brier (95% intervals) over all items, and accuracy per skill."""
    requests = [Request(item.question, choice) for item in items for choice in item.choices]
    results = score_continuations(model, tokenizer, enc_cfg, requests, seq_len=seq_len,
                                  batch_size=batch_size, base_dir=base_dir)
    logprobs, option_bytes, k = [], [], 0
    for item in items:
        n = len(item.choices)
        logprobs.append(np.array([r.logprob for r in results[k : k + n]]))
        option_bytes.append(np.array([len(c.encode()) for c in item.choices]))
        k += n
    answers = np.array([item.answer for item in items])
    scores: dict[str, Score] = multiple_choice(logprobs, option_bytes, answers)
    correct = np.array([float(np.argmax(lp) == a) for lp, a in zip(logprobs, answers)])
    return {
        "scores": {name: s.as_dict() for name, s in scores.items()},
        "by_skill": {skill: s.as_dict() for skill, s in by_skill([i.skill for i in items], correct).items()},
    }
