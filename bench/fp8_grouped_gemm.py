"""The routed experts' GEMM alone on a GPU: scifm's grouped FP8 GEMM against bf16's grouped GEMM, and
the FP8 kernel with and without fast accumulation, at Qwen3-30B-A3B's expert shape.

Rows are 8192 tokens x top-8 assignments spread over 128 experts by a random routing; D = 2048,
F = 768. Variants alternate within each round; each round times `--iters` calls after a warm-up,
and the medians over rounds, their spread (max / min) and the ratios are printed.

  bf16_fwd_bwd     torch._grouped_mm forward and backward (what bf16 training runs per GEMM)
  fp8_fwd_bwd      scifm.parallel.fp8_grouped.fp8_grouped_gemm forward and backward, fp32 weights
  bf16_kernel      one torch._grouped_mm call
  fp8_kernel       one torch._scaled_grouped_mm call on operands quantized beforehand
  fp8_kernel_fast  the same with use_fast_accum=True (torchao's choice; scifm calls the default)

  python bench/fp8_grouped_gemm.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpu_step import qwen3_30b_a3b_shape
from scifm.parallel import fp8_grouped
from text_step import synchronize


def routed_counts(tokens: int, top_k: int, experts: int, device: torch.device) -> torch.Tensor:
    torch.manual_seed(0)
    choice = torch.rand(tokens, experts, device=device).topk(top_k, dim=1).indices
    return torch.bincount(choice.flatten(), minlength=experts)


def timer(fn, iters: int, device: torch.device) -> float:
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / iters


def variants(rows: int, d: int, f: int, counts_E: torch.Tensor, device: torch.device) -> dict:
    x = torch.randn(rows, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    w32 = (torch.randn(counts_E.numel(), d, f, device=device) / d**0.5).requires_grad_()
    w16 = w32.detach().bfloat16().requires_grad_()
    grad = torch.randn(rows, f, device=device, dtype=torch.bfloat16)
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
    layout = fp8_grouped._PaddedLayout(counts_E, rows)
    x8, x_inv = fp8_grouped._rows(layout.pad(x.detach()))
    w8, w_inv = fp8_grouped._per_expert_columns(w32.detach())

    def bf16_fwd_bwd():
        torch._grouped_mm(x, w16, offs=offs).backward(grad)

    def fp8_fwd_bwd():
        fp8_grouped.fp8_grouped_gemm(x, w32, counts_E).backward(grad)

    def fp8_kernel(fast: bool):
        return lambda: torch._scaled_grouped_mm(x8, w8, x_inv, w_inv, offs=layout.offs_E, out_dtype=torch.bfloat16,
                                                use_fast_accum=fast)

    return {"bf16_fwd_bwd": bf16_fwd_bwd, "fp8_fwd_bwd": fp8_fwd_bwd,
            "bf16_kernel": lambda: torch._grouped_mm(x.detach(), w16.detach(), offs=offs),
            "fp8_kernel": fp8_kernel(False), "fp8_kernel_fast": fp8_kernel(True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape = qwen3_30b_a3b_shape(layers=1, seq=4096)  # gpu_step.py's model: its batch of 2 x 4096 tokens
    parser.add_argument("--tokens", type=int, default=2 * 4096)
    parser.add_argument("--top-k", type=int, default=shape.moe.top_k)
    parser.add_argument("--experts", type=int, default=shape.moe.n_experts)
    parser.add_argument("--d", type=int, default=shape.d_model)
    parser.add_argument("--f", type=int, default=shape.moe.expert_ffn)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not fp8_grouped.grouped_fp8_supported(device):
        raise SystemExit("fp8_grouped_gemm.py: needs a GPU where torch._scaled_grouped_mm runs (compute capability 9.0 or 10.0)")
    counts_E = routed_counts(args.tokens, args.top_k, args.experts, device)
    rows = args.tokens * args.top_k
    fns = variants(rows, args.d, args.f, counts_E, device)
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn, args.iters, device))
    flops = 2 * rows * args.d * args.f
    print(f"rows {rows}, experts {args.experts} (rows each {int(counts_E.min())} to {int(counts_E.max())}), "
          f"D {args.d}, F {args.f}; {args.rounds} rounds of {args.iters} calls")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        gemms = 3 if name.endswith("fwd_bwd") else 1
        print(f"{name:16s} {med[name] * 1e3:8.3f} ms  {gemms * flops / med[name] / 1e12:7.1f} TFLOP/s  "
              f"spread {max(t) / min(t):.2f}")
    print(f"fp8_fwd_bwd / bf16_fwd_bwd time: {med['fp8_fwd_bwd'] / med['bf16_fwd_bwd']:.2f}")
    print(f"fp8_kernel / bf16_kernel time: {med['fp8_kernel'] / med['bf16_kernel']:.2f}")
    print(f"fp8_kernel_fast / fp8_kernel time: {med['fp8_kernel_fast'] / med['fp8_kernel']:.2f}")


if __name__ == "__main__":
    main()
