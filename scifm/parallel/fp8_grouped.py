"""The routed experts' GEMMs in FP8 as grouped kernels (torch._scaled_grouped_mm, Hopper and Blackwell).

One kernel per GEMM over all experts, instead of a loop of per-expert scaled matmuls: e4m3 operands
with rowwise scales (fp32, one per row of the left operand and per expert and column of the right),
bf16 out, accumulated in the tensor cores' fast mode (use_fast_accum, as torchao's FP8 MoE training
does for all three GEMMs: Hopper's FP8 accumulator keeps fewer bits than fp32, and the K of these
GEMMs, 768 to 2048 or one expert's rows, is short enough that the rowwise quantization error, about
3.5%, dominates). Forward: x rows scaled over D, w per (expert, output column) over D. Backward: the
gradient's rows over F against w per (expert, input column) over F for grad x; for grad w, x and the
gradient per (expert, column) over that expert's rows.

The weight gradient sums over each expert's rows, and the kernel takes a group of rows at a 16-row
boundary only: every expert's rows are copied into a padded layout (zero rows between experts, at
least one block per expert so an expert with no rows gets an exact zero gradient) of a size fixed
by the shapes, so nothing waits on the counts. Zero rows add nothing to any product.

Shape suffixes as in moe.py, plus P padded rows.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
FAST_ACCUM = True  # module-level so that bench/gpu_step.py can measure a step without it
ALIGN = 16  # FP8 GEMMs take dimensions, and the grouped kernels group starts, in multiples of this


def grouped_fp8_supported(device: torch.device) -> bool:
    """torch's grouped FP8 GEMM runs on compute capability 9.0 (Hopper) and 10.0 (Blackwell)."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


class _PaddedLayout:
    """Where each expert-sorted row goes when each expert's rows start at a multiple of ALIGN."""

    def __init__(self, tokens_per_expert_E: torch.Tensor, n_rows: int):
        n_experts = tokens_per_expert_E.numel()
        padded_E = ((tokens_per_expert_E + ALIGN - 1) // ALIGN * ALIGN).clamp(min=ALIGN)
        end_E = torch.cumsum(padded_E, 0)
        shift_E = (end_E - padded_E) - (torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E)
        arange_A = torch.arange(n_rows, device=tokens_per_expert_E.device)
        self.dest_A = arange_A + torch.repeat_interleave(shift_E, tokens_per_expert_E, output_size=n_rows)
        self.offs_E = end_E.to(torch.int32)
        # a bound on end_E[-1] that the shapes fix; rows past it belong to no expert and stay zero
        self.n_padded = -(-(n_rows + n_experts * ALIGN) // ALIGN) * ALIGN
        self.n_experts = n_experts

    def pad(self, t_AX: torch.Tensor) -> torch.Tensor:
        return t_AX.new_zeros(self.n_padded, t_AX.shape[1]).index_copy_(0, self.dest_A, t_AX)

    def expert_of_block(self) -> torch.Tensor:
        """Expert of each ALIGN-row block of the padded rows (the blocks past the last expert count as its)."""
        first_row_B = torch.arange(0, self.n_padded, ALIGN, device=self.offs_E.device, dtype=torch.int32)
        return torch.searchsorted(self.offs_E, first_row_B, right=True).clamp(max=self.n_experts - 1)


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
def _rows(t_PX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major e4m3 with a scale per row (over X): the kernel's left operand and its inverse scales."""
    scale_P1 = scale_for(t_PX.abs().amax(dim=1, keepdim=True))
    return cast_scaled(t_PX, scale_P1), scale_P1.reciprocal().flatten()


@_fused_on_gpu
def _per_expert_columns(w_EXY: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w_EXY in e4m3 laid out column-major per expert, scaled per (expert, column y) over X."""
    scale_E1Y = scale_for(w_EXY.abs().amax(dim=1, keepdim=True))
    w8_EXY = cast_scaled(w_EXY, scale_E1Y)
    return w8_EXY.transpose(1, 2).contiguous().transpose(1, 2), scale_E1Y.reciprocal().squeeze(1)


@_fused_on_gpu
def _per_group_columns(t_PX: torch.Tensor, expert_B: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t_PX in e4m3 scaled per (expert, column x) over that expert's rows, transposed to (X, P)
    row-major; inverse scales (E, X). An expert's rows fill whole ALIGN-row blocks (expert_B is each
    block's), so the amax goes over blocks first and scatters ALIGN times fewer rows."""
    amax_BX = t_PX.abs().view(-1, ALIGN, t_PX.shape[1]).amax(dim=1).float()
    amax_EX = amax_BX.new_zeros(n_experts, t_PX.shape[1]).scatter_reduce_(
        0, expert_B[:, None].expand_as(amax_BX), amax_BX, "amax")
    scale_EX = scale_for(amax_EX)
    scale_PX = scale_EX[expert_B].repeat_interleave(ALIGN, dim=0)
    return cast_scaled(t_PX, scale_PX).t().contiguous(), scale_EX.reciprocal()


class _Fp8GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        layout = _PaddedLayout(tokens_per_expert_E, x_AD.shape[0])
        x_PD = layout.pad(x_AD)
        x8_PD, x_inv_P = _rows(x_PD)
        w8_EDF, w_inv_EF = _per_expert_columns(w_EDF)
        y_PF = torch._scaled_grouped_mm(x8_PD, w8_EDF, x_inv_P, w_inv_EF, offs=layout.offs_E,
                                        out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
        ctx.save_for_backward(x_PD, w_EDF)
        ctx.layout = layout
        return y_PF[layout.dest_A].to(x_AD.dtype)

    @staticmethod
    def backward(ctx, grad_AF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x_PD, w_EDF = ctx.saved_tensors
        layout = ctx.layout
        grad_PF = layout.pad(grad_AF.to(torch.bfloat16))
        # grad x = grad @ w^T: w^T per expert is (F, D), scaled per (expert, d) over F
        g8_PF, g_inv_P = _rows(grad_PF)
        wt8_EFD, wt_inv_ED = _per_expert_columns(w_EDF.transpose(1, 2))
        grad_x_PD = torch._scaled_grouped_mm(g8_PF, wt8_EFD, g_inv_P, wt_inv_ED, offs=layout.offs_E,
                                             out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
        # grad w[e] = x_e^T @ grad_e: both scaled per (expert, column) over that expert's rows
        expert_B = layout.expert_of_block()
        x8t_DP, x_inv_ED = _per_group_columns(x_PD, expert_B, layout.n_experts)
        g8t_FP, gc_inv_EF = _per_group_columns(grad_PF, expert_B, layout.n_experts)
        grad_w_EDF = torch._scaled_grouped_mm(x8t_DP, g8t_FP.t(), x_inv_ED.flatten(), gc_inv_EF.flatten(),
                                              offs=layout.offs_E, out_dtype=torch.bfloat16,
                                              use_fast_accum=FAST_ACCUM)
        return grad_x_PD[layout.dest_A].to(x_PD.dtype), grad_w_EDF.to(w_EDF.dtype), None


@torch.compiler.disable  # eager under parallel.compile: the padded layout depends on the counts
def fp8_grouped_gemm(x_AD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """GroupedExperts.expert_gemm under FP8 where grouped_fp8_supported: x_AD @ w_EDF[e] for each
    expert's rows, in x's dtype. w_EDF is quantized from its own precision (the fp32 master weight
    under autocast: no bf16 copy first), and its gradient comes back in it."""
    return _Fp8GroupedGemm.apply(x_AD, w_EDF, tokens_per_expert_E)
