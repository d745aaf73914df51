"""Checkpoints under damage: a replaced step is never half there, a checkpoint with a missing or
short file is never picked as the latest and is named when asked for, tampered or garbled files are
one-line errors before any state is used (a pickle payload is never executed), and the metrics log
of a resumed run holds each step once."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL_CORPUS_DOCS
from tests.helpers.torchrun import train_under_torchrun
from scifm.core.checkpoint_files import META_FILE, file_sizes, is_complete, latest_checkpoint, marked_in_use
from scifm.core.errors import CheckpointError
from scifm.train import checkpoint as checkpoint_module
from scifm.train import trainer as trainer_module
from scifm.train.checkpoint import prune_checkpoints
from scifm.train.trainer import train
from tests.helpers.run_metrics import losses

COMMON = ("trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.log_every=1", "trainer.val_every=100",
          "trainer.batch_size=4", "data.seq_len=128", "data.val_batches=1")


@pytest.fixture(scope="module")
def run(make_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults")
    train(make_config(*COMMON), run_dir)
    return run_dir


@pytest.fixture
def copy(run, tmp_path) -> Path:
    """A private copy of the run's checkpoints/ to damage."""
    root = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", root)
    return root


def rewrite_manifest(ckpt: Path) -> None:
    """What a tamperer who also fixes meta.json's sizes would do."""
    meta = json.loads((ckpt / META_FILE).read_text())
    (ckpt / META_FILE).write_text(json.dumps(meta | {"files": file_sizes(ckpt)}))


def resume_error(make_config, ckpt: Path, run_dir: Path, capsys) -> str:
    with pytest.raises(CheckpointError) as err:
        train(make_config(*COMMON, f"resume={ckpt}"), run_dir)
    message = str(err.value)
    assert "\n" not in message, message
    assert "resumed from" not in capsys.readouterr().out  # nothing was used before the check
    return message


def test_meta_lists_every_file_with_its_size(run):
    ckpt = run / "checkpoints" / "step_4"
    meta = json.loads((ckpt / META_FILE).read_text())
    assert meta["step"] == 4 and meta["files"] == file_sizes(ckpt)
    assert {"train_state.pt", "loader.json", "config.yaml", "tokenizer/tokenizer.json"} <= set(meta["files"])
    assert any(name.startswith("model/") and name.endswith(".safetensors") for name in meta["files"])


def test_a_checkpoint_with_a_missing_or_short_file_is_never_the_latest(copy, make_config, tmp_path, capsys):
    step_4 = copy / "step_4"
    shard = next(p for p in sorted((step_4 / "model").iterdir()) if p.suffix == ".safetensors")
    shard.unlink()  # as a kill in the middle of deleting the directory left it: meta.json, no weights
    assert latest_checkpoint(copy).name == "step_2"
    message = resume_error(make_config, step_4, tmp_path / "r1", capsys)
    assert f"model/{shard.name} is missing" in message
    state = copy / "step_2" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:-100])  # a full disk cut it short
    assert latest_checkpoint(copy) is None
    assert "train_state.pt has" in resume_error(make_config, copy / "step_2", tmp_path / "r2", capsys)


def test_saving_a_step_again_never_leaves_it_half_there(copy, monkeypatch):
    step_4 = copy / "step_4"
    new = copy / ".step_4.tmp"
    shutil.copytree(step_4, new)
    real_replace, calls = os.replace, []

    def killed_after_the_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between moving the old one away and the new one in
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module._replace_dir(new, step_4)
    assert not step_4.exists() and latest_checkpoint(copy).name == "step_2"
    monkeypatch.undo()
    checkpoint_module._replace_dir(new, step_4)  # the next save of the step completes it
    assert latest_checkpoint(copy).name == "step_4" and is_complete(step_4)
    assert sorted(p.name for p in copy.iterdir()) == ["step_2", "step_4"]


