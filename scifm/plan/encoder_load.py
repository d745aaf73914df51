"""The modality encoders' share of a step, measured on items drawn from the run's own data.

How many items a micro-batch holds and how long each one is belong to the data, not to the model,
so no formula over the config can give them. The planner packs the first plan.sample_steps x
trainer.grad_accum global micro-batches of the run's training loader (with the tokenizer
plan.tokenizer names; the rows are the same under every layout), and for each data-parallel size
the layouts use collates the rows each of its ranks would train on (every rank up to SAMPLED_RANKS,
beyond that SAMPLED_RANKS spread evenly over them: ranks' rows differ, and a figure-dense row can
hold many times another's encoder work). The run's encoders run over those items under
FakeTensorMode: shapes only, no memory and no arithmetic, yet the same kernels chosen as on a real
CPU tensor (SDPA's flash kernel, which keeps only its output and log-sum-exp for
backward, as the GPU's kernels do). It counts the bytes of the tensors autograd saves that are not
parameters, and the forward FLOPs (torch's FlopCounterMode). One micro-batch's items are held at a
time, so a paper-scale batch costs packing once, not once per data-parallel size.

Memory takes the fullest micro-batch of any rank seen: a layout has to fit the worst one. Time takes,
per micro-batch, the busiest rank's FLOPs (the others wait for it at the first collective after the
encoders), averaged over the micro-batches.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from scifm.config import RunConfig
from scifm.data.loader import PackedLoader
from scifm.data.packing import collate_rows
from scifm.data.streams import resolve_sources
from scifm.model.encoders import build_encoders
from scifm.model.multimodal import vocab_sizes_of
from scifm.tokenizers.scientific import ScientificTokenizer


# data-parallel ranks measured per data-parallel size: bounds the planner's work at paper scale
SAMPLED_RANKS = 8


@dataclass(frozen=True)
class EncoderLoad:
    """The encoders over the data-parallel ranks' micro-batches."""

    saved_bytes: int  # the most any sampled rank's micro-batch keeps for backward
    forward_flops: float  # per micro-batch the busiest sampled rank's, averaged over the micro-batches


class EncoderSampler:
    """EncoderLoad for each (data-parallel size, regime) asked for, all measured in one pass; regimes
    as memory_model.encoder_regime names how the encoders compute."""

    def __init__(self, run: RunConfig, tokenizer_dir: str, steps: int, wanted: set[tuple[int, str]]):
        tokenizer = ScientificTokenizer.load(Path(tokenizer_dir))
        loader = PackedLoader(run.data, resolve_sources(run.data), tokenizer, run.model.encoders, split="train",
                              batch_size=run.trainer.batch_size, seed=run.trainer.seed)
        regimes_of: dict[int, set[str]] = defaultdict(set)
        for dp_size, regime in wanted:
            regimes_of[dp_size].add(regime)
        # per (dp size, regime), per micro-batch: each sampled rank's (saved bytes, forward FLOPs)
        measured: dict[tuple[int, str], list[list[tuple[int, int]]]] = defaultdict(list)
        fake = FakeTensorMode()
        with fake:
            encoders = {regime: _fake_encoders(run, tokenizer, regime) for regime in {r for _, r in wanted}}
        for _ in range(steps * run.trainer.grad_accum):
            rows = loader.next_rows()
            for dp_size, regimes in regimes_of.items():
                for regime in regimes:
                    measured[dp_size, regime].append([])
                for rank in sampled_ranks(dp_size):
                    items = collate_rows(rows[rank::dp_size], run.data.seq_len, tokenizer, loader.placeholders).items
                    for regime in regimes:
                        with fake:
                            measured[dp_size, regime][-1].append(_measure(encoders[regime], items, regime, fake))
        self._loads = {key: EncoderLoad(max(s for ranks in found for s, _ in ranks),
                                        statistics.fmean(max(f for _, f in ranks) for ranks in found))
                       for key, found in measured.items()}

    def load(self, dp_size: int, regime: str) -> EncoderLoad:
        return self._loads[dp_size, regime]


def sampled_ranks(dp_size: int) -> list[int]:
    """Every rank up to SAMPLED_RANKS, else SAMPLED_RANKS of them spread evenly from rank 0."""
    if dp_size <= SAMPLED_RANKS:
        return list(range(dp_size))
    return [k * dp_size // SAMPLED_RANKS for k in range(SAMPLED_RANKS)]


def _fake_encoders(run: RunConfig, tokenizer: ScientificTokenizer, regime: str) -> nn.ModuleDict:
    """Built in bf16 for FSDP2's bf16 weights (Module.to cannot swap a FakeTensor parameter)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if regime == "bf16_weights" else torch.float32)
    try:
        return build_encoders(run.model.encoders, run.model.d_model, vocab_sizes_of(tokenizer))
    finally:
        torch.set_default_dtype(default)


def _measure(encoders: nn.ModuleDict, items: dict, regime: str, fake: FakeTensorMode) -> tuple[int, int]:
    """(bytes saved for backward, parameters left out; forward FLOPs) of the encoders over `items`."""
    params = {p.untyped_storage()._cdata for p in encoders.parameters()}
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
                if regime == "bf16_weights":  # FSDP2 casts the inputs to its parameters' dtype
                    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
                outputs.append(encoder(batch))
    return sum(kept.values()), counter.get_total_flops()
