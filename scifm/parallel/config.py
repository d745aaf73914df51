"""Typed parallel layout (parallel.*): mesh sizes, pipeline schedule, sharding options."""

from __future__ import annotations

from dataclasses import dataclass, field

from scifm.core.checks import require

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
MEGATRON_SCHEDULES = ("1F1B",)


ENGINES = ("native", "deepspeed", "megatron")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # partitions 1: optimizer state, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False  # optimizer state and step on the CPU
    offload_params: bool = False  # parameters on the CPU between uses (ZeRO-3 only)
    config: str = ""  # a DeepSpeed JSON merged with what scifm derives; a disagreement is an error


@dataclass
class ParallelConfig:
    engine: str = "native"  # native | deepspeed | megatron
    dp_replicate: int = 1  # HSDP replicas (gradients all-reduced between them)
    dp_shard: int = 1  # FSDP2 shards
    tp: int = 1
    pp: int = 1
    ep: int = 1  # borrows ranks from dp_shard x tp
    # pipeline (pp > 1): each step's trainer.grad_accum micro-batches are the schedule's micro-batches
    pp_schedule: str = "1F1B"  # GPipe | 1F1B | Interleaved1F1B | InterleavedZeroBubble | ZBVZeroBubble
    pp_virtual_stages: int = 1  # stages per pp rank: 1 (GPipe, 1F1B), >= 2 (interleaved), 2 (ZBV)
    pp_split: list[int] = field(default_factory=list)  # decoder layers per stage, in order; [] = even split
    sequence_parallel: bool = True  # with tp > 1: norms and residual stream sharded on the sequence
    loss_parallel: bool = True  # with tp > 1: cross-entropy on vocab-sharded logits, never gathered
    mixed_precision: str = "fp32"  # FSDP2 params: fp32 | bf16 (gradients always reduced in fp32)
    activation_checkpoint: str = "none"  # none | full (every block) | selective (every other block)
    compile: bool = False  # torch.compile each block
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # with engine=deepspeed

    def validate(self, n_layers: int, n_microbatches: int) -> None:
        """`n_layers`: model.n_layers; `n_microbatches`: trainer.grad_accum."""
        require(self.engine in ENGINES, "parallel.engine", f"must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "deepspeed":
            self._validate_deepspeed()
        if self.engine == "megatron":
            self._validate_megatron()
        for key in ("dp_replicate", "dp_shard", "tp", "pp", "ep", "pp_virtual_stages"):
            require(getattr(self, key) >= 1, f"parallel.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.pp_schedule in PP_SCHEDULES, "parallel.pp_schedule",
                f"must be one of {', '.join(PP_SCHEDULES)}, got {self.pp_schedule!r}")
        if self.pp > 1:
            self._validate_pipeline(n_layers, n_microbatches)
        require(self.mixed_precision in ("fp32", "bf16"), "parallel.mixed_precision",
                f"must be fp32 or bf16, got {self.mixed_precision!r}")
        require(self.activation_checkpoint in ("none", "full", "selective"), "parallel.activation_checkpoint",
                f"must be none, full or selective, got {self.activation_checkpoint!r}")

    def _validate_deepspeed(self) -> None:
        ds = self.deepspeed
        require(ds.zero_stage in (1, 2, 3), "parallel.deepspeed.zero_stage",
                f"must be 1, 2 or 3 (stage 0 is plain data parallelism: engine=native does it), got {ds.zero_stage}")
        require(not ds.offload_params or ds.zero_stage == 3, "parallel.deepspeed.offload_params",
                f"needs zero_stage=3 (parameters are partitioned only there), got {ds.zero_stage}")
        for key in ("tp", "pp", "dp_replicate"):
            require(getattr(self, key) == 1, f"parallel.{key}",
                    f"engine=deepspeed runs ZeRO data parallelism, with parallel.ep over its ranks (set "
                    f"parallel.dp_shard to the world size), got {key}={getattr(self, key)}")
        require(self.mixed_precision == "fp32", "parallel.mixed_precision",
                "engine=deepspeed keeps fp32 weights; compute in bf16 with trainer.precision=bf16 (autocast), "
                f"got {self.mixed_precision!r}")
        require(self.ep == 1 or ds.zero_stage in (1, 2), "parallel.ep",
                f"engine=deepspeed runs expert parallelism at zero_stage 1 or 2 (DeepSpeed's ZeRO-3 takes no MoE "
                f"layers but its AutoEP's), got ep={self.ep} with zero_stage={ds.zero_stage}")

    def _validate_megatron(self) -> None:
        """What engine=megatron does not run; the model's own limits are megatron_engine.check_megatron's."""
        require(self.dp_shard == 1, "parallel.dp_shard",
                "engine=megatron runs tensor (and sequence), expert, pipeline and data-parallel replicas, not "
                f"sharded data parallelism (its replicas are parallel.dp_replicate); got dp_shard={self.dp_shard}")
        require(self.pp == 1 or self.pp_schedule in MEGATRON_SCHEDULES, "parallel.pp_schedule",
                f"engine=megatron pipelines with Megatron-Core's own schedule, {' or '.join(MEGATRON_SCHEDULES)}; "
                f"got {self.pp_schedule!r}")
        require(self.ep in (1, self.tp), "parallel.ep",
                f"engine=megatron splits the experts over the tp ranks only (ep = tp, each rank holding ep-th of "
                f"the experts whole), got ep={self.ep} with tp={self.tp}")
        require(self.mixed_precision == "fp32", "parallel.mixed_precision",
                "engine=megatron keeps fp32 weights; compute in bf16 with trainer.precision=bf16 (autocast), "
                f"got {self.mixed_precision!r}")
        require(self.activation_checkpoint == "none", "parallel.activation_checkpoint",
                f"engine=megatron does not recompute activations, got {self.activation_checkpoint!r}")
        require(not self.compile, "parallel.compile", "engine=megatron does not compile its blocks")

    def _validate_pipeline(self, n_layers: int, n_microbatches: int) -> None:
        schedule, v = self.pp_schedule, self.pp_virtual_stages
        if schedule in SINGLE_STAGE_SCHEDULES:
            require(v == 1, "parallel.pp_virtual_stages", f"{schedule} runs 1 stage per rank, got {v}")
        elif schedule == "ZBVZeroBubble":
            require(v == 2, "parallel.pp_virtual_stages", f"ZBVZeroBubble runs exactly 2 stages per rank, got {v}")
        else:
            require(v >= 2, "parallel.pp_virtual_stages", f"{schedule} needs >= 2 stages per rank, got {v}")
        n_stages = self.pp * v
        if self.pp_split:
            require(len(self.pp_split) == n_stages, "parallel.pp_split",
                    f"lists {len(self.pp_split)} stages, but pp={self.pp} x pp_virtual_stages={v} = {n_stages}")
            require(min(self.pp_split) >= 1, "parallel.pp_split",
                    f"every stage needs at least 1 layer, got {list(self.pp_split)}")
            require(sum(self.pp_split) == n_layers, "parallel.pp_split",
                    f"{list(self.pp_split)} sums to {sum(self.pp_split)} layers, but model.n_layers={n_layers}")
        else:
            require(n_layers % n_stages == 0, "parallel.pp_split",
                    f"model.n_layers={n_layers} does not split evenly into pp={self.pp} x pp_virtual_stages={v} "
                    f"= {n_stages} stages; list the layers of each stage in parallel.pp_split")
        # what torch's schedules accept (they raise only once the process groups exist); Megatron's
        # 1F1B takes any number of micro-batches
        if self.engine == "megatron":
            return
        if schedule == "1F1B":
            require(n_microbatches >= self.pp, "trainer.grad_accum",
                    f"1F1B with pp={self.pp} needs at least {self.pp} micro-batches per step, got {n_microbatches}; "
                    f"raise trainer.grad_accum or use parallel.pp_schedule=GPipe")
        elif schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
            rounds = max(1, n_microbatches // self.pp)
            require(n_microbatches % rounds == 0, "trainer.grad_accum",
                    f"{schedule} with pp={self.pp} needs the micro-batches per step ({n_microbatches}) to be a "
                    f"multiple of max(1, micro-batches // pp) = {rounds}; use a multiple of {self.pp}")
