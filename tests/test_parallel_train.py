"""`torchrun -m scifm.train` end to end: a run saved under one layout resumes under another with
the same next-step losses, and rank 0 writes the run directory with a per-rank memory report.
Pipeline checkpoints hold every stage, so they move between pp and one process both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL_CORPUS_DOCS
from scifm.eval.config import EvalConfig, EvalRunConfig
from scifm.eval.runner import run_eval
from scifm.train.export import export_checkpoint
from tests.helpers.run_metrics import losses, records
from tests.test_eval_cli import write_task_file


def train_args(corpus_dir: Path, run_dir: Path) -> list[str]:
    """4 steps of the tiny model on the small corpus, checkpoints at steps 2 and 4."""
    return ["experiment=tiny", f"data.corpus_dir={corpus_dir}", f"data.corpus_max_docs_per_source={SMALL_CORPUS_DOCS}",
            "trainer.max_steps=4", "trainer.log_every=1", "trainer.val_every=2", "trainer.ckpt_every=2",
            "data.val_batches=1", "trainer.batch_size=4", "data.seq_len=128", f"hydra.run.dir={run_dir}"]


def train_cli(nproc: int, run_dir: Path, corpus_dir: Path, *overrides: str) -> str:
    """Runs scifm.train; returns its stderr."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "scifm.train", *train_args(corpus_dir, run_dir), *overrides]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


@pytest.mark.slow
def test_checkpoint_saved_under_fsdp_resumes_under_tp_and_one_process(corpus_dir, tmp_path):
    stderr = train_cli(2, tmp_path / "fsdp2", corpus_dir, "parallel.dp_shard=2")
    # the encoders' outputs, where FSDP2 hooks their backward, are tensors of their own, not views
    assert "returned a view tensor" not in stderr, stderr[-3000:]
    want = losses(tmp_path / "fsdp2")
    memory = json.loads((tmp_path / "fsdp2" / "memory.json").read_text())
    assert set(memory) == {"rank0", "rank1"} and memory["rank0"]["optimizer_bytes"] > 0
    step_2 = tmp_path / "fsdp2" / "checkpoints" / "step_2"
    for nproc, layout in ((2, "parallel.tp=2"), (1, "parallel.tp=1")):
        run_dir = tmp_path / f"resumed-{nproc}"
        train_cli(nproc, run_dir, corpus_dir, layout, f"resume={step_2}")
        got = losses(run_dir)
        assert sorted(got) == [3, 4]
        for step in got:
            assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (layout, got, want)
    # the sharded fsdp2 weights, consolidated, equal those of the run that finished in one process
    sharded = load_file(export_checkpoint(tmp_path / "fsdp2/checkpoints/step_4", tmp_path / "a.safetensors"))
    single = load_file(export_checkpoint(tmp_path / "resumed-1/checkpoints/step_4", tmp_path / "b.safetensors"))
    assert sharded.keys() == single.keys() and len(sharded) > 300
    for name, t in sharded.items():
        torch.testing.assert_close(t, single[name], rtol=1e-4, atol=1e-6, msg=name)
    # and `scifm eval` reads the sharded checkpoint as it reads the one-process one
    tasks = write_task_file(tmp_path / "tasks.jsonl")
    probs = {}
    for run in ("fsdp2", "resumed-1"):
        cfg = EvalRunConfig(str(tmp_path / run / "checkpoints" / "step_4"),
                            EvalConfig(task_files=[str(tasks)], max_new_tokens=2, out=str(tmp_path / "eval" / run)))
        run_eval(cfg)
        rows = (tmp_path / "eval" / run / "step_4" / "samples" / "tasks.jsonl").read_text().splitlines()
        probs[run] = [p for row in map(json.loads, rows) for p in row.get("probs", [])]
    assert len(probs["fsdp2"]) == 9
    np.testing.assert_allclose(probs["fsdp2"], probs["resumed-1"], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_saved_under_pp_resumes_in_one_process_and_back_under_another_schedule(corpus_dir, tmp_path):
    accum = "trainer.grad_accum=2"  # 1F1B runs at least one micro-batch per stage
    train_cli(2, tmp_path / "pp2", corpus_dir, "parallel.pp=2", accum)
    want = records(tmp_path / "pp2")
    assert all(len(r["moe"]) == 3 for r in want.values())  # every stage's MoE layers are logged
    one = tmp_path / "one"
    train_cli(1, one, corpus_dir, accum, "trainer.ckpt_every=1", f"resume={tmp_path / 'pp2' / 'checkpoints' / 'step_2'}")
    back = tmp_path / "pp2-interleaved"
    train_cli(2, back, corpus_dir, "parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B",
              "parallel.pp_virtual_stages=2", accum, f"resume={one / 'checkpoints' / 'step_3'}")
    got_one, got_back = records(one), records(back)
    assert sorted(got_one) == [3, 4] and sorted(got_back) == [4]
    for got in (got_one, got_back):
        for step, r in got.items():
            for key in ("loss", "aux_loss", "val_loss"):
                if key in want[step]:
                    assert abs(r[key] - want[step][key]) <= 1e-5 * abs(want[step][key]), (key, got, want)


@pytest.mark.slow
def test_a_tensor_parallel_checkpoint_resumes_under_a_pipeline(corpus_dir, tmp_path):
    """tp=2 -> pp=2 through the CLI: the same next-step losses after resuming. (Every layout's
    checkpoint loading into one process with exactly its weights, and resuming itself exactly, is the
    parity test's round trip; fsdp -> tp and -> one process is
    test_checkpoint_saved_under_fsdp_resumes_under_tp_and_one_process.)"""
    train_cli(2, tmp_path / "saved", corpus_dir, "parallel.tp=2")
    want = losses(tmp_path / "saved")
    train_cli(2, tmp_path / "resumed", corpus_dir, "parallel.pp=2", "parallel.pp_schedule=GPipe",
              f"resume={tmp_path / 'saved' / 'checkpoints' / 'step_2'}")
    got = losses(tmp_path / "resumed")
    assert sorted(got) == [3, 4]
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (got, want)
