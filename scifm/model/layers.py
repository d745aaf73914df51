"""Building blocks shared by the decoder: RMSNorm, the SwiGLU feed-forward and rotary embeddings.

Shape suffixes: B batch, S sequence, H heads, D the last (feature) dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: bf16 sums of squares lose too much precision
        normed_BSD = F.rms_norm(x_BSD.float(), (x_BSD.shape[-1],), eps=self.eps)
        return normed_BSD.type_as(x_BSD) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); used for dense blocks and for shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BSD)) * self.w3(x_BSD))


def rope_cos_sin(
    positions_BS: torch.Tensor, rotary_dim: int, theta: float, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, rotary_dim] (fp32) for explicit per-token positions.

    Positions are given rather than implied by the index so that packed documents each start at 0.
    Uses the rotate-half layout: frequency i drives dims i and i + rotary_dim/2. `scaling` > 1
    stretches positions linearly (position interpolation) by dividing every frequency by it.
    """
    dims_R = torch.arange(0, rotary_dim, 2, device=positions_BS.device, dtype=torch.float32)
    inv_freq_R = 1.0 / theta ** (dims_R / rotary_dim)
    if scaling != 1.0:
        inv_freq_R = inv_freq_R / scaling
    angles_BSR = positions_BS.float()[..., None] * inv_freq_R
    angles_BSD = torch.cat([angles_BSR, angles_BSR], dim=-1)
    return angles_BSD.cos(), angles_BSD.sin()


def apply_rope(x_BSHD: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R = cos.shape[-1] dims of queries or keys (partial RoPE leaves the rest);
    works for any number of (local) heads H."""
    R = cos_BSR.shape[-1]
    x_BSHD32 = x_BSHD.float()
    rot_BSHR, rest_BSHP = x_BSHD32[..., :R], x_BSHD32[..., R:]
    x1, x2 = rot_BSHR.chunk(2, dim=-1)
    rotated_BSHR = torch.cat([-x2, x1], dim=-1)
    cos_BS1R, sin_BS1R = cos_BSR[:, :, None, :], sin_BSR[:, :, None, :]
    out_BSHR = rot_BSHR * cos_BS1R + rotated_BSHR * sin_BS1R
    if rest_BSHP.shape[-1]:
        out_BSHR = torch.cat([out_BSHR, rest_BSHP], dim=-1)
    return out_BSHR.type_as(x_BSHD)
