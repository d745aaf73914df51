"""Grouped-GEMM experts against the per-expert loop, side by side in one run.

Prints, per shape, the forward+backward time of GroupedExperts with torch._grouped_mm and with
the per-expert fallback, and their ratio (< 1 means the grouped path is faster).
Run: python bench/moe_experts.py
"""

from __future__ import annotations

import time

import torch

from scifm.model.moe import GroupedExperts

SHAPES = [  # (experts, d_model, expert_ffn, routed assignments)
    (8, 128, 128, 8192),  # the tiny config: 16 x 256 tokens, top-2
    (64, 512, 256, 16384),
    (128, 256, 128, 16384),
]


def step_time(experts: GroupedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor, repeats: int) -> float:
    grad_AD = torch.randn_like(x_AD)  # a dense upstream gradient, as the router weighting gives
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        experts(x_AD, counts_E).backward(grad_AD)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    torch.manual_seed(0)
    print(f"{'E':>4} {'D':>5} {'F':>5} {'A':>6}  {'grouped ms':>10} {'loop ms':>8}  grouped/loop")
    for n_experts, dim, hidden, n_assign in SHAPES:
        experts = GroupedExperts(n_experts, dim, hidden)
        # skewed routing, as early in training: some experts get many tokens, some none
        load_E = torch.distributions.Dirichlet(torch.full((n_experts,), 0.5)).sample()
        counts_E = torch.bincount(torch.multinomial(load_E, n_assign, replacement=True), minlength=n_experts)
        x_AD = torch.randn(n_assign, dim, requires_grad=True)
        times = {}
        for grouped in (True, False):
            experts.use_grouped_mm = grouped
            step_time(experts, x_AD, counts_E, 2)  # warm-up
            times[grouped] = step_time(experts, x_AD, counts_E, 5)
        print(f"{n_experts:>4} {dim:>5} {hidden:>5} {n_assign:>6}  {times[True] * 1e3:>10.1f} "
              f"{times[False] * 1e3:>8.1f}  {times[True] / times[False]:.2f}")


if __name__ == "__main__":
    main()
