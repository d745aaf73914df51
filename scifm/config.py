"""Typed run configuration: the schema Hydra checks every YAML file and override against.

configs/config.yaml names `run_schema` (registered below) first in its defaults, so an unknown
key or a value of the wrong type fails while Hydra composes, naming the key's path. Range checks
that types cannot express live in `validate()`, called before any work starts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from scifm.errors import ConfigError
from scifm.model.config import ModelConfig, require

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")


@dataclass
class SourceConfig:
    path: str = "builtin"  # "builtin" = the built-in corpus; else a .jsonl(.gz) file or a directory
    weight: float = 1.0
    name: str = ""  # defaults to the file or directory stem


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    seq_len: int = 256
    temperature: float = 1.0  # source probabilities ~ weight ** (1 / temperature)
    balance_skills: bool = False  # sample skills within a source uniformly instead of by count
    max_bad_fraction: float = 0.05
    corpus_dir: str = ""  # where the built-in corpus is built; "" = $SCIFM_CACHE or ~/.cache/scifm
    corpus_max_docs_per_source: int = 0  # 0 = all
    tokenizer_vocab_size: int = 2048  # BPE text vocabulary
    tokenizer_train_docs: int = 20000  # documents of the train split the BPE is trained on
    val_batches: int = 4

    def validate(self) -> None:
        require(len(self.sources) > 0, "data.sources", "list at least one source")
        for i, src in enumerate(self.sources):
            require(src.weight > 0, f"data.sources[{i}].weight", f"must be > 0, got {src.weight}")
        require(self.seq_len >= 16, "data.seq_len", f"must be >= 16, got {self.seq_len}")
        require(self.temperature > 0, "data.temperature", "must be > 0")
        require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in [0, 1]")
        require(self.tokenizer_vocab_size >= 300, "data.tokenizer_vocab_size",
                 "must be >= 300 (256 byte symbols plus merges)")
        require(self.val_batches >= 1, "data.val_batches", "must be >= 1")


@dataclass
class TrainerConfig:
    seed: int = 0
    max_steps: int = 300
    batch_size: int = 16  # packed rows per micro-batch, global over data-parallel ranks
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    val_every: int = 100
    ckpt_every: int = 100  # 0 = only at the end

    def validate(self) -> None:
        require(self.max_steps >= 0, "trainer.max_steps", "must be >= 0")
        require(self.batch_size >= 1, "trainer.batch_size", "must be >= 1")
        require(self.grad_accum >= 1, "trainer.grad_accum", "must be >= 1")
        require(self.lr > 0, "trainer.lr", "must be > 0")
        require(0 <= self.min_lr_ratio <= 1, "trainer.min_lr_ratio", "must be in [0, 1]")
        require(self.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0")
        require(self.grad_clip >= 0, "trainer.grad_clip", "must be >= 0")
        require(self.precision in ("auto", "fp32", "bf16"), "trainer.precision",
                 f"must be auto, fp32 or bf16, got {self.precision!r}")
        require(self.device in ("auto", "cpu", "cuda"), "trainer.device",
                 f"must be auto, cpu or cuda, got {self.device!r}")
        for key in ("log_every", "val_every"):
            require(getattr(self, key) >= 1, f"trainer.{key}", "must be >= 1")
        require(self.ckpt_every >= 0, "trainer.ckpt_every", "must be >= 0")

    def saves_checkpoint_at(self, step: int) -> bool:
        """Every ckpt_every steps and at the end (step 0 only when max_steps is 0: the initial weights)."""
        return step == self.max_steps or (self.ckpt_every > 0 and step > 0 and step % self.ckpt_every == 0)


@dataclass
class ParallelConfig:
    engine: str = "native"
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

    def validate(self, n_layers: int, n_microbatches: int) -> None:
        """`n_layers`: model.n_layers; `n_microbatches`: trainer.grad_accum."""
        require(self.engine == "native", "parallel.engine",
                f"only 'native' is available in this version, got {self.engine!r}")
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
        # what torch's schedules accept (they raise only once the process groups exist)
        if schedule == "1F1B":
            require(n_microbatches >= self.pp, "trainer.grad_accum",
                    f"1F1B with pp={self.pp} needs at least {self.pp} micro-batches per step, got {n_microbatches}; "
                    f"raise trainer.grad_accum or use parallel.pp_schedule=GPipe")
        elif schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
            rounds = max(1, n_microbatches // self.pp)
            require(n_microbatches % rounds == 0, "trainer.grad_accum",
                    f"{schedule} with pp={self.pp} needs the micro-batches per step ({n_microbatches}) to be a "
                    f"multiple of max(1, micro-batches // pp) = {rounds}; use a multiple of {self.pp}")


@dataclass
class ClusterConfig:
    """Where `scifm submit` sends a run (configs/cluster/*.yaml); training itself never reads it."""

    partition: str = ""  # "" = the cluster's default partition
    account: str = ""  # "" = the user's default account
    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU; 0 = a CPU cluster, one task per node
    cpus_per_task: int = 1  # also each task's OMP_NUM_THREADS (cluster.env can override)
    mem: str = ""  # sbatch --mem (per node), e.g. 200G; "" = the partition's default
    time: str = "01:00:00"  # sbatch --time
    signal_seconds: int = 120  # Slurm sends USR1 this long before the time limit; the run checkpoints
    max_restarts: int = 3  # requeues after pre-emption before the job gives up
    container_image: str = ""  # pyxis/enroot image for srun --container-image; "" = no container
    container_mounts: str = ""  # srun --container-mounts, e.g. /lustre:/lustre (mount the run directory)
    setup: list[str] = field(default_factory=list)  # shell lines before launch: module load, venv, conda
    env: dict[str, str] = field(default_factory=dict)  # exported to every task, e.g. NCCL_* settings
    sbatch_args: list[str] = field(default_factory=list)  # further sbatch options, e.g. --qos=high
    python: str = "python"  # the job's interpreter, after setup

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def validate(self) -> None:
        for key in ("nodes", "cpus_per_task"):
            require(getattr(self, key) >= 1, f"cluster.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("gpus_per_node", "signal_seconds", "max_restarts"):
            require(getattr(self, key) >= 0, f"cluster.{key}", f"must be >= 0, got {getattr(self, key)}")
        require(bool(self.time), "cluster.time", "give a time limit, e.g. 04:00:00 or 2-00:00:00")
        require(not self.container_mounts or bool(self.container_image), "cluster.container_mounts",
                "mounts need cluster.container_image")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    resume: str = ""  # "" = fresh run; "latest" = newest checkpoint of this run dir; or a checkpoint path

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.trainer.validate()
        self.parallel.validate(self.model.n_layers, self.trainer.grad_accum)
        self.cluster.validate()
        require(self.model.max_seq_len >= self.data.seq_len, "data.seq_len",
                 f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


ConfigStore.instance().store(name="run_schema", node=RunConfig)


def hydra_errors_as_config_errors(fn):
    """Hydra's and OmegaConf's errors as one `scifm: error:` line (without Hydra's search path)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(" ".join(str(err).strip().split("\n\n")[0].split())) from None

    return wrapped
