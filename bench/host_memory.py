"""The training step with glibc's default malloc settings against scifm.core.host_memory's (which the
trainer sets on CPU), in separate processes (a malloc setting holds for a whole process), alternated
round by round so that load on the machine hits both alike. Each process times the small shape's
scifm step of bench/text_step.py (fp32 and bf16 autocast) after warm-up steps and prints its median
step time, minor page faults per step and peak RSS; printed here: medians over rounds, spreads
(max / min over rounds), and keep / default.
Run: python bench/host_memory.py [--precisions fp32 bf16] [--rounds 3] [--steps 3] [--shape small|big]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("default", "keep")
WARMUP = 5  # the heap grows to the step's pattern over the first few steps


def child(mode: str, precision: str, shape: str, steps: int) -> None:
    import torch

    from scifm.core.host_memory import keep_freed_host_memory
    from text_step import TextBatch, build_model, model_config, scifm_step

    if mode == "keep" and not keep_freed_host_memory():
        sys.exit("the C library is not glibc: nothing to compare")
    step = scifm_step(build_model(model_config(shape, 512)), TextBatch.random(4, 512), precision)
    for _ in range(WARMUP):
        step()
    times, faults = [], []
    for _ in range(steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"seconds": statistics.median(times), "faults": statistics.median(faults),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shape", choices=("small", "big"), default="small")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.shape, args.steps)
        return
    runs = {(p, m): [] for p in args.precisions for m in MODES}
    for _ in range(args.rounds):
        for precision, mode in runs:
            out = subprocess.run([sys.executable, __file__, "--child", mode, precision, "--shape", args.shape,
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            runs[precision, mode].append(json.loads(out.stdout.splitlines()[-1]))
    threads = runs[args.precisions[0], MODES[0]][0]["threads"]
    print(f"shape {args.shape}, batch 4 x 512, {args.rounds} rounds of {args.steps} steps after {WARMUP} of warm-up, "
          f"{threads} torch threads")
    for precision in args.precisions:
        medians = {}
        for mode in MODES:
            seconds = [r["seconds"] for r in runs[precision, mode]]
            medians[mode] = statistics.median(seconds)
            print(f"  {precision} {mode:8s} step {medians[mode] * 1e3:7.1f} ms  spread {max(seconds) / min(seconds):4.2f}"
                  f"  page faults/step {statistics.median(r['faults'] for r in runs[precision, mode]):9,.0f}"
                  f"  peak RSS {statistics.median(r['rss_mb'] for r in runs[precision, mode]):6,.0f} MB")
        print(f"  {precision} keep / default step time: {medians['keep'] / medians['default']:.2f}")


if __name__ == "__main__":
    main()
