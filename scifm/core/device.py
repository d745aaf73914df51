"""Where a process computes, and in which precision: one rule for training, evaluation and the
lm-evaluation-harness adapter."""

from __future__ import annotations

import contextlib
import os

import torch

from scifm.core.errors import ConfigError


def pick_device(name: str, key: str) -> torch.device:
    """`name`: auto (this process's GPU when CUDA is available, else the CPU), cpu, cuda (this
    process's GPU: LOCAL_RANK under torchrun or srun) or cuda:N. `key` names the setting in errors."""
    local_gpu = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if name == "auto":
        return torch.device(local_gpu if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name} was asked for, but this torch build sees no CUDA device")
    try:
        return torch.device(local_gpu if name == "cuda" else name)
    except RuntimeError:
        raise ConfigError(f"{key}: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast where asked (or, with auto, on a GPU that supports it); fp32 otherwise. Under fp8
    the layers left out of FP8 run as under auto."""
    use_bf16 = precision == "bf16" or (
        precision in ("auto", "fp8") and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
