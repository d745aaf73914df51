"""Faulty data (issue 10): bad records counted in their own split, damaged files and bytes, skill
balancing with empty splits, unbalanced LaTeX environments, and resuming after a file changed."""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from scifm.core.errors import BadFractionExceeded, DataError, DocumentFormatError
from scifm.data.documents import SPLITS, Document, split_of
from scifm.data.features.latex import featurize_latex
from scifm.data.mixture import stream_probabilities
from scifm.data.streams import DocumentStream, SourceSpec, skill_counts
from scifm.data.config import DataConfig
from scifm.data.tokenizer_training import _train_documents, train_tokenizer
from scifm.eval.tasks import TaskFormatError, load_task_file
from tests.test_data_pipeline import batches_equal, make_loader, text_doc, user_config

RAGGED = {"type": "table", "columns": ["a", "b"], "rows": [["1"]]}


def ragged_doc(i: int, skill: str = "prose") -> dict:
    return text_doc(i, skill) | {"segments": [RAGGED]}


def corpus_with_bad_every(n: int, every: int) -> list[str]:
    """n lines where every `every`-th document *of each split* is a ragged table (counted by its id's
    split), plus one unparseable line per 300 (counted by the hash of the line): an even bad share."""
    lines, per_split = [], Counter()
    for i in range(n):
        split = split_of(f"user-{i}")
        per_split[split] += 1
        lines.append(json.dumps(ragged_doc(i) if per_split[split] % every == 0 else text_doc(i)))
    for k in range(0, n, 300):
        lines[k] = "{not json %d" % k
    return lines


