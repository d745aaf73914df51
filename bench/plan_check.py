"""`scifm plan`'s step-time model against CPU runs: measured and predicted step-time ratios of five
layouts of the tiny model to the one-process run, side by side.

Each round trains every layout once, in turn (one process, then two under torchrun with gloo), so
load on the machine hits them alike; a run's step time is the median of its steps after the first
two (the first one also measures memory). Prints, per layout, the median over rounds, the spread
(max / min over rounds), the measured ratio to the one-process run, the planner's ratio, and
measured / predicted. The planner is given this CPU as its hardware: fp32, a peak from a matmul
timed here at the tiny model's shapes, mfu 1, and plan.intra_node_gbps (default 1 GB/s, about what
gloo moves between two processes on one machine; override it with plan.intra_node_gbps=...).
Run: python bench/plan_check.py [--rounds N] [plan.intra_node_gbps=X]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scifm.plan.layouts import only_layout
from scifm.plan.planner import make_plan

RUN = ["experiment=tiny", "trainer.grad_accum=2", "trainer.precision=fp32"]
LAYOUTS = {
    "single": (1, []),
    "dp_shard=2": (2, ["parallel.dp_shard=2"]),
    "tp=2": (2, ["parallel.tp=2"]),
    "dp_shard=2 ep=2": (2, ["parallel.dp_shard=2", "parallel.ep=2"]),
    "pp=2": (2, ["parallel.pp=2"]),
}
STEPS = 8
CORPUS_DOCS = 150  # per source


def matmul_flops() -> float:
    """FLOP/s of one thread on an fp32 matmul of the tiny model's FFN shape (512 tokens x 128 -> 384)."""
    torch.set_num_threads(1)
    a, b = torch.randn(512, 128), torch.randn(128, 384)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(200):
            a @ b
        times.append(time.perf_counter() - t0)
    return 200 * 2 * 512 * 128 * 384 / statistics.median(times)


def step_seconds(nproc: int, layout: list[str], run_dir: Path, corpus: Path, run: list[str]) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "scifm.train", *run, *layout, f"trainer.max_steps={STEPS}", "trainer.log_every=1",
           "trainer.val_every=1000", "data.val_batches=1", "trainer.tensorboard=false", f"hydra.run.dir={run_dir}",
           f"data.corpus_dir={corpus}", f"data.corpus_max_docs_per_source={CORPUS_DOCS}"]  # the first run builds it
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen = [0] + [r["tokens_seen"] for r in records]
    seconds = [(seen[i + 1] - seen[i]) / r["tokens_per_s"] for i, r in enumerate(records)]
    return statistics.median(seconds[2:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--seq-len", type=int, default=128)
    args, plan_overrides = parser.parse_known_args()
    run = [*RUN, f"trainer.batch_size={args.batch_size}", f"data.seq_len={args.seq_len}"]
    peak = matmul_flops()
    hardware = [f"plan.peak_tflops_fp32={peak / 1e12}", "plan.mfu=1", "plan.intra_node_gbps=1", *plan_overrides]
    measured: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (nproc, layout) in LAYOUTS.items():
                run_dir = Path(tmp) / f"{r}-{name.replace(' ', '_').replace('=', '')}"  # "=" would split the override
                measured[name].append(step_seconds(nproc, layout, run_dir, Path(tmp) / "corpus", run))
        predicted = {}
        for name, (nproc, layout) in LAYOUTS.items():
            # the run's tokenizer and corpus: the planner samples the encoders' work from the same data
            plan = make_plan([*run, *only_layout(layout), "cluster.nodes=1", f"cluster.gpus_per_node={nproc}",
                              f"plan.tokenizer={Path(tmp) / '0-single' / 'tokenizer'}", *hardware,
                              f"data.corpus_dir={Path(tmp) / 'corpus'}", f"data.corpus_max_docs_per_source={CORPUS_DOCS}"])
            predicted[name] = plan.rows[0].time.total
    base = statistics.median(measured["single"])
    print(f"CPU peak (one thread, fp32 matmul) {peak / 1e9:.1f} GFLOP/s; {args.rounds} rounds of {STEPS} steps; "
          f"planner: {' '.join(hardware[1:])}")
    print(f"{'layout':18} {'median s':>9} {'spread':>7} {'measured/single':>16} {'predicted/single':>17} {'meas/pred':>10}")
    for name, times in measured.items():
        ratio = statistics.median(times) / base
        want = predicted[name] / predicted["single"]
        print(f"{name:18} {statistics.median(times):9.3f} {max(times) / min(times):7.2f} {ratio:16.2f} {want:17.2f} "
              f"{ratio / want:10.2f}")


if __name__ == "__main__":
    main()
