"""Built-in verifiable scientific QA tasks, made from held-out records of the built-in corpus.

    from scifm.eval.builtin import build_builtin_tasks, default_tasks_dir
    report = build_builtin_tasks(default_tasks_dir())   # <dir>/<task>.jsonl, figures/, tasks_report.json

Every item comes from data shipped in pip packages, with its answer from the data or computed by
RDKit, Biopython or SymPy, and only from records whose corpus document is in the test split.
`BUILTIN_TASKS` and `build_builtin_tasks` are imported on first use: the tasks pull in RDKit, SymPy
and matplotlib, which callers that only need `default_tasks_dir` or `BUILTIN_TASK_NAMES` should not
pay for.
"""

from __future__ import annotations

from scifm.eval.builtin.version import TASKS_VERSION, default_tasks_dir

__all__ = ["BUILTIN_TASKS", "BUILTIN_TASK_NAMES", "TASKS_VERSION", "build_builtin_tasks", "default_tasks_dir"]

# BUILTIN_TASKS' keys, in its order, without importing the tasks (a test keeps the two equal)
BUILTIN_TASK_NAMES: tuple[str, ...] = (
    "tpsa", "mol_props", "codon", "protein_props", "latex_equiv", "table_qa", "figure_qa", "elements", "redefine",
)


def __getattr__(name: str) -> object:
    if name == "build_builtin_tasks":
        from scifm.eval.builtin.build import build_builtin_tasks

        return build_builtin_tasks
    if name == "BUILTIN_TASKS":
        from scifm.eval.builtin.registry import BUILTIN_TASKS

        return BUILTIN_TASKS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