def train_ids(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if split_of(doc["id"]) == "train" and doc["segments"][0]["type"] == "text":
            out.append(doc["id"])
    return out


def one_epoch(stream: DocumentStream) -> list:
    out = []
    while stream.cursor[0] == 0:
        (epoch, _, _), doc, where = stream.next()
        if epoch == 0:
            out.append((doc, where))
    return out


# --- 3: a bad record counts against its own split --------------------------------------------

def test_three_percent_bad_records_pass_the_budget_in_every_split(tmp_path, tokenizer, make_config):
    (tmp_path / "u.jsonl").write_text("\n".join(corpus_with_bad_every(3000, 33)) + "\n")
    cfg = user_config(make_config, f"[{{path:{tmp_path / 'u.jsonl'}}}]")
    for split in ("train", "validation"):
        loader = make_loader(cfg, tokenizer, split=split, batch_size=8)
        for _ in range(6):
            loader.next_batch()
        counts = loader.skips.as_dict()["u"]
        assert counts["seen"] >= 100 and counts["skipped"].get("bad_table", 0) >= 1
        assert sum(counts["skipped"].values()) / counts["seen"] < 0.05


def test_thirty_percent_bad_records_stop_naming_the_split_and_source(tmp_path, tokenizer, make_config):
    (tmp_path / "u.jsonl").write_text("\n".join(corpus_with_bad_every(3000, 3)) + "\n")
    cfg = user_config(make_config, f"[{{path:{tmp_path / 'u.jsonl'}}}]")
    loader = make_loader(cfg, tokenizer, split="validation", batch_size=8)
    with pytest.raises(BadFractionExceeded, match=r"source 'u' \(validation split\).*bad_table") as err:
        for _ in range(20):
            loader.next_batch()
    assert "\n" not in str(err.value)
    example = str(err.value).split("e.g. document '")[1].split("'")[0]
    line = (tmp_path / "u.jsonl").read_text().splitlines()[int(example.rsplit(":", 1)[1]) - 1]
    assert split_of(json.loads(line)["id"]) == "validation"


def test_every_bad_record_is_counted_by_exactly_one_split_and_skill_stream(tmp_path):
    lines = []
    for i in range(600):
        doc = text_doc(i, skill="rare" if i % 10 == 0 else "common")
        lines.append(json.dumps(ragged_doc(i, doc["skill"]) if i % 7 == 0 else doc))
    lines[3] = "{not json"
    lines[11] = json.dumps({"id": "no-skill", "segments": []})
    (tmp_path / "u.jsonl").write_text("\n".join(lines) + "\n")
    spec = SourceSpec("u", (tmp_path / "u.jsonl",), 1.0)
    counted = Counter()
    for split in SPLITS:
        skills = skill_counts(spec, split)
        for skill in skills:
            errors = [w for d, w in one_epoch(DocumentStream(spec, split, skill, skills)) if isinstance(d, Exception)]
            counted.update(errors)
    bad_lines = {f"{tmp_path / 'u.jsonl'}:{i + 1}" for i in range(600) if i % 7 == 0 or i in (3, 11)}
    assert set(counted) == bad_lines and set(counted.values()) == {1}


# --- 4: damaged bytes and damaged files ------------------------------------------------------

def write_truncated_gz(path: Path, lines: list[str], cut: int) -> list[str]:
    """Gzips `lines`, cuts `cut` bytes off the end; returns the lines still whole in what is left."""
    data = gzip.compress(("\n".join(lines) + "\n").encode())[:-cut]
    path.write_bytes(data)
    readable = zlib.decompressobj(wbits=31).decompress(data)
    return [x.decode() for x in readable.split(b"\n")[:-1]]


def test_truncated_gzip_keeps_its_good_lines_and_counts_one_skip(tmp_path, tokenizer, make_config, capsys):
    lines = [json.dumps(text_doc(i)) for i in range(800)]
    good = write_truncated_gz(tmp_path / "u.jsonl.gz", lines, cut=300)
    assert 100 < len(good) < 800
    spec = SourceSpec("u", (tmp_path / "u.jsonl.gz",), 1.0)
    seen = one_epoch(DocumentStream(spec, "train"))
    docs = [d.id for d, _ in seen if isinstance(d, Document)]
    errors = [(d.reason, w) for d, w in seen if isinstance(d, DocumentFormatError)]
    assert docs == train_ids(good)
    assert errors == [("truncated_file", f"{tmp_path / 'u.jsonl.gz'}:{len(good) + 1}")]
    report = capsys.readouterr().err.strip().splitlines()
    assert len(report) == 1 and "u.jsonl.gz" in report[0] and f"after line {len(good)}" in report[0]

    loader = make_loader(user_config(make_config, f"[{{path:{tmp_path / 'u.jsonl.gz'}}}]"), tokenizer, batch_size=8)
    for _ in range(30):  # to the end of the first epoch
        loader.next_batch()
        if loader.skips.skipped["u"]:
            break
    assert loader.skips.as_dict()["u"]["skipped"] == {"truncated_file": 1}


@pytest.mark.parametrize("damage", ["flipped_byte", "not_gzip"])
def test_corrupt_gzip_is_a_counted_skip_naming_the_file(tmp_path, damage, capsys):
    path = tmp_path / "u.jsonl.gz"
    data = bytearray(gzip.compress("".join(json.dumps(text_doc(i)) + "\n" for i in range(800)).encode()))
    if damage == "flipped_byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray(b"these bytes are not gzip\n" * 4)
    path.write_bytes(bytes(data))
    seen = one_epoch(DocumentStream(SourceSpec("u", (path,), 1.0), "train"))
    reasons = [d.reason for d, _ in seen if isinstance(d, DocumentFormatError)]
    assert reasons[-1] in ("truncated_file", "corrupt_file")
    assert "u.jsonl.gz" in capsys.readouterr().err


def test_a_line_that_is_not_utf8_is_a_counted_skip(tmp_path, tokenizer, make_config):
    lines = [json.dumps(text_doc(i)).encode() for i in range(400)]
    bad_id = next(f"user-{i}" for i in range(400) if split_of(f"user-{i}") == "train")
    k = int(bad_id.split("-")[1])
    lines[k] = lines[k].replace(b"water", b"wat\xff\xfeer")
    (tmp_path / "u.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    spec = SourceSpec("u", (tmp_path / "u.jsonl",), 1.0)
    seen = one_epoch(DocumentStream(spec, "train"))
    errors = [(d.reason, w) for d, w in seen if isinstance(d, DocumentFormatError)]
    assert errors == [("bad_utf8", f"{tmp_path / 'u.jsonl'}:{k + 1}")]
    expected = train_ids([x.decode() for j, x in enumerate(lines) if j != k])
    assert [d.id for d, _ in seen if isinstance(d, Document)] == expected

    loader = make_loader(user_config(make_config, f"[{{path:{tmp_path / 'u.jsonl'}}}]"), tokenizer, batch_size=8)
    for _ in range(3):
        loader.next_batch()
    assert set(loader.skips.as_dict()["u"]["skipped"]) == {"bad_utf8"}
    assert loader.skips.examples[("u", "bad_utf8")] == f"{tmp_path / 'u.jsonl'}:{k + 1}"


def test_tokenizer_training_and_skill_counting_read_past_damage(tmp_path, capsys):
    lines = [json.dumps(text_doc(i, skill=f"s{i % 2}")) for i in range(1200)]
    good_gz = write_truncated_gz(tmp_path / "a.jsonl.gz", lines[:600], cut=200)
    raw = [x.encode() for x in lines[600:]]
    raw[5] = raw[5].replace(b"water", b"\xc3(")
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    specs = [SourceSpec("a", (tmp_path / "a.jsonl.gz",), 1.0), SourceSpec("b", (tmp_path / "b.jsonl",), 1.0)]
    docs = list(_train_documents(specs, 10_000))
    expected = train_ids(good_gz) + train_ids([x.decode() for i, x in enumerate(raw) if i != 5])
    assert sorted(d.id for d in docs) == sorted(expected)
    assert sum(skill_counts(specs[0], "train").values()) == len(train_ids(good_gz))
    assert "a.jsonl.gz" in capsys.readouterr().err
    assert train_tokenizer(specs, DataConfig(tokenizer_vocab_size=300)).encode_text("water boils")


def test_task_file_with_bad_bytes_or_truncated_is_a_one_line_error(tmp_path):
    item = {"id": "q1", "skill": "s", "type": "short_answer", "question": "Water boils at?", "answer": "100"}
    rows = [json.dumps(item | {"id": f"q{i}"}).encode() for i in range(300)]
    bad = list(rows)
    bad[1] = bad[1].replace(b"Water", b"W\xffter")
    (tmp_path / "t.jsonl").write_bytes(b"\n".join(bad) + b"\n")
    with pytest.raises(TaskFormatError, match=rf"^{tmp_path / 't.jsonl'}:2: .*UTF-8") as err:
        load_task_file(tmp_path / "t.jsonl")
    assert "\n" not in str(err.value)
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b"\n".join(rows) + b"\n")[:-100])
    with pytest.raises(TaskFormatError, match=rf"^{tmp_path / 't.jsonl.gz'}: .*after line \d+"):
        load_task_file(tmp_path / "t.jsonl.gz")


