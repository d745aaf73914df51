"""`scifm plan`'s step-time model against CPU runs: measured and predicted step-time ratios of four
two-process layouts of the tiny model, and of one process on half the rows (a data-parallel rank's share
of the work, without the other rank), to the one-process run, side by side.

Each round trains every layout once, in turn (one process, then two under torchrun with gloo), so
load on the machine hits them alike; a run's step time is the median of its steps after the first
two (the first one also measures memory). Prints, per layout, the median over rounds, the spread
(max / min over rounds), the predicted seconds, the measured ratio to the one-process run, the
planner's ratio, measured / predicted, and the predicted parts. The planner is given this CPU as its
hardware: fp32, a peak from a matmul timed here at the tiny model's shapes, the MFU the one-process
run reached against it (so its compute equals that run's step, and the ratios test what the layouts
add to it), gloo's bandwidth and per-step latency between two processes (timed first, on all-gathers
and reduce-scatters of 64 KiB to 4 MiB for the bandwidth and of one element for the latency), and plan.comm_overlap=false (gloo's collectives run on the cores
that compute); the first one-process run's metrics.jsonl gives it the routing (plan.routing_metrics: how
many more rows than an even share the busiest ep rank takes). Any plan.KEY=VALUE given overrides them.
With --profile it then trains dp_shard=2 once more under trainer.profile and prints, from both ranks'
traces, the time FSDP2's collectives take on their own and the time a rank waits in them for the other.
Run: python bench/plan_check.py [--rounds N] [--batch-size R --seq-len S] [--profile] [plan.KEY=VALUE ...]
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
from scifm.train.profiling import PROFILE_DIR

RUN = ["experiment=tiny", "trainer.grad_accum=2", "trainer.precision=fp32"]
# name: (processes, parallel overrides, rows per micro-batch divided by). One process on half the rows is
# a data-parallel rank's work without the other rank: the planner's compute, measured
LAYOUTS = {
    "single": (1, [], 1),
    "single, half rows": (1, [], 2),
    "dp_shard=2": (2, ["parallel.dp_shard=2"], 1),
    "tp=2": (2, ["parallel.tp=2"], 1),
    "dp_shard=2 ep=2": (2, ["parallel.dp_shard=2", "parallel.ep=2"], 1),
    "pp=2": (2, ["parallel.pp=2"], 1),
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


LINK_SIZES = (1, 1 << 14, 1 << 16, 1 << 18, 1 << 20)  # fp32 elements per rank: 4 bytes, 64 KiB to 4 MiB


def time_link(out: Path) -> None:
    """Under torchrun (2 processes, gloo): the median seconds of an all-gather plus a reduce-scatter at
    each of LINK_SIZES, after a pass that warms gloo's buffers up, written by rank 0 to `out`."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    times = {}
    for timed in (False, True):
        for numel in LINK_SIZES:
            shard, full = torch.randn(numel), torch.randn(2 * numel)
            rounds = []
            for _ in range((51 if numel == 1 else 21) if timed else 3):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_gather_into_tensor(full, shard)
                dist.reduce_scatter_tensor(shard, full)
                rounds.append(time.perf_counter() - t0)
            times[numel] = statistics.median(rounds)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(times))
    dist.destroy_process_group()


def link_figures(tmp: Path) -> tuple[float, float]:
    """gloo's (GB/s, microseconds per step) between two processes: each size's pair of collectives moves
    2 x (n-1)/n x its gathered bytes in 2 ring steps; a least-squares line through the sizes' times
    gives seconds per byte (its slope), and the pair of one-element collectives two steps' latency."""
    out = tmp / "link.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--time-link", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    times = {int(k): v for k, v in json.loads(out.read_text()).items()}
    sizes = LINK_SIZES[1:]
    moved = [2 * (1 / 2) * 2 * n * 4 for n in sizes]  # bytes per rank of the pair
    slope, _ = statistics.linear_regression(moved, [times[n] for n in sizes])
    return 1 / slope / 1e9, times[1] / 2 * 1e6


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


PROFILED = (3, 4)  # trainer.profile's window in a --profile run: steps 3 to 6 of STEPS


