"""What the step benches share: the two Qwen3-MoE-style shapes, a text-only batch in the form scifm's
runner takes, and one scifm training step as its trainer runs it (ModelRunner forward/backward with
the trainer's cross-entropy, gradient clipping, the AdamW that build_optimizer makes)."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from scifm.config import TrainerConfig
from scifm.model.config import ModelConfig, MoEConfig
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE
from scifm.parallel.runner import ModelRunner
from scifm.train.optim import build_optimizer
from scifm.train.step import scaled_cross_entropy

VOCAB = 8192
SHAPES = {  # qk-norm, no shared expert, every block MoE (as Qwen3-MoE)
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                  moe=MoEConfig(n_experts=16, top_k=2, expert_ffn=512, norm_topk_prob=True)),
    "big": dict(d_model=1024, n_layers=8, n_heads=8, n_kv_heads=2,
                moe=MoEConfig(n_experts=32, top_k=4, expert_ffn=512, norm_topk_prob=True)),
}
CLIP = 1.0  # scifm's and transformers' Trainer's default max gradient norm
IGNORE = -100


def model_config(shape: str, seq: int) -> ModelConfig:
    return ModelConfig(**SHAPES[shape], ffn_hidden=4 * SHAPES[shape]["d_model"], n_dense_layers=0, qk_norm=True,
                       vocab_size=VOCAB, max_seq_len=seq)


def build_model(cfg: ModelConfig) -> ScientificMoE:
    torch.manual_seed(0)
    model = ScientificMoE(cfg, {"total": VOCAB, "text": VOCAB, "latex": 256, "protein": 32})
    init_parameters(model, 0, cfg.init_std, cfg.n_layers)
    return model


@dataclass
class TextBatch:
    """Random token ids, one document per row; labels are the next ids (scifm's batches hold them shifted)."""

    input_ids: torch.Tensor

    @classmethod
    def random(cls, batch: int, seq: int, device: str = "cpu") -> TextBatch:
        ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
        return cls(ids.to(device))  # drawn on the CPU: the same ids on every device

    @property
    def labels(self) -> torch.Tensor:
        ignore = torch.full((self.input_ids.shape[0], 1), IGNORE, device=self.input_ids.device)
        return torch.cat([self.input_ids[:, 1:], ignore], dim=1)

    def model_kwargs(self) -> dict:
        B, S = self.input_ids.shape
        device = self.input_ids.device
        return {"positions_BS": torch.arange(S, device=device).expand(B, S),
                "doc_ids_BS": torch.zeros(B, S, dtype=torch.long, device=device)}

    def to(self, device: torch.device) -> TextBatch:
        return TextBatch(self.input_ids.to(device))


def autocast_of(precision: str, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that a timer around a step times the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scifm_optimizer(model: ScientificMoE) -> torch.optim.Optimizer:
    """The AdamW that scifm's trainer builds, with its defaults."""
    return build_optimizer(model, TrainerConfig())


def scifm_step(model: ScientificMoE, batch: TextBatch, precision: str, optimizer: torch.optim.Optimizer | None = None):
    """A callable running one training step on the batch's device. `optimizer`: one that the steps of
    several precisions over the same model share (AdamW's moments are per parameter, so one set
    serves them all, where a set each would hold the model's size twice more per precision); else
    one is made here."""
    device = batch.input_ids.device
    runner = ModelRunner(model, scaled_cross_entropy, autocast_of(precision, device.type), device)
    optimizer = scifm_optimizer(model) if optimizer is None else optimizer
    scale = 1.0 / float((batch.labels != IGNORE).sum())

    def step() -> None:
        runner.forward_backward([batch], scale)
        runner.clip_grad_norm(CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
    return step


def step_arguments(description: str, rounds: int) -> argparse.ArgumentParser:
    """The options both step benches take: shape, precisions, rounds, batch rows and sequence length."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    return parser
