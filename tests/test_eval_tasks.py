"""Task files: the documented format loads; each malformed line names file, line and field;
numeric tolerances and units; multiple-choice evaluation is exact with a model whose logits are known."""

from __future__ import annotations

import json

import pytest
import torch

from scifm.eval.multiple_choice import evaluate_multiple_choice
from scifm.eval.short_answer import is_correct
from scifm.eval.tasks import MultipleChoiceItem, ShortAnswerItem, TaskFormatError, load_task_file

GOOD = [
    {"id": "q1", "skill": "chem.tpsa", "type": "multiple_choice", "question": "TPSA of aspirin?",
     "choices": [" 63.6", " 12.0"], "answer": 0},
    {"id": "q2", "skill": "bio.codon", "type": "short_answer",
     "question": [{"type": "text", "text": "AUG codes for"}], "answer": "methionine"},
    {"id": "q3", "skill": "chem.mw", "type": "short_answer", "question": [
        {"type": "text", "text": "MW of "}, {"type": "molecule", "smiles": "CCO"}], "answer": 46.07, "rel_tol": 0.01},
]


def write(tmp_path, rows) -> object:
    path = tmp_path / "task.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_documented_format_loads(tmp_path):
    items = load_task_file(write(tmp_path, GOOD))
    assert isinstance(items[0], MultipleChoiceItem) and items[0].question == [{"type": "text", "text": "TPSA of aspirin?"}]
    assert isinstance(items[2], ShortAnswerItem) and items[2].answer == 46.07 and items[2].rel_tol == 0.01


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"task\.jsonl:2: not valid JSON"),
    (GOOD[0] | {"answer": 5}, r"task\.jsonl:2: field 'answer' must be an index into the 2 choices"),
    (GOOD[0] | {"choices": [" only"]}, r"task\.jsonl:2: field 'choices'"),
    (GOOD[0] | {"type": "essay"}, r"task\.jsonl:2: field 'type'"),
    (GOOD[0] | {"skill": ""}, r"task\.jsonl:2: field 'skill'"),
    (GOOD[1] | {"question": [{"type": "molecule"}]}, r"task\.jsonl:2: field 'question'"),
    (GOOD[2] | {"rel_tol": -1}, r"task\.jsonl:2: field 'rel_tol'"),
    (GOOD[0], r"task\.jsonl:2: field 'id': 'q1' appears twice"),
    # the same answer twice, also when only surrounding whitespace differs
    (GOOD[0] | {"id": "d", "choices": [" 63.6", " 12.0", " 63.6"]}, r"task\.jsonl:2: field 'choices': ' 63\.6' appears twice"),
    (GOOD[0] | {"id": "d", "choices": [" 63.6", "63.6 "]}, r"task\.jsonl:2: field 'choices': '63\.6 ' appears twice"),
    (GOOD[0] | {"id": "d", "fewshot": "yes"}, r"task\.jsonl:2: field 'fewshot' must be true or false"),
    (GOOD[2] | {"unit": 5}, r"task\.jsonl:2: field 'unit' must be a string"),
    (GOOD[2] | {"abs_tol": float("nan")}, r"task\.jsonl:2: field 'abs_tol'"),
])
def test_a_malformed_line_names_file_line_and_field(tmp_path, bad, message):
    with pytest.raises(TaskFormatError, match=message):
        load_task_file(write(tmp_path, [GOOD[0], bad]))


def test_missing_and_empty_task_files(tmp_path):
    with pytest.raises(TaskFormatError, match="no such task file"):
        load_task_file(tmp_path / "none.jsonl")
    with pytest.raises(TaskFormatError, match="holds no items"):
        load_task_file(write(tmp_path, [""]))
    with pytest.raises(TaskFormatError, match="every item is marked \"fewshot\"; none is left to score"):
        load_task_file(write(tmp_path, [GOOD[0] | {"fewshot": True}]))


def short(answer: float, **fields) -> dict:
    return {"id": "n", "skill": "s", "type": "short_answer", "question": "Value?", "answer": answer} | fields


def test_a_zero_target_takes_rel_tol_as_its_default_abs_tol(tmp_path):
    zero, explicit, nonzero = load_task_file(write(tmp_path, [
        short(0, rel_tol=0.01), short(0.0, rel_tol=0.01, abs_tol=0.0) | {"id": "e"}, short(5, rel_tol=0.01) | {"id": "f"}]))
    assert (zero.abs_tol, explicit.abs_tol, nonzero.abs_tol) == (0.01, 0.0, 0.0)
    assert is_correct("0.004", zero) and is_correct("-0.01", zero) and not is_correct("0.02", zero)
    assert not is_correct("0.004", explicit) and is_correct("0", explicit)  # an explicit abs_tol wins
    assert is_correct("5.05", nonzero) and not is_correct("5.06", nonzero)


def test_few_shot_flag_and_unit_load(tmp_path):
    example, item = load_task_file(write(tmp_path, [
        GOOD[0] | {"fewshot": True}, short(18.015, rel_tol=0.01, unit=" g/mol ")]))
    assert example.fewshot and not item.fewshot and item.unit == "g/mol"
    assert not load_task_file(write(tmp_path, GOOD))[2].unit


class KnownLogits(torch.nn.Module):
    """Every position predicts token `favourite` with logit 5 and every other token with 0."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        self.bias.data[favourite] = 5.0

    def forward(self, input_ids_BS, positions_BS, doc_ids_BS, items, slot_index):
        return self.bias.expand(*input_ids_BS.shape, -1)


def test_multiple_choice_is_exact_with_known_logits(make_config, tokenizer):
    cfg = make_config()
    (a,) = tokenizer.encode_text(" A")  # one token each, so each option is one prediction
    assert len(tokenizer.encode_text(" B")) == 1
    vocab = tokenizer.vocab_size
    model = KnownLogits(vocab, favourite=a)
    q = [{"type": "text", "text": "Pick one:"}]
    items = [MultipleChoiceItem("1", "s1", q, [" A", " B"], 0), MultipleChoiceItem("2", "s2", q, [" A", " B"], 1)]
    out = evaluate_multiple_choice(model, tokenizer, cfg.model.encoders, items, seq_len=64)
    # log p(A) = 5 - log(e^5 + V - 1), log p(B) = -log(e^5 + V - 1): the option softmax is sigmoid(5)
    p = torch.sigmoid(torch.tensor(5.0)).item()
    assert out["scores"]["acc"]["value"] == 0.5 and out["scores"]["acc_norm"]["value"] == 0.5
    assert out["scores"]["brier"]["value"] == pytest.approx(((1 - p) ** 2 * 2 + (p**2 + p**2)) / 2, abs=1e-6)
    # both predictions have confidence p (one bin): |accuracy 0.5 - p|
    assert out["scores"]["ece"]["value"] == pytest.approx(abs(0.5 - p), abs=1e-6)
    assert out["by_skill"]["s1"]["value"] == 1.0 and out["by_skill"]["s2"]["value"] == 0.0
