"""`scifm eval`: every checkpoint named by `checkpoint=` on every task, each written as
results.json (scores with 95% intervals, per task and skill), report.md and samples/<task>.jsonl."""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scifm.data.documents import Document
from scifm.data.encode import encode_document
from scifm.core.checkpoint_files import (
    META_FILE,
    complete_checkpoints,
    is_complete,
    marked_in_use,
    require_complete,
    step_of,
)
from scifm.core.device import autocast_for, pick_device
from scifm.core.errors import CheckpointError, ConfigError, DataError, DocumentFormatError
from scifm.core.progress import Progress
from scifm.eval.builtin import BUILTIN_TASK_NAMES, build_builtin_tasks, default_tasks_dir
from scifm.eval.config import EvalConfig, EvalRunConfig
from scifm.eval.fit import check_fits
from scifm.eval.multiple_choice import evaluate_multiple_choice
from scifm.eval.prompts import draw_examples, with_examples
from scifm.eval.report import print_summary, render_report
from scifm.eval.selection import sample_over_skills
from scifm.eval.short_answer import evaluate_short_answer
from scifm.eval.tasks import MultipleChoiceItem, ShortAnswerItem, load_task_file
from scifm.model.transformer import count_params
from scifm.train.export import load_checkpoint_model

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # "builtin" or the task file's path
    items: list[MultipleChoiceItem | ShortAnswerItem]  # scored; each question is its whole prompt
    base_dir: Path  # figure paths in the items are relative to it
    fewshot: dict[str, list[str]] = field(default_factory=dict)  # item id -> its few-shot examples' ids


def resolve_checkpoints(spec: str) -> list[Path]:
    """A checkpoint directory, a run directory (all its checkpoints) or a glob, in (run, step) order."""
    if glob.has_magic(spec):
        found = [Path(p) for p in glob.glob(spec) if is_complete(Path(p))]
        if not found:
            raise CheckpointError(f"checkpoint={spec}: the pattern matches no complete checkpoint (no meta.json)")
    else:
        path = Path(spec)
        if (path / META_FILE).exists():  # a checkpoint: complete, or a one-line reason why not
            return [require_complete(path)]
        if not path.exists():
            raise CheckpointError(f"checkpoint={spec}: no such checkpoint or run directory")
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(f"checkpoint={spec}: neither a complete checkpoint (no meta.json) "
                                  "nor a run directory with complete checkpoints under checkpoints/")
    return sorted(found, key=lambda p: (str(p.parent), step_of(p)))


def builtin_task_names(cfg: EvalConfig) -> list[str]:
    """The built-in tasks to run: those eval.tasks names; all of them when neither tasks nor task
    files are named (a user who names only task files means those files)."""
    unknown = [t for t in cfg.tasks if t not in BUILTIN_TASK_NAMES]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task(s) {unknown}; built-in tasks are {list(BUILTIN_TASK_NAMES)} "
                          "(a task file goes in eval.task_files)")
    if cfg.tasks or cfg.task_files:
        return list(cfg.tasks)
    return list(BUILTIN_TASK_NAMES)


def prepare_task(name: str, source: str, items: list, base_dir: Path, cfg: EvalConfig) -> Task:
    """The items to score (the max_items sample of those not marked "fewshot"), each with its
    few-shot examples and unit line in its question (scifm.eval.prompts)."""
    pool = [i for i in items if i.fewshot]
    if cfg.num_fewshot > len(pool):
        raise ConfigError(f"eval.num_fewshot={cfg.num_fewshot}: task {name} marks only {len(pool)} item(s) "
                          '"fewshot": true')
    scored = [i for i in items if not i.fewshot]
    if cfg.max_items:
        scored = sample_over_skills(scored, cfg.max_items, cfg.seed)
    examples = {i.id: draw_examples(i, pool, cfg.num_fewshot, cfg.seed) for i in scored}
    return Task(name, source, [with_examples(i, examples[i.id]) for i in scored], base_dir,
                {k: [ex.id for ex in v] for k, v in examples.items()} if cfg.num_fewshot else {})


def load_tasks(cfg: EvalConfig) -> list[Task]:
    tasks: list[Task] = []
    builtin = builtin_task_names(cfg)
    if builtin:
        tasks_dir = default_tasks_dir()
        build_builtin_tasks(tasks_dir)
        tasks += [prepare_task(t, "builtin", load_task_file(tasks_dir / f"{t}.jsonl"), tasks_dir, cfg)
                  for t in builtin]
    for file in cfg.task_files:
        path = Path(file)
        tasks.append(prepare_task(path.name.removesuffix(".gz").removesuffix(".jsonl"), str(path),
                                  load_task_file(path), path.parent, cfg))
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"eval.task_files: task name(s) {repeated} appear twice; rename the file(s)")
    return tasks


