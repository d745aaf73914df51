"""`scifm eval compare`: accuracy against training step (a run's checkpoints) and against model size
(several runs), per task and per skill, so a skill that gets worse with training or with scale shows
up as a falling line, and is listed when the fall is larger than the 95% intervals.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from scifm.core.errors import DataError
from scifm.eval.report import KIND_LABEL, fmt, task_rows

ALL_SKILLS = "(all)"


def load_results(paths: list[Path]) -> list[dict]:
    """Every results.json under the given run or evaluation directories."""
    found = []
    for path in paths:
        files = [path] if path.is_file() else sorted(path.rglob("results.json"))
        if not path.exists() or not files:
            raise DataError(f"{path}: no results.json found; run `scifm eval checkpoint=...` on it first")
        found += [json.loads(f.read_text()) for f in files]
    return found


def series_key(task: str, kind: str, results: list[dict]) -> str:
    """The task's name, with its kind when a task has both kinds of items."""
    both = any(all(k in r["tasks"].get(task, {}) for k in KIND_LABEL) for r in results)
    return f"{task} ({KIND_LABEL[kind]})" if both else task


def scores_of(r: dict, results: list[dict]) -> dict[tuple[str, str], dict]:
    """(task key, skill) -> accuracy of one checkpoint's results; skill ALL_SKILLS is the task."""
    out = {}
    for task, kind, ev in task_rows(r):
        key = series_key(task, kind, results)
        out[(key, ALL_SKILLS)] = ev["scores"]["acc"]
        out |= {(key, skill): score for skill, score in ev["by_skill"].items()}
    return out


def points(results: list[dict]) -> dict[tuple[str, str, str], list[tuple[dict, dict]]]:
    """(run, task key, skill) -> [(results, score)] sorted by step."""
    out: dict[tuple[str, str, str], list[tuple[dict, dict]]] = defaultdict(list)
    for r in sorted(results, key=lambda r: r["step"]):
        for (key, skill), score in scores_of(r, results).items():
            out[(r["run"], key, skill)].append((r, score))
    return out


def falls(series: list[tuple[float, dict]]) -> str | None:
    """A point at a larger x whose whole interval lies below an earlier point's interval."""
    for i, (x_hi, s_hi) in enumerate(series):
        for x_lo, s_lo in series[i + 1 :]:
            if x_lo > x_hi and s_lo["ci95"][1] < s_hi["ci95"][0]:  # runs of one size are no scale series
                return f"{fmt(s_hi)} at {x_hi:g} -> {fmt(s_lo)} at {x_lo:g}"
    return None


def compare(paths: list[Path], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load_results(paths)
    pts = points(results)
    runs = sorted({r["run"] for r in results})
    tasks = sorted({key for _, key, _ in pts})
    out.mkdir(parents=True, exist_ok=True)

    # score against step: a line per run (the task), or per skill when there is one run
    def step_lines(task: str):
        for (run, key, skill), series in sorted(pts.items()):
            if key == task and (skill == ALL_SKILLS or len(runs) == 1):
                label = Path(run).name if skill == ALL_SKILLS else skill
                yield label, [float(r["step"]) for r, _ in series], [s for _, s in series], skill == ALL_SKILLS

    written = [_plot_panels(plt, tasks, step_lines, "training step", "linear", out / "score_vs_step.png")]

    # score against model size: each run's last evaluated checkpoint, a line per skill
    last = {run: max((r for r in results if r["run"] == run), key=lambda r: r["step"]) for run in runs}
    by_size: dict[tuple[str, str], list[tuple[float, dict]]] = defaultdict(list)
    for r in last.values():
        for key_skill, score in scores_of(r, results).items():
            by_size[key_skill].append((float(r["model"]["active_params"]), score))

    def size_lines(task: str):
        for (key, skill), series in sorted(by_size.items()):
            if key == task:
                series.sort(key=lambda p: p[0])
                yield skill, [x for x, _ in series], [s for _, s in series], skill == ALL_SKILLS

    written.append(_plot_panels(plt, tasks, size_lines, "active parameters per token", "log",
                                out / "score_vs_size.png"))

    lines = ["# Evaluation comparison", "", "Accuracy with 95% intervals.", "",
             "| run | step | active params | task | acc |", "|---|---|---|---|---|"]
    for (run, key, skill), series in sorted(pts.items()):
        if skill == ALL_SKILLS:
            for r, s in series:
                lines.append(f"| {Path(run).name} | {r['step']} | {r['model']['active_params']:,} | {key} | {fmt(s)} |")
    lines += ["", "## Falling lines (a later interval entirely below an earlier one)", ""]
    found = []
    for (run, key, skill), series in sorted(pts.items()):
        fall = falls([(float(r["step"]), s) for r, s in series])
        if fall:
            found.append(f"- with training: {Path(run).name} / {key} / {skill}: {fall} (step)")
    for (key, skill), series in sorted(by_size.items()):
        fall = falls(sorted(series, key=lambda p: p[0]))
        if fall:
            found.append(f"- with scale: {key} / {skill}: {fall} (active parameters)")
    lines += found or ["none"]
    md = out / "compare.md"
    md.write_text("\n".join(lines) + "\n")
    written.append(md)
    return written


def _plot_panels(plt, tasks: list[str], lines_of, xlabel: str, xscale: str, path: Path) -> Path:
    """One panel per task; `lines_of(task)` yields (label, xs, scores, is_task_line) per line,
    drawn with its 95% band (the task's own line bold)."""
    fig, axes = plt.subplots(len(tasks), 1, figsize=(7, 2.6 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        for label, xs, scores, bold in lines_of(task):
            ax.plot(xs, [s["value"] for s in scores], marker="o", lw=2.2 if bold else 1.0, label=label)
            ax.fill_between(xs, [s["ci95"][0] for s in scores], [s["ci95"][1] for s in scores], alpha=0.12)
        ax.set_xscale(xscale)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
