"""What the model reads for an item: eval.num_fewshot solved examples, then the item's question.

    <example question><its answer>\n\n<example question><its answer>\n\n<question>

Examples are the task's items marked "fewshot" (scifm/eval/tasks.py), never scored. Each is laid
out as a scored item of its type is, followed by its answer: the right choice of a multiple-choice
item (choices carry their own leading separator), the answer of a short-answer item after one
space (none when the question already ends in whitespace). A short-answer item with a unit has
the line "Unit: <unit>" before its question, examples too.
"""

from __future__ import annotations

import dataclasses
import random

from scifm.eval.tasks import MultipleChoiceItem, ShortAnswerItem

FEWSHOT_SEPARATOR = "\n\n"


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _extend(segments: list[dict], more: list[dict]) -> list[dict]:
    """segments + more, with a text segment meeting a text segment joined into one, so the text
    across the seam tokenizes as one string would."""
    if segments and more and segments[-1]["type"] == "text" and more[0]["type"] == "text":
        return segments[:-1] + [_text(segments[-1]["text"] + more[0]["text"])] + more[1:]
    return segments + more


def question(item: MultipleChoiceItem | ShortAnswerItem) -> list[dict]:
    """The item's question, after its unit line when it has one."""
    if isinstance(item, ShortAnswerItem) and item.unit:
        return _extend([_text(f"Unit: {item.unit}\n")], item.question)
    return list(item.question)


def format_number(value: float) -> str:
    """A numeric answer as an example shows it: 3.0 as 3, 18.015 as 18.015."""
    return format(value, ".15g")


def answer_text(item: MultipleChoiceItem | ShortAnswerItem) -> str:
    """What follows an example's question: its answer with the separator the question lacks."""
    if isinstance(item, MultipleChoiceItem):
        return item.choices[item.answer]
    answer = item.answer if isinstance(item.answer, str) else format_number(item.answer)
    last = item.question[-1]
    ends_in_space = last["type"] == "text" and last["text"][-1:].isspace()
    return answer if ends_in_space else " " + answer


def draw_examples(item, pool: list, k: int, seed: int) -> list:
    """k examples for one item, seeded by (seed, item id): an item gets the same examples whatever
    else is evaluated beside it."""
    return random.Random(f"{seed}:{item.id}").sample(pool, k) if k else []


def with_examples(item, examples: list):
    """The item with its question replaced by the whole prompt: the examples, then the question."""
    segments: list[dict] = []
    for ex in examples:
        segments = _extend(_extend(segments, question(ex)), [_text(answer_text(ex) + FEWSHOT_SEPARATOR)])
    return dataclasses.replace(item, question=_extend(segments, question(item)))
