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


def rope_cos_sin(positions_BS: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, head_dim] (fp32) for explicit per-token positions.

    Positions are given rather than implied by the index so that packed documents each start at 0.
    Uses the rotate-half layout: frequency i drives dims i and i + head_dim/2.
    """
    dims_R = torch.arange(0, head_dim, 2, device=positions_BS.device, dtype=torch.float32)
    inv_freq_R = 1.0 / theta ** (dims_R / head_dim)
    angles_BSR = positions_BS.float()[..., None] * inv_freq_R
    angles_BSD = torch.cat([angles_BSR, angles_BSR], dim=-1)
    return angles_BSD.cos(), angles_BSD.sin()


def apply_rope(x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys; works for any number of (local) heads H."""
    x1, x2 = x_BSHD.float().chunk(2, dim=-1)
    rotated_BSHD = torch.cat([-x2, x1], dim=-1)
    cos_BS1D, sin_BS1D = cos_BSD[:, :, None, :], sin_BSD[:, :, None, :]
    return (x_BSHD.float() * cos_BS1D + rotated_BSHD * sin_BS1D).type_as(x_BSHD)
