"""The experts' grouped FP8 GEMMs (scifm/parallel/fp8_grouped.py) against fp32 GEMMs, forward and
backward: on a CPU through a stand-in for torch._scaled_grouped_mm (which runs on Hopper and
Blackwell GPUs only) that enforces the kernel's contract as torch's source states it and computes
in fp32; on a GPU through the kernel itself.

Tolerance: 6% relative (Frobenius) error for the FP8 products (forward and grad x). Every operand is
e4m3 with rowwise scales: 3 mantissa bits, so one rounding is off by up to 2^-4 = 6.25% of a value
and by about 2% on average, and a product's sum over 48 to 64 terms averages much of that away
(measured through the stand-in: 3.6% forward, 3.5% grad x). The weight gradient is a bf16 GEMM: 1%
(8 mantissa bits, 2^-9 = 0.2% a rounding; measured 0.23%), so an FP8 weight gradient (3.4% when it
was one) fails it. A wrong layout, scale or group boundary is off by O(1).
"""

from __future__ import annotations

import pytest
import torch

from scifm.model.moe import GroupedExperts, looped_gemm
from scifm.parallel import fp8, fp8_grouped
from scifm.parallel.fp8_config import Fp8Config
from scifm.parallel.fp8_grouped import fp8_grouped_gemm

TOLERANCE = 0.06
BF16_TOLERANCE = 0.01
COUNTS = [0, 37, 1, 16, 90, 0, 3, 13]  # empty experts, and counts off the kernel's 16-row blocks


def stand_in_scaled_grouped_mm(calls: list[str]):
    """torch._scaled_grouped_mm's rowwise FP8 contract for groups of the left operand's rows against
    one weight each (aten/src/ATen/native/cuda/GroupedBlas.cpp and GroupMMCommon.cuh, the only form
    fp8_grouped.py calls), computed in fp32. Rows past the last group are left unspecified (NaN
    here, as unwritten memory could be)."""

    def kernel(a, b, scale_a, scale_b, offs=None, out_dtype=None, use_fast_accum=False):
        assert a.dtype == b.dtype == torch.float8_e4m3fn and out_dtype == torch.bfloat16
        assert a.stride(-1) == 1 and b.stride(-2) == 1, "a row-major, b column-major"
        assert a.shape[-1] % 16 == 0 and b.shape[-2] % 16 == 0 and b.shape[-1] % 16 == 0
        assert a.dim() == 2 and b.dim() == 3 and offs.dtype == torch.int32 and offs.shape == (b.shape[0],)
        assert scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.shape == (a.shape[0],) and scale_b.shape == (b.shape[0], b.shape[2])
        calls.append("2d-3d")
        ends = offs.tolist()
        out = torch.full((a.shape[0], b.shape[2]), float("nan"))
        for g, (s, e) in enumerate(zip([0] + ends[:-1], ends)):
            out[s:e] = (a[s:e].float() * scale_a[s:e, None]) @ (b[g].float() * scale_b[g])
        return out.to(out_dtype)

    return kernel


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def check_against_fp32(device: str) -> dict[str, float]:
    torch.manual_seed(0)
    counts = torch.tensor(COUNTS, device=device)
    x = torch.randn(sum(COUNTS), 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(len(COUNTS), 64, 48, device=device) / 8).requires_grad_()
    grad = torch.randn(sum(COUNTS), 48, device=device)
    y = fp8_grouped_gemm(x, w, counts)
    y.backward(grad.to(y.dtype))
    x32, w32 = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    want = looped_gemm(x32, w32, counts)
    want.backward(grad)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    for e, n in enumerate(COUNTS):
        if n == 0:  # an expert without rows: an exact zero gradient, not whatever the kernel left
            assert torch.equal(w.grad[e], torch.zeros_like(w.grad[e]))
    errors = {"y": relative_error(y, want), "grad_x": relative_error(x.grad, x32.grad),
              "grad_w": relative_error(w.grad, w32.grad)}
    assert errors["y"] < TOLERANCE and errors["grad_x"] < TOLERANCE and errors["grad_w"] < BF16_TOLERANCE, errors
    return errors


def test_grouped_fp8_gemm_matches_fp32_through_the_kernels_contract(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "_scaled_grouped_mm", stand_in_scaled_grouped_mm(calls), raising=False)
    print(check_against_fp32("cpu"))  # the errors the module docstring cites (pytest -s)
    assert calls == ["2d-3d", "2d-3d"]  # forward; grad x (grad w is a bf16 grouped GEMM)


def test_where_the_kernel_runs_the_experts_take_it_under_autocast(monkeypatch):
    """apply_fp8 on a GPU that has the kernel (stood in for here) gives the experts the grouped GEMMs;
    they run under bf16 autocast (as precision=fp8 does on a GPU) from fp32 master weights."""
    calls = []
    monkeypatch.setattr(torch, "_scaled_grouped_mm", stand_in_scaled_grouped_mm(calls), raising=False)
    monkeypatch.setattr(fp8, "grouped_fp8_supported", lambda device: True)
    torch.manual_seed(0)
    experts, reference = GroupedExperts(len(COUNTS), 64, 48), GroupedExperts(len(COUNTS), 64, 48)
    reference.load_state_dict(experts.state_dict())
    conversion = fp8.apply_fp8(torch.nn.ModuleDict({"experts": experts}), Fp8Config(), torch.device("cpu"))
    assert experts.expert_gemm is fp8_grouped_gemm
    assert "grouped GEMMs, rowwise scales, bf16 weight gradient" in conversion.describe()
    x = torch.randn(sum(COUNTS), 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, torch.tensor(COUNTS))
    y.float().square().sum().backward()
    want = reference(x, torch.tensor(COUNTS))
    want.square().sum().backward()
    assert len(calls) == 6  # three GEMMs, each once forward and once backward (grad x)
    # SwiGLU chains two FP8 GEMMs in bf16: about twice one GEMM's error (measured 6.2% for y, 6.0% and 6.4%
    # for the gradients of w1 and w2)
    assert relative_error(y, want) < 0.1
    for got, ref in ((experts.w1.grad, reference.w1.grad), (experts.w2.grad, reference.w2.grad)):
        assert relative_error(got, ref) < 0.1


@pytest.mark.gpu
def test_grouped_fp8_gemm_matches_fp32_on_the_gpu():
    if not fp8_grouped.grouped_fp8_supported(torch.device("cuda")):
        pytest.skip("torch._scaled_grouped_mm runs on compute capability 9.0 and 10.0 only")
    print(check_against_fp32("cuda"))