# --- 8a: skill balancing drops what a split lacks --------------------------------------------

def test_stream_probabilities_drop_sources_without_documents():
    counts = [Counter({"x": 5, "y": 1}), Counter(), Counter({"z": 2})]
    probs, layout = stream_probabilities([1.0, 3.0, 1.0], 1.0, counts)
    assert layout == [(0, "x"), (0, "y"), (2, "z")]
    assert np.isclose(probs.sum(), 1.0) and np.allclose(probs, [0.25, 0.25, 0.5])


def test_balance_skills_with_a_source_lacking_the_split(tmp_path, tokenizer, make_config):
    only_train = [text_doc(i, source="t") for i in range(400) if split_of(f"t-{i}") == "train"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in only_train))
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(text_doc(i, skill=f"s{i % 3}")) + "\n" for i in range(600)))
    both = f"[{{path:{tmp_path / 't.jsonl'}}},{{path:{tmp_path / 'all.jsonl'}}}]"
    loader = make_loader(user_config(make_config, both, "data.balance_skills=true"), tokenizer, split="validation")
    assert {s.spec.name for s in loader.streams} == {"all"} and np.isclose(loader.probs.sum(), 1.0)
    for _ in range(3):
        loader.next_batch()
    alone = user_config(make_config, f"[{{path:{tmp_path / 't.jsonl'}}}]", "data.balance_skills=true")
    with pytest.raises(DataError, match=r"validation split.*'t'"):
        make_loader(alone, tokenizer, split="validation")


