"""`scifm eval`: results.json / report.md / samples per checkpoint, few-shot prompts as lm-eval lays
them out, compare plots, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
from lm_eval.api.task import ConfigurableTask

import scifm.eval.multiple_choice
from scifm.core.checkpoint_files import file_sizes
from scifm.eval.compare import compare
from scifm.eval.config import EvalConfig, EvalRunConfig, compose_eval_config
from scifm.eval.multiple_choice import evaluate_multiple_choice
from scifm.eval.runner import run_eval
from scifm.eval.tasks import load_task_file
from scifm.train.export import load_checkpoint_model
from scifm.train.trainer import train
from tests.test_train import run_cli

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_task_file(path: Path) -> Path:
    mol = [{"type": "text", "text": "The topological polar surface area of "},
           {"type": "molecule", "smiles": ASPIRIN}, {"type": "text", "text": " is"}]
    rows = [
        {"id": "m1", "skill": "mol.tpsa", "type": "multiple_choice", "question": mol,
         "choices": [" 63.6", " 12.0", " 40.5"], "answer": 0},
        {"id": "m2", "skill": "bio.codon", "type": "multiple_choice", "question": "The codon AUG codes for",
         "choices": [" methionine", " glycine"], "answer": 0},
        {"id": "m3", "skill": "bio.codon", "type": "multiple_choice", "question": "The codon UGG codes for",
         "choices": [" serine", " tryptophan", " leucine", " valine"], "answer": 1},
        {"id": "s1", "skill": "mol.tpsa", "type": "short_answer", "question": mol, "answer": 63.6,
         "rel_tol": 0.01, "unit": "Å²"},
        {"id": "s2", "skill": "bio.codon", "type": "short_answer", "question": "The codon AUG codes for",
         "answer": "methionine"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def small_run(make_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval_run")
    train(make_config("trainer.max_steps=2", "trainer.ckpt_every=1", "trainer.val_every=100",
                      "data.val_batches=1"), run_dir)
    return run_dir


def test_eval_writes_results_report_and_samples_for_every_checkpoint(small_run, tmp_path, capsys):
    tasks = write_task_file(tmp_path / "mine.jsonl")
    written = run_eval(EvalRunConfig(str(small_run), EvalConfig(task_files=[str(tasks)], max_new_tokens=4)))
    assert written == [small_run / "eval" / f"step_{s}" / "results.json" for s in (1, 2)]
    results = json.loads(written[-1].read_text())
    assert results["step"] == 2 and results["model"]["name"] == "tiny"
    mine = results["tasks"]["mine"]
    assert mine["n_items"] == 5
    mc, sa = mine["multiple_choice"], mine["short_answer"]
    assert mc["scores"]["acc"]["n"] == 3 and sa["scores"]["acc"]["n"] == 2
    assert mc["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert set(mc["by_skill"]) == {"mol.tpsa", "bio.codon"} and mc["by_skill"]["bio.codon"]["n"] == 2
    # the scores are the model's: the same evaluation by hand on the loaded checkpoint agrees
    model, tokenizer, cfg = load_checkpoint_model(small_run / "checkpoints" / "step_2")
    items = [i for i in load_task_file(tasks) if i.id.startswith("m")]
    direct = evaluate_multiple_choice(model, tokenizer, cfg.model.encoders, items, seq_len=cfg.data.seq_len)
    assert mc["scores"] == direct["scores"]
    samples = [json.loads(x) for x in (written[-1].parent / "samples" / "mine.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == ["m1", "m2", "m3", "s1", "s2"]
    assert [s["predicted"] for s in samples[:3]] == [d["predicted"] for d in direct["samples"]]
    assert samples[3]["unit"] == "Å²" and "unit" not in samples[4]
    report = (written[-1].parent / "report.md").read_text()
    acc = mc["scores"]["acc"]
    assert f"| mine | 3 | {acc['value']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]" in report
    assert "| mine | short answer | bio.codon | 1 |" in report
    printed = capsys.readouterr().out
    assert f"acc {acc['value']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]" in printed

    written_plots = compare([small_run], tmp_path / "cmp")
    for png in ("score_vs_step.png", "score_vs_size.png"):
        assert (tmp_path / "cmp" / png).read_bytes()[:8] == PNG_MAGIC
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count(f"| {small_run.name} | 1 |") == 2 and table.count(f"| {small_run.name} | 2 |") == 2
    assert tmp_path / "cmp" / "compare.md" in written_plots


def mmlu_question(stem: str, options: list[str]) -> str:
    return stem + "\n" + "".join(f"{letter}. {o}\n" for letter, o in zip("ABCD", options)) + "Answer:"


MMLU_DEV = {  # marked "fewshot": examples only
    "dev1": (mmlu_question("Which element has atomic number 6?", ["Carbon", "Oxygen", "Iron", "Neon"]), 0),
    "dev2": (mmlu_question("What is the SI unit of force?", ["Joule", "Watt", "Newton", "Pascal"]), 2),
    "dev3": (mmlu_question("Which base pairs with adenine in DNA?", ["Cytosine", "Guanine", "Uracil", "Thymine"]), 3),
}
MMLU_TEST = {
    "t1": (mmlu_question("The codon AUG codes for", ["glycine", "methionine", "a stop", "serine"]), 1),
    "t2": (mmlu_question("Water boils at sea level at", ["100 C", "0 C", "50 C", "200 C"]), 0),
    "t3": (mmlu_question("Which gas do plants take in?", ["Oxygen", "Helium", "Carbon dioxide", "Argon"]), 2),
}


def mmlu_row(item_id: str, question: str, answer: int, **fields) -> dict:
    return {"id": item_id, "skill": "mmlu", "type": "multiple_choice", "question": question,
            "choices": [" A", " B", " C", " D"], "answer": answer} | fields


def lm_eval_requests(examples: list[tuple[str, int]], item: tuple[str, int]) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval builds for an MMLU-shaped item after these examples
    in this order (its first_n sampler; default target and few-shot delimiters)."""
    dataset = datasets.DatasetDict({
        "dev": datasets.Dataset.from_list([{"question": q, "answer": a} for q, a in examples]),
        "test": datasets.Dataset.from_list([{"question": item[0], "answer": item[1]}])})
    task = ConfigurableTask(config={
        "task": "scifm_mmlu_shape", "custom_dataset": lambda **_: dataset, "test_split": "test",
        "fewshot_split": "dev", "num_fewshot": len(examples), "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
    (doc,) = task.test_docs()
    return [r.args for r in task.construct_requests(doc, task.fewshot_context(doc, num_fewshot=len(examples)))]


def test_mmlu_shaped_few_shot_prompts_hold_the_examples_and_score_only_unmarked_items(small_run, tmp_path,
                                                                                      monkeypatch):
    rows = [mmlu_row(i, q, a, fewshot=True) for i, (q, a) in MMLU_DEV.items()]
    rows += [mmlu_row(i, q, a) for i, (q, a) in MMLU_TEST.items()]
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: list[tuple[str, str]] = []  # (context, continuation) of every request the model scores
    real = scifm.eval.multiple_choice.score_continuations

    def recording(model, tokenizer, enc_cfg, requests, **kw):
        seen.extend(("".join(seg["text"] for seg in r.context), r.continuation) for r in requests)
        return real(model, tokenizer, enc_cfg, requests, **kw)

    monkeypatch.setattr(scifm.eval.multiple_choice, "score_continuations", recording)
    cfg = EvalConfig(task_files=[str(path)], num_fewshot=2, out=str(tmp_path / "out"))
    (written,) = run_eval(EvalRunConfig(str(small_run / "checkpoints" / "step_2"), cfg))
    results = json.loads(written.read_text())["tasks"]["mmlu"]
    assert results["n_items"] == 3 and results["multiple_choice"]["scores"]["acc"]["n"] == 3
    samples = [json.loads(x) for x in (written.parent / "samples" / "mmlu.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == list(MMLU_TEST)  # the marked items are examples, never scored
    assert len(seen) == 3 * 4
    for s in samples:
        assert len(s["fewshot"]) == 2 and set(s["fewshot"]) <= set(MMLU_DEV)
        examples = [MMLU_DEV[e] for e in s["fewshot"]]
        want = lm_eval_requests(examples, MMLU_TEST[s["id"]])
        assert [r for r in seen if r[0].endswith(MMLU_TEST[s["id"]][0])] == want
        context = want[0][0]  # the examples with their answers, then the item
        for q, a in examples:
            assert f"{q} {'ABCD'[a]}\n\n" in context
    assert len({tuple(s["fewshot"]) for s in samples}) > 1  # drawn per item, not one fixed pair


def fake_results(run: str, step: int, active: int, skills: dict[str, tuple[float, float, float]]) -> dict:
    """A results.json with one multiple-choice task whose skills have (value, low, high)."""
    score = lambda v, lo, hi: {"value": v, "ci95": [lo, hi], "n": 100}  # noqa: E731
    task = {"scores": {"acc": score(0.5, 0.4, 0.6)}, "by_skill": {k: score(*v) for k, v in skills.items()},
            "chance": 0.25}
    return {"checkpoint": f"{run}/checkpoints/step_{step}", "run": run, "step": step,
            "model": {"name": "m", "total_params": active * 2, "active_params": active}, "device": "cpu",
            "tasks": {"qa": {"source": "builtin", "n_items": 100, "multiple_choice": task}}}


def test_compare_lists_a_skill_that_falls_with_training_or_scale_beyond_its_intervals(tmp_path):
    runs = {
        # "math" falls from step 100 to 200 beyond the intervals; "chem" wobbles within them
        "small": [(100, {"math": (0.8, 0.7, 0.9), "chem": (0.5, 0.4, 0.6)}),
                  (200, {"math": (0.3, 0.2, 0.4), "chem": (0.45, 0.35, 0.55)})],
        # at 10x the size "chem" is worse than the small run's last point beyond the intervals
        "big": [(200, {"math": (0.35, 0.25, 0.45), "chem": (0.1, 0.05, 0.2)})],
        # as big as "small": its lower "math" is another run of that size, not a larger model
        "twin": [(200, {"math": (0.05, 0.01, 0.1), "chem": (0.5, 0.4, 0.6)})],
    }
    for name, pts in runs.items():
        for step, skills in pts:
            d = tmp_path / name / "eval" / f"step_{step}"
            d.mkdir(parents=True)
            active = 10_000_000 if name == "big" else 1_000_000
            (d / "results.json").write_text(json.dumps(fake_results(str(tmp_path / name), step, active, skills)))
    compare([tmp_path / "small", tmp_path / "big", tmp_path / "twin"], tmp_path / "cmp")
    falling = (tmp_path / "cmp" / "compare.md").read_text().split("## Falling lines")[1]
    assert "with training: small / qa / math" in falling
    assert "with scale: qa / chem" in falling
    assert "small / qa / chem" not in falling and "with scale: qa / math" not in falling


def test_config_composes_with_overrides_and_requires_a_checkpoint():
    cfg = compose_eval_config(["checkpoint=runs/x", "eval.tasks=[tpsa]", "eval.max_items=7"])
    assert cfg.checkpoint == "runs/x" and cfg.eval.tasks == ["tpsa"] and cfg.eval.max_items == 7


def one_line_error(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("scifm: error: "), out.stderr[-2000:]
    return lines[0]


def test_missing_checkpoint_malformed_task_file_and_foreign_config_are_one_line_errors(small_run, tmp_path):
    line = one_line_error(run_cli("eval", f"checkpoint={tmp_path}/nope", cwd=tmp_path))
    assert f"{tmp_path}/nope" in line and "no such checkpoint" in line
    line = one_line_error(run_cli("eval", f"checkpoint={tmp_path}/nope*/step_*", cwd=tmp_path))
    assert "matches no complete checkpoint" in line
    line = one_line_error(run_cli("eval", cwd=tmp_path))
    assert "checkpoint: required" in line

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "skill": "s", "type": "multiple_choice", "question": "q?",
                               "choices": [" x", " y"], "answer": 0}) + "\n"
                   + json.dumps({"id": "b", "skill": "s", "type": "multiple_choice", "question": "q?",
                                 "choices": [" x", " y"], "answer": 5}) + "\n")
    ckpt = small_run / "checkpoints" / "step_2"
    line = one_line_error(run_cli("eval", f"checkpoint={ckpt}", f"eval.task_files=[{bad}]", cwd=tmp_path))
    assert f"{bad}:2: field 'answer'" in line

    # a checkpoint whose config says another model than its weights hold
    foreign = tmp_path / "foreign"
    shutil.copytree(ckpt, foreign)
    cfg_text = (foreign / "config.yaml").read_text()
    (foreign / "config.yaml").write_text(cfg_text.replace("d_model: 128", "d_model: 96", 1))
    meta = json.loads((foreign / "meta.json").read_text())  # the manifest agrees: only the config lies
    (foreign / "meta.json").write_text(json.dumps(meta | {"files": file_sizes(foreign)}))
    assert (foreign / "config.yaml").read_text() != cfg_text
    good = write_task_file(tmp_path / "good.jsonl")
    line = one_line_error(run_cli("eval", f"checkpoint={foreign}", f"eval.task_files=[{good}]", cwd=tmp_path))
    assert "belongs to another model config" in line

    line = one_line_error(run_cli("eval", f"checkpoint={ckpt}", "eval.tasks=[nope]", cwd=tmp_path))
    assert "eval.tasks" in line and "tpsa" in line
