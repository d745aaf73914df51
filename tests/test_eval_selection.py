"""What `scifm eval` runs: which built-in tasks, which items (eval.max_items over skills), the
few-shot prompt (eval.num_fewshot) and unit line each scored item is read with, and every skipped id."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from scifm.core.errors import ConfigError
from scifm.eval.builtin import BUILTIN_TASK_NAMES
from scifm.eval.config import EvalConfig, compose_eval_config
from scifm.eval.runner import Task, builtin_task_names, items_that_fit, load_tasks
from scifm.eval.selection import sample_over_skills, skill_quotas
from scifm.eval.tasks import MultipleChoiceItem


def mc(item_id: str, skill: str, question: str = "Q?", **fields) -> dict:
    return {"id": item_id, "skill": skill, "type": "multiple_choice", "question": question,
            "choices": [" yes", " no"], "answer": 0} | fields


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_skill_file(tmp_path: Path) -> Path:
    """100 items ordered by skill: 60 a, 30 b, 10 c."""
    return write(tmp_path / "ordered.jsonl", [mc(f"{s}{i}", s) for s, n in (("a", 60), ("b", 30), ("c", 10))
                                              for i in range(n)])


def test_naming_only_task_files_runs_only_those_files(tmp_path):
    assert builtin_task_names(EvalConfig()) == list(BUILTIN_TASK_NAMES)  # nothing named: every built-in
    assert builtin_task_names(EvalConfig(task_files=["mine.jsonl"])) == []
    assert builtin_task_names(EvalConfig(tasks=["codon"], task_files=["mine.jsonl"])) == ["codon"]
    # the same through the composed config; `eval=builtin` names every built-in explicitly
    files = "eval.task_files=[mine.jsonl]"
    assert builtin_task_names(compose_eval_config(["checkpoint=x"]).eval) == list(BUILTIN_TASK_NAMES)
    assert builtin_task_names(compose_eval_config(["checkpoint=x", files]).eval) == []
    assert builtin_task_names(compose_eval_config(["checkpoint=x", "eval=builtin", files]).eval) \
        == list(BUILTIN_TASK_NAMES)
    assert builtin_task_names(compose_eval_config(["checkpoint=x", "eval.tasks=[tpsa,redefine]", files]).eval) \
        == ["tpsa", "redefine"]
    tasks = load_tasks(EvalConfig(task_files=[str(write(tmp_path / "mine.jsonl", [mc("q", "s")]))]))
    assert [t.name for t in tasks] == ["mine"]


def test_max_items_samples_every_skill_in_proportion_with_a_fixed_seed(tmp_path):
    path = str(by_skill_file(tmp_path))
    (task,) = load_tasks(EvalConfig(task_files=[path], max_items=10))
    ids = [i.id for i in task.items]
    assert Counter(i.skill for i in task.items) == {"a": 6, "b": 3, "c": 1}  # the first 10 lines are all "a"
    order = [int(i[1:]) + {"a": 0, "b": 60, "c": 90}[i[0]] for i in ids]
    assert order == sorted(order)  # in file order
    assert [i.id for i in load_tasks(EvalConfig(task_files=[path], max_items=10))[0].items] == ids
    other = [i.id for i in load_tasks(EvalConfig(task_files=[path], max_items=10, seed=1))[0].items]
    assert other != ids and Counter(i[0] for i in other) == Counter(i[0] for i in ids)


def test_each_skill_gets_at_least_one_item_while_n_allows():
    assert skill_quotas({"a": 97, "b": 2, "c": 1}, 5) == {"a": 3, "b": 1, "c": 1}
    assert skill_quotas({"a": 97, "b": 2, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}  # the largest skills first
    sizes = {"a": 7, "b": 5, "c": 5, "d": 3, "e": 1}
    for n in range(1, sum(sizes.values())):
        quotas = skill_quotas(sizes, n)
        assert sum(quotas.values()) == n and all(0 <= quotas[s] <= sizes[s] for s in sizes)
        assert all(q >= 1 for q in quotas.values()) or n < len(sizes)
    items = [MultipleChoiceItem(f"{s}{i}", s, [], [" y", " n"], 0) for s, k in sizes.items() for i in range(k)]
    assert sample_over_skills(items, 100, seed=0) == items


def fewshot_file(tmp_path: Path) -> Path:
    rows = [mc(f"dev{i}", "s", f"Dev question {i}?", choices=[" yes", " no"], answer=i % 2, fewshot=True)
            for i in range(4)]
    rows += [mc(f"q{i}", "s", f"Question {i}?") for i in range(6)]
    rows += [{"id": "mw", "skill": "chem.mw", "type": "short_answer", "question": "The molecular weight of water is",
              "answer": 18.015, "rel_tol": 0.01, "unit": "g/mol"},
             {"id": "mwdev", "skill": "chem.mw", "type": "short_answer", "question": "The molecular weight of CH4 is",
              "answer": 16.0, "unit": "g/mol", "fewshot": True}]
    return write(tmp_path / "fs.jsonl", rows)


def prompt_text(item) -> str:
    (seg,) = item.question  # text questions join into one text segment
    return seg["text"]


def test_few_shot_examples_come_from_marked_items_before_each_question(tmp_path):
    path = str(fewshot_file(tmp_path))
    (task,) = load_tasks(EvalConfig(task_files=[path], num_fewshot=2))
    assert [i.id for i in task.items] == [f"q{i}" for i in range(6)] + ["mw"]  # marked items are not scored
    examples = {"dev0": "Dev question 0? yes", "dev1": "Dev question 1? no", "dev2": "Dev question 2? yes",
                "dev3": "Dev question 3? no", "mwdev": "Unit: g/mol\nThe molecular weight of CH4 is 16"}
    for item in task.items:
        chosen = task.fewshot[item.id]
        assert len(chosen) == 2 and len(set(chosen)) == 2 and set(chosen) <= set(examples)
        own = "Unit: g/mol\nThe molecular weight of water is" if item.id == "mw" else f"Question {item.id[1:]}?"
        assert prompt_text(item) == "".join(examples[e] + "\n\n" for e in chosen) + own
    # the draws are the seed's: the same again, and not one fixed pair for every item
    assert load_tasks(EvalConfig(task_files=[path], num_fewshot=2))[0].fewshot == task.fewshot
    assert len({tuple(v) for v in task.fewshot.values()}) > 1
    assert load_tasks(EvalConfig(task_files=[path], num_fewshot=2, seed=7))[0].fewshot != task.fewshot
    # without few-shot the question is the item's own, after its unit line
    plain = {i.id: prompt_text(i) for i in load_tasks(EvalConfig(task_files=[path]))[0].items}
    assert plain["q0"] == "Question 0?" and plain["mw"] == "Unit: g/mol\nThe molecular weight of water is"


def test_asking_for_more_examples_than_marked_is_a_one_line_error_naming_the_task(tmp_path):
    with pytest.raises(ConfigError, match=r'eval\.num_fewshot=6: task fs marks only 5 item\(s\) "fewshot": true'):
        load_tasks(EvalConfig(task_files=[str(fewshot_file(tmp_path))], num_fewshot=6))


def test_every_skipped_id_is_listed_per_reason(make_config, tokenizer, tmp_path):
    long_q = "word " * 80
    items = [MultipleChoiceItem(i, "s", [{"type": "text", "text": long_q if i.startswith("long") else "Q?"}],
                                [" yes", " no"], 0) for i in ("long1", "ok1", "long2", "long3", "ok2")]
    usable, skipped = items_that_fit(Task("t", "t.jsonl", items, tmp_path), tokenizer,
                                     make_config().model.encoders, seq_len=32)
    assert [i.id for i in usable] == ["ok1", "ok2"]
    assert skipped["too_long"]["count"] == 3 and skipped["too_long"]["ids"] == ["long1", "long2", "long3"]
    assert skipped["too_long"]["example"].startswith("long1: too_long")