# --- 8b: LaTeX environments ------------------------------------------------------------------

@pytest.mark.parametrize("src", [
    r"\begin{matrix} a & b \\ c & d",
    r"\begin{matrix} a \end{pmatrix}",
    r"a \end{cases}",
    r"\begin{cases} x \end{cases} \end{cases}",
    r"\begin x",
])
def test_unbalanced_latex_environment_is_bad_latex(src):
    with pytest.raises(DocumentFormatError) as err:
        featurize_latex(src, None, 512)
    assert err.value.reason == "bad_latex"


def test_balanced_latex_environments_pass(tokenizer):
    for src in (r"\begin{pmatrix} a & b \\ c & d \end{pmatrix}",
                r"\begin{cases} \begin{matrix} 1 \end{matrix} \end{cases} \\begin",
                r"x \beginning y"):
        assert featurize_latex(src, tokenizer, 512)["ids"].size > 0


# --- 8c: resume after a source file changed --------------------------------------------------

def resumable(tmp_path, make_config, tokenizer):
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(text_doc(i)) + "\n" for i in range(600)))
    cfg = user_config(make_config, f"[{{path:{tmp_path / 'u.jsonl'}}}]", "data.seq_len=32")
    a = make_loader(cfg, tokenizer, batch_size=2)
    for _ in range(6):
        a.next_batch()
    while a.pending is None:  # mid-document, so the pending document is restored too
        a.next_batch()
    return cfg, a, json.loads(json.dumps(a.state_dict()))


@pytest.mark.parametrize("change", ["shortened", "same_size_edit", "grown"])
def test_resume_after_the_file_changed_names_it(tmp_path, tokenizer, make_config, change):
    cfg, a, state = resumable(tmp_path, make_config, tokenizer)
    path = tmp_path / "u.jsonl"
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if change == "shortened":
        path.write_text("".join(lines[:3]))
    elif change == "same_size_edit":
        path.write_text(text.replace("Document 1 says", "Document 1 SAYS", 1))
    else:
        path.write_text(text + json.dumps(text_doc(9999)) + "\n")
    b = make_loader(cfg, tokenizer, batch_size=2)
    with pytest.raises(DataError, match=rf"{path}.* changed since the checkpoint") as err:
        b.load_state_dict(state)
    assert "\n" not in str(err.value)


def test_resume_of_an_unchanged_file_and_of_an_old_state(tmp_path, tokenizer, make_config):
    cfg, a, state = resumable(tmp_path, make_config, tokenizer)
    old = {k: v for k, v in state.items() if k not in ("files", "prefix_sha256")}  # as written before them
    b, c = make_loader(cfg, tokenizer, batch_size=2), make_loader(cfg, tokenizer, batch_size=2)
    b.load_state_dict(state)
    c.load_state_dict(old)
    for _ in range(4):
        x = a.next_batch()
        assert batches_equal(x, b.next_batch()) and batches_equal(x, c.next_batch())


def test_old_state_pointing_past_a_shortened_file_is_a_clear_error(tmp_path, tokenizer, make_config):
    cfg, a, state = resumable(tmp_path, make_config, tokenizer)
    old = {k: v for k, v in state.items() if k not in ("files", "prefix_sha256")}
    (tmp_path / "u.jsonl").write_text("")
    with pytest.raises(DataError, match="changed since the checkpoint"):
        make_loader(cfg, tokenizer, batch_size=2).load_state_dict(old)
