"""Runs a worker script, or `python -m scifm.train`, under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from tests.helpers.run_metrics import losses

WORKERS = Path(__file__).parent / "workers"
# torchrun's root cause names the first rank to fail; a segfault, bus error or abort is native code's
NATIVE_CRASH = re.compile(r"Root Cause.*?exitcode\s*:\s*-(?:6|7|11) ", re.S)


def run_torchrun(worker: str, nproc: int, out_dir: Path, *args: str, timeout: int = 300) -> dict:
    """`worker` is a file in tests/helpers/workers; it gets `--out FILE` and writes its results there.
    A launch in which a rank died of a native crash (seen once in CI: a segmentation fault in a
    rank during gloo all-gathers, in a launch that passed in every CI run before) runs once more, with a
    warning: the workers are deterministic, so the second launch is held to the same assertions."""
    out_file = out_dir / f"{Path(worker).stem}-{nproc}.json"
    # faulthandler: a rank that dies of a signal prints its Python stack, shown first below
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(out_dir / "inductor"),
               PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKERS / worker), "--out", str(out_file), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and NATIVE_CRASH.search(proc.stderr):
        warnings.warn(f"torchrun {worker} x{nproc}: a rank crashed natively, launched again:\n{_crash(proc)}")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {worker} x{nproc} failed ({proc.returncode}):\n{_crash(proc)}"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out_file.read_text())


def _crash(proc: subprocess.CompletedProcess) -> str:
    """The Python stack faulthandler printed for a rank killed by a signal, if one was."""
    fatal = proc.stderr.find("Fatal Python error")
    return proc.stderr[fatal:fatal + 4000] + "\n...\n" if fatal >= 0 else ""


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
