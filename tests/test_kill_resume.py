"""Fault injection: `kill -9` at seeded random moments of training and of saving (synchronous and
asynchronous checkpoints), then `resume=latest` until the run ends, with batches made ahead by the data worker process. Every
trial must reproduce the uninterrupted run's losses bit for bit (CPU, fp32 and FP8, one process), and its
log must hold each step once."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL_CORPUS_DOCS

TRIALS = 2
STEPS = 6


def command(corpus_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    # a checkpoint every step: a random kill can land inside a save as well as inside a step
    return [sys.executable, "-m", "scifm.train", "experiment=tiny", f"data.corpus_dir={corpus_dir}",
            f"data.corpus_max_docs_per_source={SMALL_CORPUS_DOCS}", f"trainer.max_steps={STEPS}",
            "trainer.ckpt_every=1", "trainer.log_every=1", "trainer.val_every=100", "trainer.batch_size=4",
            "data.seq_len=128", "data.val_batches=1", f"hydra.run.dir={run_dir}",
            # batches made ahead by a worker process: resume must continue after the last batch a
            # step took, not after those still queued (the tiny preset turns the worker off)
            "data.prefetch_batches=2", *extra]


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def run_to_completion(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> float:
    meta = run_dir / "checkpoints" / f"step_{step}" / "meta.json"
    while not meta.exists() and proc.poll() is None:
        time.sleep(0.02)
    return time.perf_counter()


@pytest.mark.slow
@pytest.mark.parametrize("precision, trials", [("fp32", TRIALS), ("fp8", 1)])
def test_kill_9_anywhere_then_resume_reproduces_the_uninterrupted_losses(corpus_dir, tmp_path, precision, trials):
    """FP8 (torchao's tensorwise scales, recomputed each step from the weights and rows) once: what a kill
    can lose is the same as in fp32, and FP8 matmuls emulated on a CPU make each trial slower."""
    reference = tmp_path / "reference"
    run_to_completion(command(corpus_dir, reference, f"trainer.precision={precision}"))
    want = logged_losses(reference)
    assert [s for s, _ in want] == list(range(1, STEPS + 1))
    summary = json.loads((reference / "summary.json").read_text())
    assert (precision == "fp8") == (summary.get("fp8", {}).get("linear_layers", 0) > 0)  # FP8 really ran
    rng = random.Random(0)
    killed = 0
    for trial in range(trials):
        run_dir = tmp_path / f"trial{trial}"
        # every other trial writes its checkpoints in the background: the same guarantees
        mode = (f"trainer.precision={precision}",) + (("trainer.async_checkpoint=true",) if trial % 2 else ())
        proc = subprocess.Popen(command(corpus_dir, run_dir, *mode), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # The kill point is paced by this trial's own steps, not by a clock measured elsewhere (the other
        # test worker can speed a run up or slow it down several times): after step k's checkpoint, at a
        # random fraction of one step, so it lands inside step k+1 or its save with >= 1 step to spare.
        k = rng.randint(2, STEPS - 2)
        first = wait_for_checkpoint(proc, run_dir, 1)
        step_seconds = (wait_for_checkpoint(proc, run_dir, k) - first) / (k - 1)
        time.sleep(rng.uniform(0, 0.9 * step_seconds))
        proc.kill()  # SIGKILL: no handler, no cleanup
        killed += proc.wait() < 0
        while not (run_dir / "summary.json").exists():
            run_to_completion(command(corpus_dir, run_dir, "resume=latest", *mode))
        assert logged_losses(run_dir) == want, trial  # each step once, each loss bit-identical
    assert killed == trials  # every kill landed mid-run, not after the end
