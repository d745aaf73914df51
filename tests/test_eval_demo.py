"""The demo checkpoint (`experiment=tiny`, 400 steps) against the untrained weights of the same config
on the built-in tasks: what the issue asks the evaluation to show, with the intervals printed. The
margin is a statistical one, so float-rounding changes in training (a fused optimizer, another CPU's
kernels) move accuracies by an item or two without deciding the outcome. At 200 steps they did decide
it: tpsa's gain had z = 2.55 on an AVX2 CPU and 2.18 on an AVX-512 one, against the 2.54 needed; at
400 (AVX-512), tpsa 0.480 against 0.233 (z = 4.6), better on 6 of the 9 tasks."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import pytest

from scifm.eval.config import EvalConfig, EvalRunConfig
from scifm.eval.report import fmt
from scifm.eval.runner import run_eval
from scifm.config import compose_run_config
from scifm.train.trainer import train


@pytest.mark.slow
def test_demo_checkpoint_beats_its_untrained_weights_on_three_builtin_tasks(demo_run, tmp_path):
    accuracy = {}
    untrained = tmp_path / "untrained"
    train(compose_run_config(["experiment=tiny", "trainer.max_steps=0"]), untrained)
    for name, run_dir, steps in (("demo", demo_run[0], 400), ("untrained", untrained, 0)):
        [path] = run_eval(EvalRunConfig(str(run_dir / "checkpoints" / f"step_{steps}"), EvalConfig(
            tasks=["tpsa", "mol_props", "codon", "protein_props", "latex_equiv", "table_qa", "figure_qa",
                   "elements", "redefine"],
            out=str(tmp_path / name / "eval"))))  # the shared demo run's directory stays as trained
        results = json.loads(path.read_text())
        accuracy[name] = {task: e["multiple_choice"]["scores"]["acc"] for task, e in results["tasks"].items()}

    # a gain counts as training, not luck, when a one-sided z-test of the difference of the two
    # accuracies passes at 5% for the whole family of tasks (Bonferroni: 5% / 9 per task). Unpaired,
    # so conservative: both models answer the same items, whose difficulties correlate their scores.
    z_needed = NormalDist().inv_cdf(1 - 0.05 / len(accuracy["demo"]))
    better, significant = [], []
    print("\nmultiple-choice accuracy, 95% interval: demo (400 steps) vs untrained (step 0); z of the gain")
    for task, demo in accuracy["demo"].items():
        base = accuracy["untrained"][task]
        p, q = demo["value"], base["value"]
        z = (p - q) / math.sqrt(p * (1 - p) / demo["n"] + q * (1 - q) / base["n"])
        print(f"  {task:14s} {fmt(demo)}  vs  {fmt(base)}  z={z:+.2f}")
        if p > q:
            better.append(task)
        if z > z_needed:
            significant.append(task)
    print(f"  above: {better}; significant (z > {z_needed:.2f}): {significant}")
    assert len(better) >= 3, better
    assert significant, accuracy
