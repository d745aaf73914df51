"""Grouped-GEMM experts against the per-expert loop, side by side in one run.

For each shape, forward + backward of GroupedExperts with torch._grouped_mm and with the per-expert
loop (the path taken where no grouped GEMM works), on the same weights and tokens. Each round times
both, in turn, the order flipped every other round, so that load on the machine hits them alike.
Prints the medians, the spread (max / min over rounds) of each, and grouped / loop (< 1: the grouped
GEMM is faster), in fp32 and under bf16 autocast (as trainer.precision=bf16 runs the experts).
Routing is skewed, as early in training: some experts get many tokens, some none. Freed host memory
stays in the process, as the trainer keeps it on CPU (scifm/core/host_memory.py).
Run: python bench/moe_experts.py [--rounds 7] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from scifm.core.host_memory import keep_freed_host_memory
from scifm.model.moe import GroupedExperts

SHAPES = [  # (experts, d_model, expert_ffn, routed assignments)
    (8, 128, 128, 8192),  # the tiny config: 16 x 256 tokens, top-2
    (16, 512, 512, 4096),  # bench/step_vs_transformers.py's small shape: 4 x 512 tokens, top-2
    (32, 1024, 512, 8192),  # its big shape: top-4
    (64, 512, 256, 16384),
    (128, 256, 128, 16384),
]


def one_step(experts: GroupedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor, grad_AD: torch.Tensor,
             precision: str) -> float:
    autocast = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    experts.zero_grad(set_to_none=True)  # each step writes fresh gradients, as a training step's first micro-batch
    x_AD.grad = None
    t0 = time.perf_counter()
    with autocast:
        y_AD = experts(x_AD, counts_E)
    y_AD.backward(grad_AD.to(y_AD.dtype))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    args = parser.parse_args()
    keep_freed_host_memory()
    torch.manual_seed(0)
    print(f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "median ms (spread) of forward + backward")
    print(f"{'precision':>9} {'E':>4} {'D':>5} {'F':>5} {'A':>6}  {'grouped':>16} {'loop':>16}  grouped/loop")
    for precision in args.precisions:
        for n_experts, dim, hidden, n_assign in SHAPES:
            experts = GroupedExperts(n_experts, dim, hidden)
            load_E = torch.distributions.Dirichlet(torch.full((n_experts,), 0.5)).sample()
            counts_E = torch.bincount(torch.multinomial(load_E, n_assign, replacement=True), minlength=n_experts)
            x_AD = torch.randn(n_assign, dim, requires_grad=True)
            grad_AD = torch.randn(n_assign, dim)  # a dense upstream gradient, as the router weighting gives
            times: dict[bool, list[float]] = {True: [], False: []}
            for r in range(args.rounds + 1):  # round 0 warms both paths up and is not kept
                for grouped in ((True, False) if r % 2 else (False, True)):
                    experts.use_grouped_mm = grouped
                    seconds = one_step(experts, x_AD, counts_E, grad_AD, precision)
                    if r:
                        times[grouped].append(seconds)
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = [f"{med[k] * 1e3:9.1f} ({max(v) / min(v):4.2f})" for k, v in times.items()]
            print(f"{precision:>9} {n_experts:>4} {dim:>5} {hidden:>5} {n_assign:>6}  {cells[0]:>16} {cells[1]:>16}  "
                  f"{med[True] / med[False]:.2f}")


if __name__ == "__main__":
    main()
