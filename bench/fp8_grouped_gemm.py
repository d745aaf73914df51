"""The routed experts' GEMMs alone on a GPU, piece by piece: each of the three grouped GEMMs of a
training step in bf16 and in FP8 (with and without fast accumulation), what the FP8 path adds around
them, and a layout not yet used, at Qwen3-30B-A3B's expert shape.

Rows are 8192 tokens (--tokens) x top-8 assignments spread over 128 experts by a random routing;
D = 2048, F = 768. Variants alternate within each round; each round times `--iters` calls after a
warm-up, and the medians over rounds, their spread (max / min) and the ratios are printed.

  {bf16,fp8}_fwd_bwd   forward and backward of one expert GEMM: torch._grouped_mm's autograd against
                       scifm.parallel.fp8_grouped.fp8_grouped_gemm (fp32 master weights)
  {bf16,fp8,fp8_precise}_{fwd,grad_x,grad_w}
                       one kernel: torch._grouped_mm, torch._scaled_grouped_mm on operands quantized
                       beforehand with use_fast_accum=True (scifm's), and with False. scifm computes
                       the weight gradient in bf16; fp8_grad_w is the FP8 kernel it would take instead
                       (each expert's rows padded to a 16-row boundary, scaled per expert and column)
  {bf16,fp8}_fwd_2f    the gate and up projections as one GEMM of width 2F (against two of width F)
  rows_x, columns_w, grad_w_to_fp32
                       quantizing x by rows and w by (expert, column), and the weight gradient's cast
                       from bf16 to the fp32 master's dtype

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


def padded_per_expert_columns(t_AX: torch.Tensor, counts_E: torch.Tensor) -> tuple:
    """The FP8 weight gradient's operand (setup, untimed): each expert's rows from a 16-row boundary
    (at least one block), in e4m3 scaled per (expert, column) over its rows, as (X, P) row-major."""
    blocks = [max(-(-n // 16), 1) * 16 for n in counts_E.tolist()]
    out_XP = t_AX.new_zeros(t_AX.shape[1], sum(blocks), dtype=fp8_grouped.E4M3)
    inv_EX = torch.ones(len(blocks), t_AX.shape[1], device=t_AX.device)
    src = dst = 0
    for e, (n, b) in enumerate(zip(counts_E.tolist(), blocks)):
        if n:
            chunk_nX = t_AX[src:src + n].float()
            scale_X = fp8_grouped.scale_for(chunk_nX.abs().amax(dim=0))
            out_XP[:, dst:dst + n] = fp8_grouped.cast_scaled(chunk_nX, scale_X).t()
            inv_EX[e] = scale_X.reciprocal()
        src, dst = src + n, dst + b
    return out_XP, inv_EX.flatten(), torch.tensor(blocks, device=t_AX.device).cumsum(0).to(torch.int32)


def variants(rows: int, d: int, f: int, counts_E: torch.Tensor, device: torch.device) -> dict:
    """name -> (callable, GEMM FLOPs per call or 0)."""
    g = fp8_grouped
    x = torch.randn(rows, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    w32 = (torch.randn(counts_E.numel(), d, f, device=device) / d**0.5).requires_grad_()
    w16 = w32.detach().bfloat16().requires_grad_()
    grad = torch.randn(rows, f, device=device, dtype=torch.bfloat16)
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
    x8, x_inv = g._rows(x.detach())
    w8, w_inv = g._per_expert_columns(w32.detach())
    g8, g_inv = g._rows(grad)
    wt8, wt_inv = g._per_expert_columns(w32.detach().transpose(1, 2))
    x8t, xc_inv, padded_offs = padded_per_expert_columns(x.detach(), counts_E)
    g8t, gc_inv, _ = padded_per_expert_columns(grad, counts_E)
    w8_2f, w_inv_2f = g._per_expert_columns(torch.cat([w32.detach(), w32.detach()], dim=2))
    w16_2f = torch.cat([w16.detach(), w16.detach()], dim=2)
    flops = 2 * rows * d * f

    def scaled(a, b, sa, sb, fast, o=offs):
        return lambda: torch._scaled_grouped_mm(a, b, sa, sb, offs=o, out_dtype=torch.bfloat16, use_fast_accum=fast)

    fns = {
        "bf16_fwd_bwd": (lambda: torch._grouped_mm(x, w16, offs=offs).backward(grad), 3 * flops),
        "fp8_fwd_bwd": (lambda: g.fp8_grouped_gemm(x, w32, counts_E).backward(grad), 3 * flops),
        "bf16_fwd": (lambda: torch._grouped_mm(x.detach(), w16.detach(), offs=offs), flops),
        "bf16_grad_x": (lambda: torch._grouped_mm(grad, w16.detach().transpose(1, 2), offs=offs), flops),
        "bf16_grad_w": (lambda: torch._grouped_mm(x.detach().t(), grad, offs=offs), flops),
        "bf16_fwd_2f": (lambda: torch._grouped_mm(x.detach(), w16_2f, offs=offs), 2 * flops),
        "fp8_fwd_2f": (scaled(x8, w8_2f, x_inv, w_inv_2f, True), 2 * flops),
        "rows_x": (lambda: g._rows(x.detach()), 0),
        "columns_w": (lambda: g._per_expert_columns(w32.detach()), 0),
        "grad_w_to_fp32": (lambda: w16.detach().to(torch.float32), 0),
    }
    for fast, prefix in ((True, "fp8"), (False, "fp8_precise")):
        fns[f"{prefix}_fwd"] = (scaled(x8, w8, x_inv, w_inv, fast), flops)
        fns[f"{prefix}_grad_x"] = (scaled(g8, wt8, g_inv, wt_inv, fast), flops)
        fns[f"{prefix}_grad_w"] = (scaled(x8t, g8t.t(), xc_inv, gc_inv, fast, padded_offs), flops)
    return fns


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
        for name, (fn, _) in list(fns.items()):
            try:
                times[name].append(timer(fn, args.iters, device))
            except RuntimeError as e:  # one variant the kernel refuses must not lose the others
                print(f"{name}: failed: {str(e).splitlines()[0]}")
                del fns[name], times[name]
    print(f"rows {rows}, experts {args.experts} (rows each {int(counts_E.min())} to {int(counts_E.max())}), "
          f"D {args.d}, F {args.f}; {args.rounds} rounds of {args.iters} calls")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        flops = fns[name][1]
        rate = f"{flops / med[name] / 1e12:7.1f} TFLOP/s" if flops else " " * 15
        print(f"{name:18s} {med[name] * 1e3:8.3f} ms  {rate}  spread {max(t) / min(t):.2f}")

    def ratio(a: str, b: str, times_b: int = 1) -> None:
        if a in med and b in med:
            print(f"{a} / {'2 x ' if times_b == 2 else ''}{b} time: {med[a] / (times_b * med[b]):.2f}")

    ratio("fp8_fwd_bwd", "bf16_fwd_bwd")
    for kind in ("fwd", "grad_x", "grad_w"):
        ratio(f"fp8_{kind}", f"bf16_{kind}")
        ratio(f"fp8_{kind}", f"fp8_precise_{kind}")
    ratio("fp8_fwd_2f", "fp8_fwd", 2)
    ratio("bf16_fwd_2f", "bf16_fwd", 2)


if __name__ == "__main__":
    main()
