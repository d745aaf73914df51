"""How long a training step waits for a checkpoint: synchronous against asynchronous saves, side by
side in one run.

Trains the same run twice (a checkpoint every step), once with trainer.async_checkpoint=false and
once with true, and times what the step spends in Trainer.checkpoint: for synchronous saves the
whole save; for asynchronous ones the copy to CPU memory, the small files, and whatever of the
previous save was still in flight. Prints the median of each and their ratio.
Run: python bench/checkpoint_stall.py [KEY=VALUE ...]   (e.g. model.d_model=256 model.n_layers=8)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from scifm.config import compose_run_config
from scifm.train.trainer import Trainer, train


def timed_runs(overrides: list[str]) -> dict[str, float]:
    stalls: dict[str, list[float]] = {}
    original = Trainer.checkpoint

    def timed(fn, key):
        def wrapper(self):
            t0 = time.perf_counter()
            fn(self)
            stalls.setdefault(f"{key}:{self.tc.async_checkpoint}", []).append(time.perf_counter() - t0)
        return wrapper

    Trainer.checkpoint = timed(original, "checkpoint")
    try:
        for mode in ("false", "true"):
            with tempfile.TemporaryDirectory() as run_dir:
                cfg = compose_run_config(["experiment=tiny", "trainer.max_steps=12", "trainer.ckpt_every=1",
                                          "trainer.val_every=100", f"trainer.async_checkpoint={mode}", *overrides])
                train(cfg, Path(run_dir))
    finally:
        Trainer.checkpoint = original
    # the first save of each run includes one-time set-up (thread pools, directories): left out
    return {key: statistics.median(times[1:]) for key, times in stalls.items()}


def main() -> None:
    medians = timed_runs(sys.argv[1:])
    sync, asynchronous = medians["checkpoint:False"], medians["checkpoint:True"]
    print(f"step stall per checkpoint (median of 11): synchronous {sync * 1000:.0f} ms, "
          f"asynchronous {asynchronous * 1000:.0f} ms, ratio async/sync {asynchronous / sync:.2f}")


if __name__ == "__main__":
    main()