def collective_split(run_dir: Path) -> tuple[float, float]:
    """Seconds a step, per rank, that FSDP2's collectives (each all-gather and post-backward
    reduce-scatter, with their copies) take on their own and spend waiting for the other rank, from
    both ranks' traces: a collective ends on both ranks together, so the rank that reached it last
    shows its own time and the other rank waited for the difference."""
    def events(rank: int) -> list[tuple[str, float, float]]:  # (name, seconds, start)
        trace = json.loads((run_dir / PROFILE_DIR / f"rank{rank}.json").read_text())
        return sorted(((e["name"], e["dur"] / 1e6, e["ts"]) for e in trace["traceEvents"] if e.get("ph") == "X"
                       and e["name"].startswith(("FSDP::all_gather", "FSDP::post_backward_reduce"))
                       and not e["name"].startswith("FSDP::all_gather_copy")), key=lambda e: e[2])

    pairs = list(zip(events(0), events(1), strict=True))
    assert all(a[0] == b[0] for a, b in pairs), "the ranks' collectives differ"
    own = sum(min(a[1], b[1]) for a, b in pairs)
    waited = sum(abs(a[1] - b[1]) for a, b in pairs) / 2  # one of the two ranks waits at each
    return own / PROFILED[1], waited / PROFILED[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--profile", action="store_true",
                        help="also profile dp_shard=2 and split its FSDP collectives' time (trainer.profile)")
    parser.add_argument("--time-link", type=Path, help=argparse.SUPPRESS)  # the link-timing child
    args, plan_overrides = parser.parse_known_args()
    if args.time_link:
        return time_link(args.time_link)

    def run(name: str) -> list[str]:
        return [*RUN, f"trainer.batch_size={args.batch_size // LAYOUTS[name][2]}", f"data.seq_len={args.seq_len}"]

    peak = matmul_flops()
    measured: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        gbps, latency_us = link_figures(Path(tmp))
        for r in range(args.rounds):
            for name, (nproc, layout, _) in LAYOUTS.items():
                # "=" would split the override, "," would make a list of it
                run_dir = Path(tmp) / f"{r}-{name.replace(' ', '_').replace('=', '').replace(',', '')}"
                measured[name].append(step_seconds(nproc, layout, run_dir, Path(tmp) / "corpus", run(name)))
        base = statistics.median(measured["single"])

        def predict(name: str, hardware: list[str]):
            nproc, layout, _ = LAYOUTS[name]
            # the run's tokenizer and corpus: the planner samples the encoders' work from the same data
            return make_plan([*run(name), *only_layout(layout), "cluster.nodes=1", f"cluster.gpus_per_node={nproc}",
                              f"plan.tokenizer={Path(tmp) / '0-single' / 'tokenizer'}", *hardware,
                              f"data.corpus_dir={Path(tmp) / 'corpus'}",
                              f"data.corpus_max_docs_per_source={CORPUS_DOCS}"])

        # the MFU the one-process run reached: its step is all compute, so the planner's compute at the
        # matmul peak over the measured step
        mfu = min(1.0, predict("single", [f"plan.peak_tflops_fp32={peak / 1e12}", "plan.mfu=1"]).rows[0].time.compute
                  / base)
        hardware = [f"plan.peak_tflops_fp32={peak / 1e12}", f"plan.mfu={mfu}", f"plan.intra_node_gbps={gbps}",
                    f"plan.intra_node_latency_us={latency_us}", "plan.comm_overlap=false",
                    f"plan.routing_metrics={Path(tmp) / '0-single' / 'metrics.jsonl'}", *plan_overrides]
        plans = {name: predict(name, hardware) for name in LAYOUTS}
        predicted = {name: plan.rows[0].time for name, plan in plans.items()}
        imbalance = plans["dp_shard=2 ep=2"].routing.imbalance(2)
        if args.profile:
            window = [f"trainer.profile.start_step={PROFILED[0]}", f"trainer.profile.steps={PROFILED[1]}"]
            step_seconds(2, [*LAYOUTS["dp_shard=2"][1], *window], Path(tmp) / "profiled", Path(tmp) / "corpus",
                         run("dp_shard=2"))
            own, waited = collective_split(Path(tmp) / "profiled")
    print(f"CPU peak (one thread, fp32 matmul) {peak / 1e9:.1f} GFLOP/s, the one-process run's MFU {mfu:.2f}; gloo "
          f"{gbps:.2f} GB/s, {latency_us:.0f} us a step; {args.rounds} rounds of {STEPS} steps; planner: "
          f"{' '.join(h for h in hardware[1:] if not h.startswith('plan.routing_metrics'))}; routing: the busiest "
          f"of 2 ep ranks takes {imbalance:.3f} x an even share of the rows")
    print(f"{'layout':18} {'median s':>9} {'spread':>7} {'predicted s':>12} {'measured/single':>16} "
          f"{'predicted/single':>17} {'meas/pred':>10}  predicted parts (s)")
    for name, times in measured.items():
        ratio = statistics.median(times) / base
        want = predicted[name].total / predicted["single"].total
        parts = " ".join(f"{part} {value:.3f}" for part, value in predicted[name].parts().items() if value)
        print(f"{name:18} {statistics.median(times):9.3f} {max(times) / min(times):7.2f} {predicted[name].total:12.3f} "
              f"{ratio:16.2f} {want:17.2f} {ratio / want:10.2f}  {parts}")
    if args.profile:
        added = statistics.median(measured["dp_shard=2"]) - statistics.median(measured["single, half rows"])
        print(f"dp_shard=2 adds {added:.3f} s a step to one process on half the rows (planner: "
              f"{predicted['dp_shard=2'].total - predicted['single, half rows'].total:.3f}). Profiled (steps "
              f"{PROFILED[0]}-{sum(PROFILED) - 1}, under the profiler): FSDP2's all-gathers and reduce-scatters take "
              f"{own:.3f} s a step on their own (planner: dp_exposed {predicted['dp_shard=2'].dp_exposed:.3f}) and a "
              f"rank waits {waited:.3f} s a step in them for the other rank")


if __name__ == "__main__":
    main()
