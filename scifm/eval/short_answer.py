"""Short-answer items scored on the model's greedy answer: numeric within tolerance, or exact text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from scifm.eval.generate import generate_greedy
from scifm.eval.scoring import by_skill, exact_match, numeric_match, proportion
from scifm.eval.tasks import ShortAnswerItem
from scifm.core.encoders_config import EncodersConfig


def is_correct(prediction: str, item: ShortAnswerItem) -> bool:
    if isinstance(item.answer, str):
        return exact_match(prediction, item.answer)
    return numeric_match(prediction, float(item.answer), item.rel_tol, item.abs_tol)


def evaluate_short_answer(model, tokenizer, enc_cfg: EncodersConfig, items: list[ShortAnswerItem], *,
                          seq_len: int, batch_size: int = 16, base_dir: Path = Path("."),
                          max_new_tokens: int = 16, progress: Callable[[int], None] | None = None) -> dict:
    """acc (95% interval) over all items and per skill, and every item's prediction.

    The answer is the greedy continuation of the question (the whole prompt, scifm.eval.prompts)
    up to the first newline.
    """
    predictions = generate_greedy(model, tokenizer, enc_cfg, [item.question for item in items],
                                  max_new_tokens=max_new_tokens, seq_len=seq_len, batch_size=batch_size,
                                  base_dir=base_dir, progress=progress)
    correct = [is_correct(p, item) for p, item in zip(predictions, items)]
    correct_N = np.array(correct, dtype=float)
    return {
        "scores": {"acc": proportion(correct_N).as_dict()},
        "by_skill": {skill: s.as_dict() for skill, s in by_skill([i.skill for i in items], correct_N).items()},
        "samples": [{"id": item.id, "skill": item.skill, "prediction": p, "target": item.answer, "correct": c}
                    | ({"unit": item.unit} if item.unit else {})
                    for item, p, c in zip(items, predictions, correct)],
    }
