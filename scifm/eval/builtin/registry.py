"""The built-in tasks, by name: each is a generator of items over a TaskContext."""

from __future__ import annotations

from scifm.eval.builtin.codons import codon_task
from scifm.eval.builtin.common import Task
from scifm.eval.builtin.elements import elements_task
from scifm.eval.builtin.figures import figure_qa_task
from scifm.eval.builtin.latex import latex_equiv_task
from scifm.eval.builtin.molecules import mol_props_task, tpsa_task
from scifm.eval.builtin.proteins import protein_props_task
from scifm.eval.builtin.redefine import redefine_task
from scifm.eval.builtin.tables import table_qa_task

# Names are the task file stems (<name>.jsonl) and what `eval.tasks` lists.
BUILTIN_TASKS: dict[str, Task] = {
    "tpsa": tpsa_task,
    "mol_props": mol_props_task,
    "codon": codon_task,
    "protein_props": protein_props_task,
    "latex_equiv": latex_equiv_task,
    "table_qa": table_qa_task,
    "figure_qa": figure_qa_task,
    "elements": elements_task,
    "redefine": redefine_task,
}
