"""Evaluation speed of the tiny model (random weights) on the built-in tasks: items/s for multiple
choice and for short answer, and greedy generation with the incremental stop-string check against
decoding every row's whole text after every token (the rule before it), side by side.

Each round runs, in turn, the multiple-choice items, the short-answer items with the incremental
check and the same items with the full decode, so that load on the machine hits all alike. Prints
medians, the spread (max / min over rounds) and full/incremental per generation budget, also for the
stop checks alone on the generated rows; checks that both checks give the same predictions. Random
weights seldom write the stop string (a newline), so rows run to the budget: the most stop checks
per item.
Run: python bench/eval_items.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections import defaultdict
from dataclasses import replace

import torch

from scifm.config import compose_run_config
from scifm.data.streams import resolve_sources
from scifm.data.tokenizer_training import train_tokenizer
from scifm.eval import generate
from scifm.eval.builtin import BUILTIN_TASK_NAMES, build_builtin_tasks, default_tasks_dir
from scifm.eval.multiple_choice import evaluate_multiple_choice
from scifm.eval.runner import Task, items_that_fit
from scifm.eval.short_answer import evaluate_short_answer
from scifm.eval.tasks import MultipleChoiceItem, ShortAnswerItem, load_task_file
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of

N_MULTIPLE_CHOICE, N_SHORT_ANSWER = 256, 64
BUDGETS = (16, 128)  # max_new_tokens: eval's default, and long answers (the tiny model's seq_len is 256)
BATCH = 32  # eval.batch_size's default


class FullDecodeStop:
    """The stop check before StopMatcher: decodes all of a row's ids after every token."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.ids = tokenizer, stop, []

    def add(self, token: int) -> bool:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        return any(s in text for s in self.stop)


def items_of(kind: type, n: int, tokenizer, cfg) -> list:
    """n items of `kind` cycled from every built-in task, so every modality counts."""
    tasks_dir = default_tasks_dir()
    build_builtin_tasks(tasks_dir)
    pool = []
    for name in BUILTIN_TASK_NAMES:
        task = Task(name, "builtin", load_task_file(tasks_dir / f"{name}.jsonl"), tasks_dir)
        usable, _ = items_that_fit(task, tokenizer, cfg.model.encoders, cfg.data.seq_len)
        pool += [i for i in usable if isinstance(i, kind)]
    return [replace(item, id=f"{item.id}#{k}") for k, item in enumerate(itertools.islice(itertools.cycle(pool), n))]


def feed(check: type, tokenizer, rows: list[list[int]]) -> None:
    for ids in rows:
        matcher = check(tokenizer, ("\n",))
        any(matcher.add(token) for token in ids)


def timed(fn) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = compose_run_config(["experiment=tiny"])
    tokenizer = train_tokenizer(resolve_sources(cfg.data), cfg.data)
    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    init_parameters(model, 0, cfg.model.init_std, cfg.model.n_layers)
    enc, seq_len, tasks_dir = cfg.model.encoders, cfg.data.seq_len, default_tasks_dir()
    mc_items = items_of(MultipleChoiceItem, N_MULTIPLE_CHOICE, tokenizer, cfg)
    sa_items = items_of(ShortAnswerItem, N_SHORT_ANSWER, tokenizer, cfg)

    def multiple_choice() -> dict:
        return evaluate_multiple_choice(model, tokenizer, enc, mc_items, seq_len=seq_len, batch_size=BATCH,
                                        base_dir=tasks_dir)

    def short_answer(check: type, budget: int) -> dict:
        generate.StopMatcher = check
        return evaluate_short_answer(model, tokenizer, enc, sa_items, seq_len=seq_len, batch_size=BATCH,
                                     base_dir=tasks_dir, max_new_tokens=budget)

    incremental = generate.StopMatcher
    checks = {"incremental": incremental, "full decode": FullDecodeStop}
    times: dict[str, list[float]] = defaultdict(list)
    rows: dict[int, list[list[int]]] = {}
    multiple_choice(), short_answer(incremental, BUDGETS[0])  # warm-up: kernel probes, allocator
    for _ in range(args.rounds):
        times["multiple choice"].append(timed(multiple_choice)[0])
        for budget in BUDGETS:
            predictions = []
            for name, check in checks.items():
                seconds, out = timed(lambda: short_answer(check, budget))
                times[f"{name} {budget}"].append(seconds)
                predictions.append([s["prediction"] for s in out["samples"]])
            assert predictions[0] == predictions[1], "the two stop checks disagree"
            rows[budget] = [tokenizer.encode_text(p) for p in predictions[0]]
    generate.StopMatcher = incremental
    # the stop checks alone, fed the generated rows (re-encoded from their text) token by token
    for _ in range(args.rounds):
        for budget in BUDGETS:
            for name, check in checks.items():
                times[f"{name} check {budget}"].append(timed(lambda: feed(check, tokenizer, rows[budget]))[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: max(t) / min(t) for name, t in times.items()}
    print(f"tiny model, {args.rounds} rounds, batch {BATCH}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  multiple choice   {N_MULTIPLE_CHOICE / med['multiple choice']:7.1f} items/s  "
          f"spread {spread['multiple choice']:.2f}")
    for budget in BUDGETS:
        inc, full = f"incremental {budget}", f"full decode {budget}"
        print(f"  short answer, max_new_tokens {budget:3d}: incremental {N_SHORT_ANSWER / med[inc]:6.1f} items/s "
              f"(spread {spread[inc]:.2f}), full decode {N_SHORT_ANSWER / med[full]:6.1f} items/s "
              f"(spread {spread[full]:.2f}), full/incremental time {med[full] / med[inc]:.2f}")
        inc, full = f"incremental check {budget}", f"full decode check {budget}"
        print(f"    the stop checks alone: incremental {med[inc] * 1e3:6.1f} ms (spread {spread[inc]:.2f}), "
              f"full decode {med[full] * 1e3:6.1f} ms (spread {spread[full]:.2f}), "
              f"full/incremental {med[full] / med[inc]:.1f}")


if __name__ == "__main__":
    main()
