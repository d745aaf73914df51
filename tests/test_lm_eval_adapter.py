"""lm-evaluation-harness adapter: lm_eval's own command line on a scifm checkpoint, offline, over local
task YAMLs (tests/data/lm_eval), and every number equal to what scifm computes directly; requests
longer than max_length cut from the left as lm-eval's hf model cuts them; one-line errors."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model, model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from scifm.eval.generate import cut_at_stop, generate_greedy
from scifm.eval.lm_eval_adapter import ScifmLM, ScifmLMError
from scifm.eval.loglikelihood import Request, score_continuations
from scifm.train.export import load_checkpoint_model
from scifm.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = "tests/data/lm_eval"  # relative to REPO: the task YAMLs' data_files are
TASKS = ("scifm_mc", "scifm_rolling", "scifm_gen")
MAX_LENGTH = 64  # below the run's data.seq_len, so the long perplexity document takes several windows
GEN_KWARGS = yaml.safe_load((REPO / TASK_DIR / "scifm_gen.yaml").read_text())["generation_kwargs"]


def text(s: str) -> list[dict]:
    return [{"type": "text", "text": s}]


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (REPO / TASK_DIR / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(make_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lm_eval_run")
    train(make_config("trainer.max_steps=2", "trainer.ckpt_every=2", "trainer.log_every=1", "trainer.val_every=100",
                      "data.val_batches=1", "trainer.batch_size=4"), run_dir)
    return run_dir / "checkpoints" / "step_2"


@pytest.fixture(scope="module")
def direct(checkpoint):
    model, tokenizer, cfg = load_checkpoint_model(checkpoint)
    return model, tokenizer, cfg.model.encoders


@pytest.fixture(scope="module")
def harness(checkpoint, tmp_path_factory) -> tuple[dict, dict[str, list[dict]]]:
    """One `lm_eval` command-line run of the three tasks: (results, samples per task by doc_id)."""
    out = tmp_path_factory.mktemp("lm_eval_out")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(out / "hf"),
               HF_DATASETS_CACHE=str(out / "hf" / "datasets"))
    cmd = [sys.executable, "-m", "scifm.eval.lm_eval_adapter", "--model", "scifm",
           # batch_size in model_args wins over lm-eval's --batch_size (1 when unset)
           "--model_args", f"checkpoint={checkpoint},max_length={MAX_LENGTH},batch_size=4", "--device", "cpu",
           "--tasks", ",".join(TASKS), "--include_path", TASK_DIR, "--output_path", str(out / "results"),
           "--log_samples"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = (out / "results").glob("*/results_*.json")
    samples = {}
    for task in TASKS:
        (f,) = results_file.parent.glob(f"samples_{task}_*.jsonl")
        samples[task] = sorted(map(json.loads, f.read_text().splitlines()), key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text())["results"], samples


def window_logprob(model, ctx: list[int], pred: list[int]) -> float:
    """By hand: one plain forward over ctx + pred (positions from 0), the log-probabilities of pred."""
    ids = torch.tensor([ctx + pred])
    n = ids.shape[1] - 1
    with torch.no_grad():
        logits = model(ids[:, :-1], torch.arange(n)[None], torch.zeros(1, n, dtype=torch.long), {}, {})
    logp = torch.log_softmax(logits[0].float(), -1)
    return float(logp[torch.arange(len(ctx) - 1, n), torch.tensor(pred)].sum())


def cut_like_hf(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's hf model feeds them: the last max_length + 1 ids
    of [BOS] + context + continuation."""
    cont = tokenizer.encode_text(continuation)
    ids = ([tokenizer.bos_id] + tokenizer.encode_text(context) + cont)[-(max_length + 1):]
    return ids[: -len(cont)], cont


