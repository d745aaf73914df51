"""Scoring is exact on items with known log-likelihoods (values computed by hand below), and
acc_norm is lm-evaluation-harness's own on the same log-likelihoods."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
from lm_eval.api.task import ConfigurableTask

from scifm.eval.scoring import (
    by_skill,
    exact_match,
    expected_calibration_error,
    multiple_choice,
    numeric_match,
    proportion,
)

# item 0: right both ways; item 1: the raw sum picks the short wrong option, per character the
# right one; item 2: a tie, resolved to the first option, which is wrong
LOGPROBS = [np.array([-1.0, -2.0, -3.0]), np.array([-4.0, -2.0]), np.array([0.0, 0.0])]
CHOICES = [[" a", " b", " c"], [" abcdefghij", " k"], [" a", " b"]]  # 1, 10 and 1 characters after the space
ANSWERS = np.array([0, 0, 1])


def test_accuracies_on_known_logits():
    scores = multiple_choice(LOGPROBS, CHOICES, ANSWERS)
    assert scores["acc"].value == pytest.approx(1 / 3)
    assert scores["acc_norm"].value == pytest.approx(2 / 3)
    assert scores["acc"].n == 3


# lm-eval documents with per-choice log-likelihoods: normalised by characters without the leading
# space (lm-eval) and by bytes with it (scifm before) the argmax differs on the first, second and
# fourth; the fourth's answer is the one lm-eval's acc_norm misses
LM_EVAL_DOCS = [
    ({"question": "Unit of length?", "choices": ["ab", "abcdef"], "answer": 1}, [-2.0, -5.0]),
    ({"question": "Which is micro?", "choices": ["µµµ", "abc"], "answer": 1}, [-3.0, -2.5]),
    ({"question": "Pick x.", "choices": ["x", "y"], "answer": 0}, [-1.0, -2.0]),
    ({"question": "Short one?", "choices": ["abcdef", "ab"], "answer": 1}, [-5.0, -2.0]),
]


def lm_eval_multiple_choice_task() -> ConfigurableTask:
    """An lm-eval multiple-choice task over LM_EVAL_DOCS (default target delimiter, a space)."""
    docs = [doc for doc, _ in LM_EVAL_DOCS]
    return ConfigurableTask(config={
        "task": "scifm_acc_norm", "test_split": "test", "output_type": "multiple_choice",
        "custom_dataset": lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)}),
        "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    })


def test_acc_norm_is_lm_evals_on_the_same_loglikelihoods():
    task = lm_eval_multiple_choice_task()
    theirs, mine, old_rule_differs = [], [], False
    for doc, (_, lls) in zip(task.test_docs(), LM_EVAL_DOCS):
        # scifm's choices are lm-eval's continuations: the target delimiter, then the choice
        continuations = [r.args[1] for r in task.construct_requests(doc, task.doc_to_text(doc))]
        assert continuations == [" " + c for c in doc["choices"]]
        theirs.append(task.process_results(doc, [(ll, False) for ll in lls])["acc_norm"])
        mine.append(multiple_choice([np.array(lls)], [continuations], np.array([doc["answer"]]))["acc_norm"].value)
        per_byte = int(np.argmax(np.array(lls) / [len(c.encode()) for c in continuations]))
        old_rule_differs |= float(per_byte == doc["answer"]) != theirs[-1]
    assert mine == theirs == [1.0, 1.0, 1.0, 0.0]
    assert old_rule_differs  # the documents tell the two normalisations apart
    lls, choices = [np.array(ll) for _, ll in LM_EVAL_DOCS], [[" " + c for c in d["choices"]] for d, _ in LM_EVAL_DOCS]
    answers = np.array([d["answer"] for d, _ in LM_EVAL_DOCS])
    assert multiple_choice(lls, choices, answers)["acc_norm"].value == task.aggregation()["acc_norm"](theirs)


def test_brier_and_ece_equal_hand_computed_values():
    s0 = 1 + math.exp(-1) + math.exp(-2)
    p0 = [1 / s0, math.exp(-1) / s0, math.exp(-2) / s0]
    p1 = [math.exp(-2) / (1 + math.exp(-2)), 1 / (1 + math.exp(-2))]
    brier0 = (p0[0] - 1) ** 2 + p0[1] ** 2 + p0[2] ** 2
    brier1 = (p1[0] - 1) ** 2 + p1[1] ** 2
    brier2 = 0.25 + 0.25
    # predicted-option confidences p0[0] (right), p1[1] (wrong), 0.5 (wrong): three separate bins
    ece = ((1 - p0[0]) + p1[1] + 0.5) / 3
    scores = multiple_choice(LOGPROBS, CHOICES, ANSWERS)
    assert scores["brier"].value == pytest.approx((brier0 + brier1 + brier2) / 3, abs=1e-12)
    assert scores["ece"].value == pytest.approx(ece, abs=1e-12)
    assert scores["brier"].low <= scores["brier"].value <= scores["brier"].high


def test_ece_is_the_gap_between_confidence_and_accuracy():
    correct = np.array([1, 1, 1, 0, 1, 1, 1, 0, 1, 0], dtype=float)  # 70% right
    assert expected_calibration_error(np.full(10, 0.7), correct) == pytest.approx(0.0)
    assert expected_calibration_error(np.full(10, 0.75), correct) == pytest.approx(0.05)
    assert expected_calibration_error(np.array([0.8, 0.8]), np.array([1.0, 0.0])) == pytest.approx(0.3)


def test_wilson_interval_at_the_edges():
    none = proportion(np.zeros(10))
    assert none.value == 0 and none.low == 0
    assert none.high == pytest.approx(1.959963984540054**2 / (10 + 1.959963984540054**2))
    half = proportion(np.array([1.0, 0.0] * 50))
    assert half.low < 0.5 < half.high and half.high - 0.5 == pytest.approx(0.5 - half.low)


def test_answer_matching():
    assert numeric_match("The TPSA is 63.6 Å².", 63.6, rel_tol=1e-3, abs_tol=0.0)
    assert numeric_match("about 1,234.5 g/mol", 1234.5, rel_tol=1e-6, abs_tol=0.0)
    assert not numeric_match("63.9", 63.6, rel_tol=1e-3, abs_tol=0.0)
    assert numeric_match("63.9", 63.6, rel_tol=0.0, abs_tol=0.5)
    assert numeric_match("-2.5e-3", -0.0025, rel_tol=1e-9, abs_tol=0.0)
    assert not numeric_match("no number here", 1.0, rel_tol=0.1, abs_tol=0.1)
    # the relative tolerance is of the target: 200 is 100% off 100, not 50% of the larger value
    assert not numeric_match("200", 100.0, rel_tol=0.6, abs_tol=0.0)
    assert numeric_match("150", 100.0, rel_tol=0.6, abs_tol=0.0)
    # the larger of the two bounds applies
    assert numeric_match("0.004", 0.0, rel_tol=0.01, abs_tol=0.005)
    assert numeric_match("105", 100.0, rel_tol=0.05, abs_tol=0.001)
    assert exact_match("  Leucine. ", "leucine") and not exact_match("isoleucine", "leucine")


def test_skill_slices_keep_a_rare_skill_visible():
    skills = ["common"] * 98 + ["rare"] * 2
    correct = np.array([1.0] * 98 + [0.0] * 2)
    slices = by_skill(skills, correct)
    assert slices["common"].value == 1.0 and slices["rare"].value == 0.0 and slices["rare"].n == 2
