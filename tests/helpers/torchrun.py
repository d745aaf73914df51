"""Runs a worker script, or `python -m scifm.train`, under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers.run_metrics import losses

WORKERS = Path(__file__).parent / "workers"


def run_torchrun(worker: str, nproc: int, out_dir: Path, *args: str, timeout: int = 300) -> dict:
    """`worker` is a file in tests/helpers/workers; it gets `--out FILE` and writes its results there."""
    out_file = out_dir / f"{Path(worker).stem}-{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(out_dir / "inductor"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKERS / worker), "--out", str(out_file), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {worker} x{nproc} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out_file.read_text())


def train_under_torchrun(nproc: int, run_dir: Path, *overrides: str, timeout: int = 300) -> dict[int, float]:
    """`python -m scifm.train` on `nproc` processes; returns each logged step's loss. A run still
    going at `timeout` (a deadlock) fails the test, and its workers are killed with it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scifm.train", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}  # absent after max_steps=0