def test_multiple_choice_acc_is_the_argmax_of_scifm_scores(harness, direct):
    results, samples = harness
    model, tokenizer, enc = direct
    items = read_jsonl("mc.jsonl")
    assert len(samples["scifm_mc"]) == len(items)
    correct, n_cut = [], 0
    for item, sample in zip(items, samples["scifm_mc"]):
        conts = [" " + c for c in item["choices"]]  # lm-eval's target_delimiter " " precedes each choice
        got = [float(r[0][0]) for r in sample["resps"]]
        if len(tokenizer.encode_text(item["question"])) + 1 + max(len(tokenizer.encode_text(c)) for c in conts) \
                > MAX_LENGTH + 1:  # too long: cut from the left, scored by hand
            n_cut += 1
            want = [window_logprob(model, *cut_like_hf(tokenizer, item["question"], c, MAX_LENGTH)) for c in conts]
        else:
            scored = score_continuations(model, tokenizer, enc, [Request(text(item["question"]), c) for c in conts],
                                         seq_len=MAX_LENGTH)
            assert [r[0][1] for r in sample["resps"]] == [str(w.greedy) for w in scored]
            want = [w.logprob for w in scored]
        assert got == pytest.approx(want, abs=1e-4), item
        best = max(range(len(want)), key=lambda k: want[k])
        correct.append(float(best == item["answer"]))
        assert sample["acc"] == correct[-1]
    assert n_cut == 1  # the last document is longer than max_length and still scored
    assert results["scifm_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_rolling_loglikelihood_is_the_sum_over_windows_of_every_token(harness, direct):
    results, samples = harness
    model, tokenizer, enc = direct
    docs = [d["text"] for d in read_jsonl("rolling.jsonl")]
    total_ll, total_words, n_windows = 0.0, 0, []
    for doc, sample in zip(docs, samples["scifm_rolling"]):
        tokens = tokenizer.encode_text(doc)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, tokenizer.bos_id, MAX_LENGTH, 1)]
        assert [t for _, pred in windows for t in pred] == tokens  # every token predicted exactly once
        n_windows.append(len(windows))
        want = sum(window_logprob(model, ctx, pred) for ctx, pred in windows)
        got = float(sample["resps"][0][0])
        assert got == pytest.approx(want, rel=1e-5, abs=1e-3), doc[:40]
        if len(windows) == 1:  # fits: the whole string as the continuation of the empty context ([BOS])
            (one,) = score_continuations(model, tokenizer, enc, [Request([], doc)], seq_len=MAX_LENGTH)
            assert got == pytest.approx(one.logprob, abs=1e-4)
        total_ll += got
        total_words += len(re.split(r"\s+", doc))
    assert n_windows[0] == 1 and n_windows[1] >= 3, n_windows
    assert results["scifm_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_words),
                                                                              rel=1e-6)


def test_generate_until_is_generate_greedy_with_the_tasks_until_and_max_gen_toks(harness, direct):
    _, samples = harness
    model, tokenizer, enc = direct
    contexts = [text(d["question"]) for d in read_jsonl("gen.jsonl")]
    want = generate_greedy(model, tokenizer, enc, contexts, max_new_tokens=GEN_KWARGS["max_gen_toks"],
                           seq_len=MAX_LENGTH, stop=tuple(GEN_KWARGS["until"]))
    got = [s["resps"][0][0] for s in samples["scifm_gen"]]
    assert got == want and any(want)
    # the task's until / max_gen_toks reached generation: without them the text is different
    unbounded = generate_greedy(model, tokenizer, enc, contexts, max_new_tokens=48, seq_len=MAX_LENGTH, stop=())
    assert unbounded != want


