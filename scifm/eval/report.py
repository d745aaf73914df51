"""The Markdown report of one checkpoint's evaluation and the summary printed at the end of it.

Every score is shown with its 95% interval, so a difference smaller than the noise of a small task
is not mistaken for a real one; multiple-choice rows also show the accuracy of guessing.
"""

from __future__ import annotations

import sys
from pathlib import Path

KIND_LABEL = {"multiple_choice": "multiple choice", "short_answer": "short answer"}
MC_METRICS = ("acc", "acc_norm", "ece", "brier")


def fmt(score: dict) -> str:
    low, high = score["ci95"]
    return f"{score['value']:.3f} [{low:.3f}, {high:.3f}]"


def task_rows(results: dict):
    """(task, kind, evaluation) for every evaluated part of every task."""
    for name, entry in results["tasks"].items():
        for kind in KIND_LABEL:
            if kind in entry:
                yield name, kind, entry[kind]


def render_report(results: dict) -> str:
    m = results["model"]
    lines = [
        f"# Evaluation of {results['checkpoint']}",
        "",
        f"Model `{m['name']}`: {m['total_params']:,} parameters ({m['active_params']:,} active per token), "
        f"step {results['step']}, on {results['device']}. Brackets hold 95% intervals (Wilson for accuracies, "
        "bootstrap over items for ECE and Brier); `chance` is the accuracy of guessing uniformly.",
        "",
        "## Multiple choice",
        "",
        "| task | n | acc | acc_norm | ECE | Brier | chance |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, kind, ev in task_rows(results):
        if kind == "multiple_choice":
            s = ev["scores"]
            lines.append(f"| {name} | {s['acc']['n']} | " + " | ".join(fmt(s[k]) for k in MC_METRICS)
                         + f" | {ev['chance']:.3f} |")
    lines += ["", "## Short answer (greedy generation)", "", "| task | n | acc |", "|---|---|---|"]
    for name, kind, ev in task_rows(results):
        if kind == "short_answer":
            lines.append(f"| {name} | {ev['scores']['acc']['n']} | {fmt(ev['scores']['acc'])} |")
    skipped = [(name, reason, e) for name, entry in results["tasks"].items()
               for reason, e in entry["skipped"].items()]
    if skipped:
        lines += ["", "## Skipped items (do not fit this model; results.json lists every id)", "",
                  "| task | reason | count | example |", "|---|---|---|---|"]
        lines += [f"| {name} | {reason} | {e['count']} | {e['example']} |" for name, reason, e in skipped]
    lines += ["", "## Accuracy per skill", "", "| task | type | skill | n | acc |", "|---|---|---|---|---|"]
    for name, kind, ev in task_rows(results):
        for skill, score in ev["by_skill"].items():
            lines.append(f"| {name} | {KIND_LABEL[kind]} | {skill} | {score['n']} | {fmt(score)} |")
    return "\n".join(lines) + "\n"


def print_summary(results: dict, path: Path) -> None:
    print(f"{results['checkpoint']} (step {results['step']}): accuracy with 95% interval")
    for name, kind, ev in task_rows(results):
        acc = ev["scores"]["acc"]
        chance = f"  chance {ev['chance']:.3f}" if "chance" in ev else ""
        print(f"  {name:16s} {KIND_LABEL[kind]:16s} n={acc['n']:<5d} acc {fmt(acc)}{chance}")
    for name, entry in results["tasks"].items():
        for reason, e in entry["skipped"].items():
            print(f"  {name}: skipped {e['count']} item(s) that do not fit this model ({reason}, e.g. {e['example']})")
    print(f"  wrote {path} and {path.with_name('report.md')}")
    sys.stdout.flush()
