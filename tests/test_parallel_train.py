"""`torchrun -m scifm.train` end to end: a run saved under one layout resumes under another with
the same next-step losses, and rank 0 writes the run directory with a per-rank memory report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL_CORPUS_DOCS


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def train_cli(nproc: int, run_dir: Path, corpus_dir: Path, *overrides: str) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "scifm.train", "experiment=tiny", f"data.corpus_dir={corpus_dir}",
           f"data.corpus_max_docs_per_source={SMALL_CORPUS_DOCS}", "trainer.max_steps=4", "trainer.log_every=1",
           "trainer.val_every=2", "trainer.ckpt_every=2", "data.val_batches=1", "trainer.batch_size=4",
           "data.seq_len=128", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_checkpoint_saved_under_fsdp_resumes_under_tp_and_one_process(corpus_dir, tmp_path):
    train_cli(2, tmp_path / "fsdp2", corpus_dir, "parallel.dp_shard=2")
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