def items_that_fit(task: Task, tokenizer, enc_cfg, seq_len: int) -> tuple[list, dict[str, dict]]:
    """The items this model can take, and the others by reason with their count, every id and one
    example message: an item whose molecule, protein or table exceeds the model's encoder, or whose
    prompt with its longest answer exceeds the sequence length, is reported as skipped rather than
    stopping the evaluation."""
    usable, skipped = [], {}
    for item in task.items:
        try:
            doc = encode_document(Document(item.id, "eval", item.skill, item.question), tokenizer, enc_cfg,
                                  task.base_dir)
            longest = max(len(tokenizer.encode_text(c)) for c in item.choices) \
                if isinstance(item, MultipleChoiceItem) else 1
            # the model reads the question (without its [EOS]) and all but the last answer token
            check_fits(len(doc.ids) - 1 + longest - 1, seq_len, "a question with its longest answer")
        except DataError as err:
            reason = err.reason if isinstance(err, DocumentFormatError) else "unreadable"
            entry = skipped.setdefault(reason, {"count": 0, "ids": [], "example": f"{item.id}: {err}"})
            entry["count"] += 1
            entry["ids"].append(item.id)
            continue
        usable.append(item)
    return usable, skipped


def output_dir(ckpt: Path, out: str) -> Path:
    if out:
        return Path(out) / ckpt.name
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval" / ckpt.name
    return ckpt / "eval"


def evaluate_checkpoint(ckpt: Path, tasks: list[Task], cfg: EvalConfig, device: torch.device) -> dict:
    t0 = time.perf_counter()
    model, tokenizer, run_cfg = load_checkpoint_model(ckpt)
    model.to(device)
    total, active = count_params(model, run_cfg.model)
    common = dict(seq_len=run_cfg.data.seq_len, batch_size=cfg.batch_size)
    results: dict = {
        "checkpoint": str(ckpt.resolve()),
        "run": str(ckpt.resolve().parent.parent) if ckpt.parent.name == "checkpoints" else str(ckpt.resolve()),
        "step": step_of(ckpt),
        "model": {"name": run_cfg.model.name, "total_params": total, "active_params": active},
        "device": str(device),
        "tasks": {},
    }
    samples: dict[str, list[dict]] = {}
    with autocast_for("auto", device):
        for task in tasks:
            usable, skipped = items_that_fit(task, tokenizer, run_cfg.model.encoders, run_cfg.data.seq_len)
            if not usable:
                reason, first = next(iter(skipped.items()))
                raise DataError(f"task {task.name}: no item fits this model ({reason}, e.g. {first['example']})")
            progress = Progress(f"eval {ckpt.name} | {task.name}", len(usable))
            mc = [i for i in usable if isinstance(i, MultipleChoiceItem)]
            sa = [i for i in usable if isinstance(i, ShortAnswerItem)]
            entry: dict = {"source": task.source, "n_items": len(task.items), "skipped": skipped}
            if mc:
                entry["multiple_choice"] = evaluate_multiple_choice(
                    model, tokenizer, run_cfg.model.encoders, mc, base_dir=task.base_dir, progress=progress, **common)
            if sa:
                entry["short_answer"] = evaluate_short_answer(
                    model, tokenizer, run_cfg.model.encoders, sa, base_dir=task.base_dir,
                    max_new_tokens=cfg.max_new_tokens, progress=progress, **common)
            for kind in ("multiple_choice", "short_answer"):
                if kind in entry:
                    samples.setdefault(task.name, []).extend(
                        s | {"type": kind} | ({"fewshot": task.fewshot[s["id"]]} if task.fewshot else {})
                        for s in entry[kind].pop("samples"))
            entry["seconds"] = progress.finish()
            results["tasks"][task.name] = entry
    results["wall_seconds"] = time.perf_counter() - t0
    return results | {"samples": samples}


def write_results(results: dict, out_dir: Path) -> Path:
    """results.json, report.md and samples/<task>.jsonl, each written whole then renamed into place."""
    samples = results.pop("samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, rows in samples.items():
        _write_atomic(out_dir / "samples" / f"{task}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write_atomic(out_dir / "report.md", render_report(results))
    _write_atomic(out_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    return out_dir / RESULTS_FILE


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_eval(cfg: EvalRunConfig) -> list[Path]:
    """Evaluates every checkpoint; returns the results.json paths."""
    cfg.eval.validate()
    checkpoints = resolve_checkpoints(cfg.checkpoint)
    tasks = load_tasks(cfg.eval)
    device = pick_device(cfg.eval.device, "eval.device")
    written = []
    for ckpt in checkpoints:
        with marked_in_use(ckpt):  # checkpoint retention leaves it alone meanwhile
            results = evaluate_checkpoint(ckpt, tasks, cfg.eval, device)
        path = write_results(results, output_dir(ckpt, cfg.eval.out))
        print_summary(results, path)
        written.append(path)
    return written
