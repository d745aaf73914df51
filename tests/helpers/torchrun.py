"""Runs a worker script under torchrun (gloo on CPU) and returns the JSON that rank 0 wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
