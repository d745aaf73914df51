"""Scoring is exact on items with known log-likelihoods (values computed by hand below)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scifm.eval.scoring import (
    by_skill,
    exact_match,
    expected_calibration_error,
    multiple_choice,
    numeric_match,
    proportion,
)

# item 0: right both ways; item 1: the raw sum picks the short wrong option, per-byte the right one;
# item 2: a tie, resolved to the first option, which is wrong
LOGPROBS = [np.array([-1.0, -2.0, -3.0]), np.array([-4.0, -2.0]), np.array([0.0, 0.0])]
BYTES = [np.array([1, 1, 1]), np.array([10, 1]), np.array([1, 1])]
ANSWERS = np.array([0, 0, 1])


def test_accuracies_on_known_logits():
    scores = multiple_choice(LOGPROBS, BYTES, ANSWERS)
    assert scores["acc"].value == pytest.approx(1 / 3)
    assert scores["acc_norm"].value == pytest.approx(2 / 3)
    assert scores["acc"].n == 3


def test_brier_and_ece_equal_hand_computed_values():
    s0 = 1 + math.exp(-1) + math.exp(-2)
    p0 = [1 / s0, math.exp(-1) / s0, math.exp(-2) / s0]
    p1 = [math.exp(-2) / (1 + math.exp(-2)), 1 / (1 + math.exp(-2))]
    brier0 = (p0[0] - 1) ** 2 + p0[1] ** 2 + p0[2] ** 2
    brier1 = (p1[0] - 1) ** 2 + p1[1] ** 2
    brier2 = 0.25 + 0.25
    # predicted-option confidences p0[0] (right), p1[1] (wrong), 0.5 (wrong): three separate bins
    ece = ((1 - p0[0]) + p1[1] + 0.5) / 3
    scores = multiple_choice(LOGPROBS, BYTES, ANSWERS)
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
    assert exact_match("  Leucine. ", "leucine") and not exact_match("isoleucine", "leucine")


def test_skill_slices_keep_a_rare_skill_visible():
    skills = ["common"] * 98 + ["rare"] * 2
    correct = np.array([1.0] * 98 + [0.0] * 2)
    slices = by_skill(skills, correct)
    assert slices["common"].value == 1.0 and slices["rare"].value == 0.0 and slices["rare"].n == 2
