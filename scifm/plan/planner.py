"""make_plan(overrides): the run config `scifm train` would compose, every valid layout of its cluster
(or the one the overrides fix), each layout's memory and step time, ranked."""

from __future__ import annotations

from dataclasses import dataclass

from scifm.config import RunConfig, compose_run_config
from scifm.core.checks import require
from scifm.core.errors import ConfigError
from scifm.plan.config import PlanConfig, compose_plan_config
from scifm.plan.encoder_load import EncoderSampler
from scifm.plan.layouts import CHOICE_KEYS, DIM_KEYS, Layout, split_valid
from scifm.plan.memory_model import LayoutSizes, MemoryBreakdown, compute_dtype, encoder_regime, memory_breakdown
from scifm.plan.routing_load import RoutingLoad
from scifm.plan.shapes import ModelShapes, model_shapes, vocab_sizes
from scifm.plan.time_model import TimeBreakdown, step_time

GIB = 2**30


@dataclass
class Row:
    layout: Layout
    memory: MemoryBreakdown
    time: TimeBreakdown
    fits: bool


@dataclass
class Plan:
    run: RunConfig
    hardware: PlanConfig
    shapes: ModelShapes
    world: int
    rows: list[Row]  # those that fit by step time, then the rest by memory
    rejected: list[tuple[Layout, str]]
    encoders: EncoderSampler | None  # the run's data sampled for the encoders (None without plan.tokenizer)
    routing: RoutingLoad  # the busiest ep rank's share of the routed rows (even without plan.routing_metrics)

    @property
    def usable_bytes(self) -> float:
        return (self.hardware.gpu_memory_gb - self.hardware.reserved_gb) * GIB

    @property
    def fitting(self) -> list[Row]:
        return [r for r in self.rows if r.fits]


def fixed_keys(overrides: list[str]) -> set[str]:
    """The parallel.* keys the command line sets: the planner keeps them and varies the rest."""
    keys = {o.split("=", 1)[0].lstrip("+").removeprefix("parallel.") for o in overrides
            if o.lstrip("+").startswith("parallel.")}
    return keys & set(DIM_KEYS + CHOICE_KEYS + ("pp_split",))


def make_plan(overrides: list[str]) -> Plan:
    hardware = compose_plan_config([o for o in overrides if o.startswith("plan.")])
    run_overrides = [o for o in overrides if not o.startswith("plan.")]
    run = compose_run_config(run_overrides)
    for section in (run.model, run.data, run.trainer, run.cluster):
        section.validate()
    require(run.parallel.engine == "native", "parallel.engine",
            f"scifm plan models the native engine's layouts only (FSDP2, TP, EP, PP); {run.parallel.engine!r} "
            "shards differently and is not modeled")
    require(run.cluster.gpus_per_node >= 1, "cluster.gpus_per_node",
            "scifm plan plans GPUs: give cluster.gpus_per_node (and cluster.nodes)")
    world = run.cluster.world_size
    shapes = model_shapes(run.model, vocab_sizes(run.model, hardware.tokenizer))
    valid, rejected = split_valid(run, world, fixed_keys(run_overrides))
    if not valid:
        reasons = sorted({reason for _, reason in rejected})
        raise ConfigError(reasons[0] if len(reasons) == 1 else
                          f"parallel: no layout of {world} GPUs is valid ({len(rejected)} tried); e.g. {reasons[0]}")
    encoders = None
    if hardware.tokenizer:  # the encoders' work, sampled for every data-parallel size and regime a layout uses
        sizes = [LayoutSizes(run, layout) for layout in valid]
        encoders = EncoderSampler(run, hardware.tokenizer, hardware.sample_steps,
                                  {(s.dp, encoder_regime(s)) for s in sizes})
    routing = RoutingLoad(hardware.routing_metrics, run.model.moe.n_experts)
    plan = Plan(run, hardware, shapes, world, [], rejected, encoders, routing)
    rows = []
    for layout in valid:
        imbalance = routing.imbalance(layout.dims.ep)
        memory = memory_breakdown(shapes, run, layout, encoders, imbalance)
        time = step_time(shapes, run, layout, hardware, run.cluster.gpus_per_node, encoders, imbalance)
        rows.append(Row(layout, memory, time, memory.total <= plan.usable_bytes))
    # ties (layouts the model cannot tell apart in time) go to the one with more memory to spare
    rows.sort(key=lambda r: (not r.fits, round(r.time.total, 9) if r.fits else 0.0, r.memory.total))
    plan.rows = rows
    return plan


def describe_batch(run: RunConfig) -> str:
    t = run.trainer
    tokens = t.batch_size * t.grad_accum * run.data.seq_len
    return (f"{t.batch_size} rows x {run.data.seq_len} tokens x grad_accum {t.grad_accum} = {tokens:,} tokens per step; "
            f"compute {compute_dtype(run)}")
