"""User task files: JSONL, one item per line, multiple choice or short answer.

  {"id": "q1", "skill": "chem.tpsa", "type": "multiple_choice",
   "question": "What is the TPSA of aspirin?" | [segments as in docs/architecture.md],
   "choices": [" 63.6", " 12.0", " 40.5"], "answer": 0}
  {"id": "q2", "skill": "bio.codon", "type": "short_answer",
   "question": "...", "answer": "methionine" | 63.6, "rel_tol": 0.01, "abs_tol": 0.0, "unit": "g/mol"}
  {"id": "d1", ..., "fewshot": true}   (either type: a few-shot example, never scored)

A question given as a string is one text segment. Choices are continuations of the question and
are scored by log-likelihood; two choices with the same text (ignoring surrounding whitespace) are
an error, since the item would have two right answers or count a guess twice. A numeric short
answer matches when |prediction - answer| <= max(rel_tol * |answer|, abs_tol); both default to 0
(exact), except that an answer of exactly 0 takes rel_tol as its default abs_tol (a relative
tolerance alone accepts only 0 itself there). `unit` is shown in the prompt and the samples; a
string answer is matched by normalised exact match. A malformed line is an error naming the file,
the line and the field: an evaluation set that silently lost items would report a wrong score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scifm.data.documents import DamagedFileError, decode_line, read_lines, validate_segment
from scifm.core.errors import DataError, DocumentFormatError


class TaskFormatError(DataError):
    """A task file line breaks the format; the message names file, line and field."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    id: str
    skill: str
    question: list[dict]
    choices: list[str]
    answer: int
    fewshot: bool = False  # a few-shot example (eval.num_fewshot), never scored


@dataclass(frozen=True)
class ShortAnswerItem:
    id: str
    skill: str
    question: list[dict]
    answer: str | float
    rel_tol: float = 0.0
    abs_tol: float = 0.0
    unit: str = ""  # shown in the prompt and the samples; "" = none
    fewshot: bool = False


def _question(value: object, where: str) -> list[dict]:
    if isinstance(value, str) and value:
        return [{"type": "text", "text": value}]
    if isinstance(value, list) and value:
        for i, seg in enumerate(value):
            try:
                validate_segment(seg, i)
            except DocumentFormatError as err:
                raise TaskFormatError(f"{where}: field 'question': {err}") from None
        return value
    raise TaskFormatError(f"{where}: field 'question' must be a non-empty string or list of segments")


def _choices(obj: dict, where: str) -> list[str]:
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskFormatError(f"{where}: field 'choices' must list at least 2 non-empty strings")
    texts = [c.strip() for c in choices]
    for i, text in enumerate(texts):
        if text in texts[:i]:
            raise TaskFormatError(f"{where}: field 'choices': {choices[i]!r} appears twice "
                                  "(choices differing only in surrounding whitespace are the same answer)")
    return choices


def _tolerance(obj: dict, key: str, default: float, where: str) -> float:
    value = obj.get(key, default)
    # `not value >= 0` refuses NaN too (Python's json reads the literal NaN)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise TaskFormatError(f"{where}: field '{key}' must be a number >= 0")
    return float(value)


def _optional(obj: dict, key: str, kind: type, default: object, where: str, what: str):
    value = obj.get(key, default)
    if not isinstance(value, kind):
        raise TaskFormatError(f"{where}: field '{key}' must be {what}")
    return value


def _multiple_choice(obj: dict, question: list[dict], fewshot: bool, where: str) -> MultipleChoiceItem:
    choices = _choices(obj, where)
    answer = obj.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise TaskFormatError(f"{where}: field 'answer' must be an index into the {len(choices)} choices")
    return MultipleChoiceItem(obj["id"], obj["skill"], question, choices, answer, fewshot)


def _short_answer(obj: dict, question: list[dict], fewshot: bool, where: str) -> ShortAnswerItem:
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or answer == "":
        raise TaskFormatError(f"{where}: field 'answer' must be a non-empty string or a number")
    rel_tol = _tolerance(obj, "rel_tol", 0.0, where)
    # around 0 a relative tolerance accepts only 0 itself, so there rel_tol also bounds the distance
    abs_tol = _tolerance(obj, "abs_tol", rel_tol if answer == 0 else 0.0, where)
    unit = _optional(obj, "unit", str, "", where, "a string")
    return ShortAnswerItem(obj["id"], obj["skill"], question, answer if isinstance(answer, str) else float(answer),
                           rel_tol, abs_tol, unit.strip(), fewshot)


def _parse(obj: object, where: str) -> MultipleChoiceItem | ShortAnswerItem:
    if not isinstance(obj, dict):
        raise TaskFormatError(f"{where}: expected a JSON object")
    for key in ("id", "skill"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise TaskFormatError(f"{where}: field '{key}' must be a non-empty string")
    question = _question(obj.get("question"), where)
    fewshot = _optional(obj, "fewshot", bool, False, where, "true or false")
    kind = obj.get("type")
    if kind == "multiple_choice":
        return _multiple_choice(obj, question, fewshot, where)
    if kind == "short_answer":
        return _short_answer(obj, question, fewshot, where)
    raise TaskFormatError(f"{where}: field 'type' must be 'multiple_choice' or 'short_answer', got {kind!r}")


def _parse_line(raw: bytes, where: str) -> MultipleChoiceItem | ShortAnswerItem:
    try:
        obj = json.loads(decode_line(raw))
    except DocumentFormatError as err:  # bytes that are not UTF-8
        raise TaskFormatError(f"{where}: {err}") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, an over-long number, too deep nesting
        raise TaskFormatError(f"{where}: not valid JSON ({getattr(err, 'msg', err)})") from None
    return _parse(obj, where)


def load_task_file(path: str | Path) -> list[MultipleChoiceItem | ShortAnswerItem]:
    path = Path(path)
    if not path.is_file():
        raise TaskFormatError(f"{path}: no such task file")
    items, seen = [], set()
    try:
        for lineno, raw in read_lines(path):
            if raw.strip():
                item = _parse_line(raw, f"{path}:{lineno}")
                if item.id in seen:
                    raise TaskFormatError(f"{path}:{lineno}: field 'id': {item.id!r} appears twice")
                seen.add(item.id)
                items.append(item)
    except DamagedFileError as err:  # items past the damage would be silently missing from the score
        raise TaskFormatError(err.detail) from None
    if not items:
        raise TaskFormatError(f"{path}: the task file holds no items")
    if all(item.fewshot for item in items):
        raise TaskFormatError(f"{path}: every item is marked \"fewshot\"; none is left to score")
    return items
