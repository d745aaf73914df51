"""What running every step through Megatron-Core's schedule costs on the CPU, under engine=megatron in
one process: Megatron's schedule (which, on a CPU device, runs inside the `_CpuForCuda` torch-function
mode), scifm's own micro-batch loop (ModelRunner.forward_backward: the same forward and backward of
each micro-batch), and that loop inside the mode alone, taking turns step by step in one training run
(all three compute the same gradients). Prints each one's median forward-backward time and spread
(max / min), and the medians of the per-round ratios to the loop.
Run: python bench/megatron_schedule.py [KEY=VALUE ...]   (e.g. trainer.max_steps=90)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from scifm.config import compose_run_config
from scifm.parallel import megatron_engine
from scifm.parallel.runner import ModelRunner
from scifm.train.trainer import train

VARIANTS = ("schedule", "loop", "loop in the mode")


def main() -> None:
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    schedule = megatron_engine.MegatronRunner.forward_backward
    calls = [0]

    def timed(runner, micro, scale):
        variant = VARIANTS[calls[0] % len(VARIANTS)]
        calls[0] += 1
        t0 = time.perf_counter()
        if variant == "schedule":
            out = schedule(runner, micro, scale)
        elif variant == "loop":
            out = ModelRunner.forward_backward(runner, micro, scale)
        else:
            with megatron_engine._CpuForCuda():
                out = ModelRunner.forward_backward(runner, micro, scale)
        times[variant].append(time.perf_counter() - t0)
        return out

    megatron_engine.MegatronRunner.forward_backward = timed
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = compose_run_config(["experiment=tiny", "parallel.engine=megatron", "trainer.max_steps=48",
                                      "trainer.grad_accum=2", "trainer.batch_size=4", "data.seq_len=128",
                                      "trainer.val_every=1000", "trainer.ckpt_every=1000", *sys.argv[1:]])
            train(cfg, Path(run_dir))
    finally:
        megatron_engine.MegatronRunner.forward_backward = schedule
    rounds = {v: t[1:] for v, t in times.items()}  # the first round includes one-time set-up
    n = min(len(t) for t in rounds.values())
    for variant, t in rounds.items():
        line = f"{variant}: median {statistics.median(t) * 1000:.0f} ms, spread {max(t) / min(t):.2f}"
        if variant != "loop":
            ratios = [a / b for a, b in zip(t[:n], rounds["loop"][:n])]
            line += f"; / loop: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})"
        print(line)
    print(f"{n} rounds")


if __name__ == "__main__":
    main()
