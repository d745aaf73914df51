"""User task files: JSONL, one item per line, multiple choice or short answer.

  {"id": "q1", "skill": "chem.tpsa", "type": "multiple_choice",
   "question": "What is the TPSA of aspirin?" | [segments as in docs/architecture.md],
   "choices": [" 63.6", " 12.0", " 40.5"], "answer": 0}
  {"id": "q2", "skill": "bio.codon", "type": "short_answer",
   "question": "...", "answer": "methionine" | 63.6, "rel_tol": 0.01, "abs_tol": 0.0}

A question given as a string is one text segment. Choices are continuations of the question and
are scored by log-likelihood. A numeric short answer is matched within rel_tol / abs_tol (default
exact); a string answer by normalised exact match. A malformed line is an error naming the file,
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


@dataclass(frozen=True)
class ShortAnswerItem:
    id: str
    skill: str
    question: list[dict]
    answer: str | float
    rel_tol: float = 0.0
    abs_tol: float = 0.0


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


def _parse(obj: object, where: str) -> MultipleChoiceItem | ShortAnswerItem:
    if not isinstance(obj, dict):
        raise TaskFormatError(f"{where}: expected a JSON object")
    for key in ("id", "skill"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise TaskFormatError(f"{where}: field '{key}' must be a non-empty string")
    question = _question(obj.get("question"), where)
    kind = obj.get("type")
    if kind == "multiple_choice":
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TaskFormatError(f"{where}: field 'choices' must list at least 2 non-empty strings")
        answer = obj.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise TaskFormatError(f"{where}: field 'answer' must be an index into the {len(choices)} choices")
        return MultipleChoiceItem(obj["id"], obj["skill"], question, choices, answer)
    if kind == "short_answer":
        answer = obj.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or answer == "":
            raise TaskFormatError(f"{where}: field 'answer' must be a non-empty string or a number")
        tols = {}
        for key in ("rel_tol", "abs_tol"):
            value = obj.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise TaskFormatError(f"{where}: field '{key}' must be a number >= 0")
            tols[key] = float(value)
        return ShortAnswerItem(obj["id"], obj["skill"], question,
                               answer if isinstance(answer, str) else float(answer), **tols)
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
    return items
