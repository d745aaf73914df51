"""Every layout of a world size that the run could train with, and the ones it could not, each with
the one-line reason the training code itself would give (RunConfig.validate and ParallelDims.validate
run on every candidate, so the planner and `scifm train` never disagree on what is valid)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from scifm.config import RunConfig
from scifm.core.errors import ConfigError
from scifm.parallel.config import ParallelConfig
from scifm.parallel.dims import ParallelDims
from scifm.parallel.distributed import dims_of

DIM_KEYS = ("dp_replicate", "dp_shard", "tp", "pp", "ep")
CHOICE_KEYS = ("activation_checkpoint", "mixed_precision")
ACTIVATION_CHECKPOINTS = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    parallel: ParallelConfig  # the run's parallel section with this layout's sizes and choices

    @property
    def dims(self):
        return dims_of(self.parallel)

    def label(self) -> str:
        p = self.parallel
        sizes = " ".join(f"{key}={getattr(p, key)}" for key in DIM_KEYS if getattr(p, key) > 1) or "single"
        return f"{sizes} ac={p.activation_checkpoint} mp={p.mixed_precision}"

    def overrides(self) -> list[str]:
        p = self.parallel
        split = [f"parallel.pp_split=[{','.join(map(str, p.pp_split))}]"] if p.pp_split else []
        return [f"parallel.{key}={getattr(p, key)}" for key in DIM_KEYS + CHOICE_KEYS] + split


def only_layout(overrides: list[str]) -> list[str]:
    """`parallel.*` overrides that fix one layout: those given, and ParallelConfig's defaults for every
    other size and choice the planner would otherwise vary."""
    default = ParallelConfig()
    given = dict(o.split("=", 1) for o in overrides)
    return [f"{key}={given.get(key, getattr(default, key.removeprefix('parallel.')))}"
            for key in (f"parallel.{k}" for k in DIM_KEYS + CHOICE_KEYS)]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def balanced_split(n_layers: int, n_stages: int) -> list[int]:
    """[] where the layers split evenly; else parallel.pp_split with the extra layers on the middle
    stages (the first stage also runs the embeddings and encoders, the last the output layer)."""
    if n_layers % n_stages == 0 or n_layers < n_stages:
        return []
    counts = [n_layers // n_stages] * n_stages
    middle = list(range(1, n_stages - 1)) or list(range(n_stages))
    for i in range(n_layers % n_stages):
        counts[middle[i % len(middle)]] += 1
    return counts


def candidates(run: RunConfig, world: int, fixed: set[str]) -> list[Layout]:
    """Every split of `world` into pp x dp_replicate x dp_shard x tp, with ep borrowed from dp_shard x tp
    (1, or tp times a divisor of dp_shard), activation checkpointing none/selective/full and, where
    FSDP runs, fp32 or bf16 parameters; pipeline stages split the layers as evenly as they can
    (balanced_split). A key in `fixed` (given on the command line) keeps its value."""
    p = run.parallel

    def options(key: str, values) -> list:
        return [getattr(p, key)] if key in fixed else list(values)

    out = []
    for pp in options("pp", divisors(world)):
        for tp in options("tp", divisors(world // pp) if world % pp == 0 else []):
            rest = world // (pp * tp) if world % (pp * tp) == 0 else 0
            for dp_replicate in options("dp_replicate", divisors(rest) if rest else []):
                dp_shard = rest // dp_replicate if rest and rest % dp_replicate == 0 else 0
                if "dp_shard" in fixed:
                    dp_shard = p.dp_shard
                if dp_shard < 1:
                    continue
                for ep in options("ep", [1] + [tp * j for j in divisors(dp_shard) if tp * j > 1]):
                    for ac in options("activation_checkpoint", ACTIVATION_CHECKPOINTS):
                        fsdp = ParallelDims(dp_replicate, dp_shard, tp, pp, ep).fsdp
                        for mp in options("mixed_precision", ("fp32", "bf16") if fsdp else (p.mixed_precision,)):
                            split = list(p.pp_split) if "pp_split" in fixed else balanced_split(
                                run.model.n_layers, pp * p.pp_virtual_stages)
                            out.append(Layout(dataclasses.replace(
                                p, pp=pp, tp=tp, dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep,
                                activation_checkpoint=ac, mixed_precision=mp, pp_split=split if pp > 1 else [])))
    return out


def check(run: RunConfig, layout: Layout, world: int) -> str | None:
    """None if `scifm train` would accept this layout on `world` processes, else its error line."""
    candidate = dataclasses.replace(run, parallel=layout.parallel)
    try:
        candidate.validate()
        layout.dims.validate(run.model, world)
    except ConfigError as err:
        return str(err)
    return None


def split_valid(run: RunConfig, world: int, fixed: set[str]) -> tuple[list[Layout], list[tuple[Layout, str]]]:
    valid, rejected = [], []
    for layout in candidates(run, world, fixed):
        reason = check(run, layout, world)
        if reason is None:
            valid.append(layout)
        else:
            rejected.append((layout, reason))
    return valid, rejected
