"""Writes the built-in QA task set: one <task>.jsonl per task, figures/, and tasks_report.json.

Items come only from records whose corpus document is in the test split (see held_out.py), so a
model trained on the built-in corpus is evaluated on facts it has not been trained on. Built beside
its final place and swapped in, under a lock, as the corpus is (scifm/data/build_once.py).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from scifm.data.build_once import build_once
from scifm.data.corpus.build import write_json
from scifm.data.corpus.common import FIGURES_DIR
from scifm.data.corpus.version import CORPUS_VERSION
from scifm.core.errors import DataError
from scifm.eval.builtin.version import TASKS_VERSION

REPORT_FILE = "tasks_report.json"


def build_builtin_tasks(out_dir: str | Path, *, seed: int = 0) -> dict:
    """Builds every task into `out_dir` and returns the report; an up-to-date directory is not rebuilt.

    Safe to call from several processes at once: see build_once.
    """
    out_dir = Path(out_dir)
    params = {"seed": seed}
    return build_once(out_dir, marker=REPORT_FILE, kind="scifm task set",
                      is_current=lambda d: cached_report(d, params), write=lambda root: write_tasks(root, params))


def cached_report(out_dir: Path, params: dict) -> dict | None:
    try:
        report = json.loads((out_dir / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    # the items depend on the corpus's ids and splits as much as on this code
    if (report.get("version"), report.get("corpus_version"), report.get("params")) != (
        TASKS_VERSION, CORPUS_VERSION, params
    ):
        return None
    files = [out_dir / f"{name}.jsonl" for name in report.get("items_per_task", {})]
    return report if files and all(f.is_file() for f in files) else None


def write_tasks(root: Path, params: dict) -> dict:
    # imported here: the tasks pull in RDKit, SymPy, matplotlib ..., which a cached task set does not need
    from scifm.eval.builtin.common import TaskContext, cap
    from scifm.eval.builtin.held_out import CORPUS_SEED
    from scifm.eval.builtin.registry import BUILTIN_TASKS

    per_task: dict[str, int] = {}
    per_skill: dict[str, dict[str, int]] = {}
    skipped: dict[str, dict[str, int]] = {}
    figures: set[str] = set()
    for name, task in BUILTIN_TASKS.items():
        # one RNG per task, seeded by name: a task's items do not depend on the others
        ctx = TaskContext(name, random.Random(f"{params['seed']}:{name}"), root)
        items = cap(list(task(ctx)))
        if not items:
            raise DataError(f"built-in task '{name}' has no items; skipped records: {dict(ctx.skipped)}")
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        per_task[name] = len(items)
        per_skill[name] = dict(sorted(Counter(item["skill"] for item in items).items()))
        skipped[name] = dict(sorted(ctx.skipped.items()))
        figures |= {s["path"] for item in items for s in item["question"] if s["type"] == "figure"}
    for png in (root / FIGURES_DIR).glob("*.png"):  # drawn for items the cap left out
        if f"{FIGURES_DIR}/{png.name}" not in figures:
            png.unlink()
    report = {
        "version": TASKS_VERSION,
        "corpus_version": CORPUS_VERSION,
        "corpus_seed": CORPUS_SEED,
        "params": params,
        "total_items": sum(per_task.values()),
        "figures": len(figures),
        "items_per_task": per_task,
        "items_per_skill": per_skill,
        "skipped": skipped,
    }
    write_json(root / REPORT_FILE, report)  # written last: its presence marks a complete task set
    return report
