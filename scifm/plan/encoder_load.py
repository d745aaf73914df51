"""The modality encoders' share of a step, measured on items drawn from the run's own data.

How many items a micro-batch holds and how long each one is belong to the data, not to the model,
so no formula over the config can give them. The planner draws the first plan.sample_steps x
trainer.grad_accum micro-batches that data-parallel rank 0 of a layout's data-parallel size would
train on (the training loader, with the tokenizer plan.tokenizer names) and runs the run's
encoders over each under FakeTensorMode: shapes only, no memory and no arithmetic, yet the same
kernels chosen as on a real CPU tensor (SDPA's flash kernel, which keeps only its output and
log-sum-exp for backward, as the GPU's kernels do). It counts the bytes of the tensors autograd
saves that are not parameters, and the forward FLOPs (torch's FlopCounterMode).

Memory takes the fullest micro-batch seen: a layout has to fit the worst one. Time takes the mean.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from scifm.config import RunConfig
from scifm.data.loader import PackedLoader
from scifm.data.streams import resolve_sources
from scifm.model.encoders import build_encoders
from scifm.model.multimodal import vocab_sizes_of
from scifm.tokenizers.scientific import ScientificTokenizer


@dataclass(frozen=True)
class EncoderLoad:
    """The encoders over one data-parallel rank's micro-batches."""

    saved_bytes: int  # the most any sampled micro-batch's encoders keep for backward
    forward_flops: float  # the mean over the sampled micro-batches
    micro_batches: int  # how many were sampled


class EncoderSampler:
    """EncoderLoad per (data-parallel size, regime), measured once each; regimes as
    memory_model.encoder_regime names them."""

    def __init__(self, run: RunConfig, tokenizer_dir: str, steps: int):
        self.run, self.steps = run, steps
        self.tokenizer = ScientificTokenizer.load(Path(tokenizer_dir))
        self.specs = resolve_sources(run.data)
        self._items: dict[int, list[dict]] = {}
        self._loads: dict[tuple[int, str], EncoderLoad] = {}

    def load(self, dp_size: int, regime: str) -> EncoderLoad:
        key = (dp_size, regime)
        if key not in self._loads:
            self._loads[key] = self._measure(self._sample(dp_size), regime)
        return self._loads[key]

    def _sample(self, dp_size: int) -> list[dict]:
        """The items of rank 0's first micro-batches under this data-parallel size."""
        if dp_size not in self._items:
            run = self.run
            loader = PackedLoader(run.data, self.specs, self.tokenizer, run.model.encoders, split="train",
                                  batch_size=run.trainer.batch_size, seed=run.trainer.seed, dp_rank=0, dp_size=dp_size)
            self._items[dp_size] = [loader.next_batch().items for _ in range(self.steps * run.trainer.grad_accum)]
        return self._items[dp_size]

    def _measure(self, micro_batches: list[dict], regime: str) -> EncoderLoad:
        cfg = self.run.model
        with FakeTensorMode() as fake:
            encoders = build_encoders(cfg.encoders, cfg.d_model, vocab_sizes_of(self.tokenizer))
            if regime == "bf16_weights":  # FSDP2's bf16 parameters: the encoders compute in bf16 without autocast
                encoders = encoders.to(torch.bfloat16)
            params = {p.untyped_storage()._cdata for p in encoders.parameters()}
            saved, flops = [], []
            for items in micro_batches:
                kept: dict[int, int] = {}

                def keep(t: torch.Tensor) -> torch.Tensor:
                    storage = t.untyped_storage()  # views of one tensor count once
                    if storage._cdata not in params:
                        kept[storage._cdata] = storage.nbytes()
                    return t

                autocast = torch.autocast("cpu", torch.bfloat16) if regime == "bf16_autocast" else contextlib.nullcontext()
                counter = FlopCounterMode(display=False)
                outputs = []  # hold every graph, as training does until backward: no storage is freed and reused
                with autocast, counter, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                    for modality, encoder in encoders.items():
                        if modality in items:
                            batch = {k: fake.from_tensor(v) for k, v in items[modality].items()}
                            if regime == "bf16_weights":
                                batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
                            outputs.append(encoder(batch))
                saved.append(sum(kept.values()))
                flops.append(counter.get_total_flops())
        return EncoderLoad(saved_bytes=max(saved), forward_flops=statistics.fmean(flops), micro_batches=len(saved))
