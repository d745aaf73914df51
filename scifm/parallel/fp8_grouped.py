"""The routed experts' GEMMs in FP8 as grouped kernels (torch._scaled_grouped_mm, Hopper and Blackwell).

One kernel per GEMM over all experts, instead of a loop of per-expert scaled matmuls: e4m3 operands
with rowwise scales (fp32, one per row of the left operand and per expert and column of the right),
bf16 out, accumulated in the tensor cores' fast mode (use_fast_accum, as torchao's FP8 MoE training
does: Hopper's FP8 accumulator keeps fewer bits than fp32, and over these short reductions, 768 or
2048 terms, the rowwise quantization's error, about 3.5%, dominates; on an H200 the kernels take a
third of the time without it). Forward: x rows scaled over D, w per (expert, output column) over D.
Backward, grad x: the gradient's rows over F against w per (expert, input column) over F.

The weight gradient is a bf16 grouped GEMM (torch._grouped_mm), not an FP8 one. Measured on an H200
at Qwen3-30B-A3B's expert shape (128 experts of 2048 x 768, about 512 rows each): the bf16 kernel
takes 0.41 ms, the FP8 one 0.53 ms before its operands are quantized per expert and column over each
expert's rows, and padded so that every expert's rows start at a 16-row boundary (what an FP8 kernel
whose groups run along the reduced dimension takes), about 2 ms more (bench/fp8_grouped_gemm.py).
The forward and grad-x kernels group the rows of their left operand, which need no such boundary, so
nothing is padded or gathered.

Shape suffixes as in moe.py.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn


def grouped_fp8_supported(device: torch.device) -> bool:
    """torch's grouped FP8 GEMM runs on compute capability 9.0 (Hopper) and 10.0 (Blackwell)."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


def _fused_on_gpu(fn):
    """Runs `fn` compiled on a GPU, so that each quantization's abs, amax, scale, clamp and cast are
    one or two kernels instead of a pass over memory each; eager elsewhere (a CPU runs these only
    in tests, through a stand-in kernel). Compiled at the first GPU call, not at import."""
    compiled = None

    def run(t: torch.Tensor, *args):
        nonlocal compiled
        if not t.is_cuda:
            return fn(t, *args)
        if compiled is None:
            compiled = torch.compile(fn)  # static shapes first; a new row count (under EP) recompiles once, dynamic
        return compiled(t, *args)

    return run


def scale_for(amax: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """The scale that maps amax onto dtype's largest value (fp32; an all-zero tensor gets a finite one)."""
    return torch.finfo(dtype).max / amax.float().clamp(min=1e-12)


def cast_scaled(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """t times scale in dtype, clamped first: a float8 cast does not saturate."""
    fmax = torch.finfo(dtype).max
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype)


@_fused_on_gpu
def _rows(t_NX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major e4m3 with a scale per row (over X): the kernel's left operand and its inverse scales."""
    scale_N1 = scale_for(t_NX.abs().amax(dim=1, keepdim=True))
    return cast_scaled(t_NX, scale_N1), scale_N1.reciprocal().flatten()


@_fused_on_gpu
def _per_expert_columns(w_EXY: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w_EXY in e4m3 laid out column-major per expert, scaled per (expert, column y) over X."""
    scale_E1Y = scale_for(w_EXY.abs().amax(dim=1, keepdim=True))
    w8_EXY = cast_scaled(w_EXY, scale_E1Y)
    return w8_EXY.transpose(1, 2).contiguous().transpose(1, 2), scale_E1Y.reciprocal().squeeze(1)


def _scaled_grouped_mm(a8_MK: torch.Tensor, b8_EKN: torch.Tensor, a_inv_M: torch.Tensor, b_inv_EN: torch.Tensor,
                       offs_E: torch.Tensor) -> torch.Tensor:
    return torch._scaled_grouped_mm(a8_MK, b8_EKN, a_inv_M, b_inv_EN, offs=offs_E, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)


class _Fp8GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        offs_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        x8_AD, x_inv_A = _rows(x_AD)
        w8_EDF, w_inv_EF = _per_expert_columns(w_EDF)
        ctx.save_for_backward(x_AD, w_EDF, offs_E)
        return _scaled_grouped_mm(x8_AD, w8_EDF, x_inv_A, w_inv_EF, offs_E).to(x_AD.dtype)

    @staticmethod
    def backward(ctx, grad_AF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x_AD, w_EDF, offs_E = ctx.saved_tensors
        grad_AF = grad_AF.to(torch.bfloat16)
        # grad x = grad @ w^T: w^T per expert is (F, D), scaled per (expert, d) over F
        g8_AF, g_inv_A = _rows(grad_AF)
        wt8_EFD, wt_inv_ED = _per_expert_columns(w_EDF.transpose(1, 2))
        grad_x_AD = _scaled_grouped_mm(g8_AF, wt8_EFD, g_inv_A, wt_inv_ED, offs_E)
        # grad w[e] = x_e^T @ grad_e in bf16; an expert without rows gets zeros
        grad_w_EDF = torch._grouped_mm(x_AD.to(torch.bfloat16).t(), grad_AF, offs=offs_E)
        return grad_x_AD.to(x_AD.dtype), grad_w_EDF.to(w_EDF.dtype), None


@torch.compiler.disable  # eager under parallel.compile: its quantizers are compiled graphs of their own
def fp8_grouped_gemm(x_AD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """GroupedExperts.expert_gemm under FP8 where grouped_fp8_supported: x_AD @ w_EDF[e] for each
    expert's rows, in x's dtype. w_EDF is quantized from its own precision (the fp32 master weight
    under autocast: no bf16 copy first), and its gradient comes back in it."""
    return _Fp8GroupedGemm.apply(x_AD, w_EDF, tokens_per_expert_E)
