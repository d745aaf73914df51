"""1,000 multiple-choice items of the built-in tasks with the tiny model in under 60 s on 2 cores."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

from scifm.eval.builtin import BUILTIN_TASK_NAMES, build_builtin_tasks, default_tasks_dir
from scifm.eval.multiple_choice import evaluate_multiple_choice
from scifm.eval.runner import Task, items_that_fit
from scifm.eval.tasks import MultipleChoiceItem, load_task_file
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of

N_ITEMS = 1000
BUDGET_S = 60.0


def test_a_thousand_multiple_choice_items_take_under_a_minute(make_config, tokenizer):
    cfg = make_config()
    tasks_dir = default_tasks_dir()
    build_builtin_tasks(tasks_dir)
    pool = []
    for name in BUILTIN_TASK_NAMES:  # every task, so molecules, proteins, tables and figures all count
        task = Task(name, "builtin", load_task_file(tasks_dir / f"{name}.jsonl"), tasks_dir)
        usable, _ = items_that_fit(task, tokenizer, cfg.model.encoders, cfg.data.seq_len)
        pool += [i for i in usable if isinstance(i, MultipleChoiceItem)]
    items = [replace(item, id=f"{item.id}#{k}") for k, item in enumerate(itertools.islice(itertools.cycle(pool), N_ITEMS))]
    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    init_parameters(model, 0, cfg.model.init_std, cfg.model.n_layers)

    t0 = time.perf_counter()
    out = evaluate_multiple_choice(model, tokenizer, cfg.model.encoders, items, seq_len=cfg.data.seq_len,
                                   batch_size=32, base_dir=tasks_dir)
    seconds = time.perf_counter() - t0
    print(f"{N_ITEMS} multiple-choice items ({sum(len(i.choices) for i in items)} continuations) in {seconds:.1f} s")
    assert out["scores"]["acc"]["n"] == N_ITEMS
    assert seconds < BUDGET_S
