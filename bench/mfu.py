"""Model FLOP utilisation of scifm's training step: model FLOP/s (scifm/model/flops.py, printed by
part) over this machine's matmul peak, measured in the same run by a 2048^3 matmul in the same dtype,
alternated with the steps so that load on the machine hits both alike. With --compile, each
precision also runs with parallel.compile's per-block torch.compile (a copy of the same model).
Prints per variant the step's median, the peak's median, their spreads (max / min over rounds) and MFU.
Run: python bench/mfu.py [--shape small|big] [--precisions fp32 bf16] [--compile] [--rounds 5] [--batch 4]
     [--seq 512]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from scifm.core.host_memory import keep_freed_host_memory
from scifm.model.flops import TRAIN_PASSES, decoder_forward_flops
from scifm.parallel.fsdp import apply_compile
from text_step import VOCAB, TextBatch, build_model, model_config, scifm_optimizer, scifm_step, step_arguments

PEAK_N = 2048


def matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    t0 = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - t0


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0], rounds=5)
    parser.add_argument("--compile", action="store_true", help="also time parallel.compile=true")
    args = parser.parse_args()
    keep_freed_host_memory()  # as the trainer does on CPU
    cfg = model_config(args.shape, args.seq)
    model = build_model(cfg)
    batch = TextBatch.random(args.batch, args.seq)
    parts = decoder_forward_flops(cfg, args.seq, VOCAB)
    step_flops = TRAIN_PASSES * sum(parts.values()) * args.batch * args.seq

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    models = {"eager": model}
    if args.compile:
        models["compiled"] = copy.deepcopy(model)
        apply_compile(models["compiled"])
    optimizers = {mode: scifm_optimizer(m) for mode, m in models.items()}  # one per model, shared by its precisions
    steps = {(p, mode): scifm_step(m, batch, p, optimizers[mode]) for p in args.precisions for mode, m in models.items()}
    operands = {p: (torch.randn(PEAK_N, PEAK_N, dtype=dtypes[p]), torch.randn(PEAK_N, PEAK_N, dtype=dtypes[p]))
                for p in args.precisions}
    for (p, _), step in steps.items():  # warm-up (and compilation)
        step()
        matmul_seconds(*operands[p])
    step_t: dict[tuple, list[float]] = {v: [] for v in steps}
    peak_t: dict[tuple, list[float]] = {v: [] for v in steps}
    for _ in range(args.rounds):
        for (p, mode), step in steps.items():
            t0 = time.perf_counter()
            step()
            step_t[p, mode].append(time.perf_counter() - t0)
            peak_t[p, mode].append(matmul_seconds(*operands[p]))

    print(f"shape {args.shape}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.moe.n_experts} experts "
          f"top-{cfg.moe.top_k}, batch {args.batch} x {args.seq}; {args.rounds} rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model FLOPs per step = {TRAIN_PASSES} (forward + backward) x tokens {args.batch * args.seq} x "
          f"forward FLOPs per token {sum(parts.values()) / 1e6:.1f}M:")
    for name, flops in parts.items():
        print(f"  {name:28s} {flops / 1e6:8.2f}M")
    print(f"  = {step_flops / 1e9:.1f} GFLOP per step; peak = 2 x {PEAK_N}^3 FLOPs / time of one {PEAK_N}^3 matmul")
    for (p, mode), times in step_t.items():
        step, peak = statistics.median(times), statistics.median(peak_t[p, mode])
        peak_flops = 2 * PEAK_N**3 / peak
        print(f"{p} {mode}: step {step * 1e3:.0f} ms (spread {max(times) / min(times):.2f}), "
              f"model {step_flops / step / 1e9:.1f} GFLOP/s; peak {peak_flops / 1e9:.1f} GFLOP/s "
              f"(spread {max(peak_t[p, mode]) / min(peak_t[p, mode]):.2f}); MFU {step_flops / step / peak_flops:.1%}")
        if step_flops / step > peak_flops:  # e.g. bf16 on a CPU without bf16 instructions
            print(f"  the {PEAK_N}^3 {p} matmul runs slower than the model's own matmuls here: no meaningful peak")


if __name__ == "__main__":
    main()