class Payload:
    """Unpickling this would create a file: the test checks that it never happens."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_in_the_train_state_is_refused_in_one_line(copy, make_config, tmp_path, capsys):
    ckpt = copy / "step_2"
    marker = tmp_path / "executed"
    payload = Payload()
    payload.marker = marker
    torch.save({"step": 2, "evil": payload}, ckpt / "train_state.pt")
    rewrite_manifest(ckpt)
    message = resume_error(make_config, ckpt, tmp_path / "run", capsys)
    assert "holds objects other than tensors" in message and "weights_only=False" not in message
    assert not marker.exists()


def test_damaged_loader_state_is_one_line_naming_the_file(copy, make_config, tmp_path, capsys):
    ckpt = copy / "step_2"
    loader = ckpt / "loader.json"
    good = loader.read_text()
    for damaged, expected in (("{not json", "not valid JSON"), ("[1, 2]", "not a data-loader state"),
                              (json.dumps({"rng": 1}), "not a state of this run's data loader")):
        loader.write_text(damaged)
        rewrite_manifest(ckpt)
        message = resume_error(make_config, ckpt, tmp_path / "run", capsys)
        assert "loader.json" in message and expected in message, message
    loader.write_text(good)


@pytest.mark.parametrize("meta, expected", [("garbage", "not valid JSON"), ('{"step": "two"}', "no step number"),
                                            ('{"step": 2, "files": [1]}', "file list is damaged")])
def test_garbage_in_meta_json_is_never_accepted(copy, make_config, tmp_path, capsys, meta, expected):
    ckpt = copy / "step_4"
    (ckpt / META_FILE).write_text(meta)
    assert latest_checkpoint(copy).name == "step_2"
    assert expected in resume_error(make_config, ckpt, tmp_path / "run", capsys)


def test_a_resumed_run_logs_each_step_once(run, make_config, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    train(make_config(*COMMON, "resume=latest", "trainer.max_steps=5"), run_dir)  # a longer second leg
    with_kill = run_dir / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in with_kill.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    # resumed from step 2 after a kill at step 4: steps 3 and 4 were logged by the killed run
    train(make_config(*COMMON, f"resume={run_dir / 'checkpoints' / 'step_2'}"), run_dir)
    steps = [json.loads(line)["step"] for line in with_kill.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_retention_keeps_the_newest_every_kth_the_resume_source_and_one_being_evaluated(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 9):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / META_FILE).write_text(json.dumps({"step": step, "files": {}}))
    with marked_in_use(root / "step_3"):
        deleted = prune_checkpoints(root, keep_last=2, keep_every=4, protect=root / "step_1")
    assert sorted(p.name for p in deleted) == ["step_2", "step_5", "step_6"]
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_3", "step_4", "step_7", "step_8"]
    assert list((root / "step_3").iterdir()) == [root / "step_3" / META_FILE]  # the marker went with the evaluation
    assert prune_checkpoints(root, keep_last=0, keep_every=0, protect=None) == []  # 0 keeps all


def test_a_run_keeps_only_its_last_checkpoints(make_config, tmp_path):
    train(make_config(*COMMON, "trainer.keep_last=2", "trainer.ckpt_every=1"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_4"]


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(make_config, tmp_path, monkeypatch):
    real = checkpoint_module.start_checkpoint

    def save_on_a_full_disk(root, step, **kw):
        if step < 4:
            return real(root, step, **kw)
        # files past 64 KiB fail with EFBIG, as on a full disk (SIGXFSZ ignored so the write errs instead)
        old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old_limit[1]))
        try:
            return real(root, step, **kw)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)

    monkeypatch.setattr(trainer_module, "start_checkpoint", save_on_a_full_disk)
    with pytest.raises(CheckpointError) as err:
        train(make_config(*COMMON), tmp_path)
    message = str(err.value)
    assert "\n" not in message and "could not be written" in message and "step_2" in message, message
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_2"] and is_complete(root / "step_2")


def test_asynchronous_checkpoints_hold_what_synchronous_ones_do(run, make_config, tmp_path):
    """Shards written in the background while training goes on: the same files, weights, optimizer
    state and losses as the synchronous run's, and a run resumed from one repeats the steps after it."""
    async_run = tmp_path / "async"
    train(make_config(*COMMON, "trainer.async_checkpoint=true"), async_run)
    assert losses(async_run) == losses(run)
    for step in (2, 4):
        assert_same_checkpoint(run / f"checkpoints/step_{step}", async_run / f"checkpoints/step_{step}")
    assert not any(p.name.startswith(".") for p in (async_run / "checkpoints").iterdir())
    resumed = tmp_path / "resumed"
    train(make_config(*COMMON, "trainer.async_checkpoint=true", f"resume={async_run / 'checkpoints/step_2'}"),
          resumed)
    assert losses(resumed) == {s: losses(run)[s] for s in (3, 4)}


def assert_same_checkpoint(want_dir: Path, got_dir: Path) -> None:
    """Complete, the same files, and every model and optimizer tensor equal."""
    assert is_complete(got_dir) and set(file_sizes(want_dir)) == set(file_sizes(got_dir))
    for sub in ("model", "optimizer"):
        for shard in (want_dir / sub).glob("*.safetensors"):
            want, got = load_file(shard), load_file(got_dir / sub / shard.name)
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), (got_dir, sub)


def torchrun_train(corpus_dir: Path, run_dir: Path, *extra: str) -> dict[int, float]:
    """Two processes, two pipeline stages, a save every step; returns the logged loss of each step."""
    return train_under_torchrun(2, run_dir, "experiment=tiny", f"data.corpus_dir={corpus_dir}",
                                f"data.corpus_max_docs_per_source={SMALL_CORPUS_DOCS}", "parallel.pp=2",
                                "trainer.grad_accum=2", *COMMON, "trainer.ckpt_every=1", *extra)


@pytest.mark.slow
def test_asynchronous_checkpoints_with_pipeline_stages(corpus_dir, tmp_path):
    """The model's and the optimizer's background saves each synchronise on a group of their own;
    sharing one, their collectives interleaved differently on the two stages and hung at the first
    save. Every step saves here, so a save is in flight while the next step's pipeline runs."""
    sync_losses = torchrun_train(corpus_dir, tmp_path / "sync")
    async_run = tmp_path / "async"
    assert torchrun_train(corpus_dir, async_run, "trainer.async_checkpoint=true") == sync_losses
    for step in range(1, 5):
        assert_same_checkpoint(tmp_path / f"sync/checkpoints/step_{step}", async_run / f"checkpoints/step_{step}")
    resumed = tmp_path / "resumed"
    got = torchrun_train(corpus_dir, resumed, "trainer.async_checkpoint=true",
                         f"resume={async_run / 'checkpoints/step_2'}")
    assert got == {s: sync_losses[s] for s in (3, 4)}


def test_a_checkpoint_from_before_the_file_list_is_judged_by_its_standard_files(copy):
    ckpt = copy / "step_4"
    (ckpt / META_FILE).write_text(json.dumps({"step": 4, "saved_at": 0.0}))  # what earlier versions wrote
    assert latest_checkpoint(copy) == ckpt
    (ckpt / "loader.json").unlink()
    assert latest_checkpoint(copy).name == "step_2"