def test_empty_context_sampling_refused_and_model_args(checkpoint, direct):
    model, tokenizer, enc = direct
    lm = ScifmLM.create_from_arg_string(f"checkpoint={checkpoint},batch_size=3",
                                        {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    assert lm.batch_size == 3 and lm.device.type == "cpu" and lm.seq_len == 256  # the run's data.seq_len

    def inst(kind: str, args: tuple) -> Instance:
        return Instance(kind, {}, args, 0)

    # an empty context is [BOS] alone, as lm-eval sends it (e.g. unconditional scores)
    (got,) = lm.loglikelihood([inst("loglikelihood", ("", " water boils"))])
    bos = [tokenizer.bos_id]
    assert got[0] == pytest.approx(window_logprob(model, bos, tokenizer.encode_text(" water boils")), abs=1e-4)
    assert lm.loglikelihood([inst("loglikelihood", ("Water", ""))]) == [(0.0, True)]
    assert lm.loglikelihood_rolling([inst("loglikelihood_rolling", ("",))]) == [0.0]

    with pytest.raises(ValueError, match="only greedy"):
        lm.generate_until([inst("generate_until", ("Water boils at", {"do_sample": True, "temperature": 0.7}))])
    with pytest.raises(ValueError, match="only greedy"):
        lm.generate_until([inst("generate_until", ("Water boils at", {"temperature": 0.5}))])
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([inst("generate_until", ("Water boils at", {"num_beams": 4}))])
    # temperature 0 is greedy whatever do_sample says; the empty context generates from [BOS]
    greedy = lm.generate_until([inst("generate_until", ("", {"until": "\n", "max_gen_toks": 5, "do_sample": True,
                                                             "temperature": 0.0}))])
    assert greedy == generate_greedy(model, tokenizer, enc, [[]], max_new_tokens=5, seq_len=256, stop=("\n",))
    # `until` cuts the text: a stop string taken from the free-running text itself
    (free,) = lm.generate_until([inst("generate_until", ("Water boils at", {"until": [], "max_gen_toks": 8}))])
    stop = free[len(free) // 2 :][:2]
    assert stop and lm.generate_until([inst("generate_until", ("Water boils at", {"until": [stop], "max_gen_toks": 8}))]) \
        == [free[: free.find(stop)]]
    with pytest.raises(ValueError, match="unknown model_args"):
        ScifmLM(checkpoint=str(checkpoint), pretrained="gpt2")
    with pytest.raises(ScifmLMError, match="model_args batch_size must be an integer >= 1, got 'many'"):
        ScifmLM(checkpoint=str(checkpoint), batch_size="many")


LONG_CONTEXT = "Water boils at one hundred degrees Celsius at sea level. " * 8 + "Water boils at"


def doc_request(kind: str, args: tuple, doc_id: int) -> Instance:
    return Instance(kind, {}, args, doc_id, metadata=("scifm_long", doc_id, 1))


def test_a_loglikelihood_request_longer_than_max_length_is_cut_from_the_left_like_hf(checkpoint, direct):
    model, tokenizer, _ = direct
    lm = ScifmLM(checkpoint=str(checkpoint), max_length=24, batch_size=2)
    conts = [" one hundred degrees", " ten"]
    assert len(tokenizer.encode_text(LONG_CONTEXT)) > 3 * 24
    got = lm.loglikelihood([doc_request("loglikelihood", (LONG_CONTEXT, c), 0) for c in conts])
    for (logprob, _), cont in zip(got, conts):
        ctx, pred = cut_like_hf(tokenizer, LONG_CONTEXT, cont, 24)
        assert len(ctx) + len(pred) == 25 and ctx[0] != tokenizer.bos_id  # cut: no [BOS] left
        assert logprob == pytest.approx(window_logprob(model, ctx, pred), abs=1e-4)
    # a continuation that alone exceeds max_length cannot be kept whole: an error naming the document
    with pytest.raises(ScifmLMError, match="task scifm_long doc 7: the continuation of .* exceeds max_length=24"):
        lm.loglikelihood([doc_request("loglikelihood", ("Water", " " + LONG_CONTEXT), 7)])


def greedy_by_hand(model, tokenizer, prompt: list[int], max_new: int, stop: tuple[str, ...]) -> str:
    """Greedy decoding by plain forwards over the whole sequence (positions from 0)."""
    ids, new = list(prompt), []
    for _ in range(max_new):
        n = len(ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.arange(n)[None], torch.zeros(1, n, dtype=torch.long), {}, {})
        tok = int(logits[0, -1, : tokenizer.vocab_size].argmax())
        if tok == tokenizer.eos_id:
            break
        new.append(tok)
        ids.append(tok)
        if any(s in tokenizer.decode(new) for s in stop):
            break
    return cut_at_stop(tokenizer.decode(new), stop)


def test_a_generation_prompt_is_cut_from_the_left_to_leave_max_gen_toks(checkpoint, direct):
    model, tokenizer, _ = direct
    lm = ScifmLM(checkpoint=str(checkpoint), max_length=24)
    (got,) = lm.generate_until([doc_request("generate_until", (LONG_CONTEXT, {"until": ["\n"], "max_gen_toks": 6}), 0)])
    prompt = ([tokenizer.bos_id] + tokenizer.encode_text(LONG_CONTEXT))[-(24 - 6):]
    assert got == greedy_by_hand(model, tokenizer, prompt, 6, ("\n",))
    with pytest.raises(ScifmLMError, match="task scifm_long doc 3: max_gen_toks=24 leaves no room"):
        lm.generate_until([doc_request("generate_until", ("Water", {"max_gen_toks": 24}), 3)])


def test_a_missing_checkpoint_is_one_line_without_a_traceback(tmp_path):
    cmd = [sys.executable, "-m", "scifm.eval.lm_eval_adapter", "--model", "scifm", "--model_args",
           f"checkpoint={tmp_path}/nope", "--tasks", "scifm_mc", "--include_path", TASK_DIR]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("scifm: error: ") and f"{tmp_path}/nope" in errors[0], errors


def test_scifm_is_registered_and_declared_as_an_lm_eval_entry_point():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["lm_eval.models"]["scifm"]
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is ScifmLM is get_model("scifm")
    assert project["scripts"]["scifm-lm-eval"] == "scifm.eval.lm_eval_adapter:main"
    assert "hf" in model_registry and "dummy" in model_registry  # the built-in models stay resolvable
