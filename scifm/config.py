"""Typed run configuration: the schema Hydra checks every YAML file and override against.

configs/config.yaml names `run_schema` (registered below) first in its defaults, so an unknown
key or a value of the wrong type fails while Hydra composes, naming the key's path. Range checks
that types cannot express live in `validate()`, called before any work starts.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from scifm.core.checks import require
from scifm.core.errors import ConfigError
from scifm.core.hydra_compose import compose_config, hydra_errors_as_config_errors
from scifm.data.config import DataConfig
from scifm.model.config import ModelConfig
from scifm.parallel.config import ParallelConfig
from scifm.parallel.fp8_config import Fp8Config


@dataclass
class WandbConfig:
    """Weights & Biases (trainer.wandb.*): rank 0 logs the metrics.jsonl records to a W&B run.
    Needs the wandb extra (pip install -e '.[wandb]')."""

    mode: str = "disabled"  # disabled | offline (files under the run directory; `wandb sync` them later) | online
    project: str = "scifm"
    entity: str = ""  # "" = the W&B account's default entity
    name: str = ""  # "" = the run directory's name
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(self.mode in ("disabled", "offline", "online"), "trainer.wandb.mode",
                f"must be disabled, offline or online, got {self.mode!r}")
        require(bool(self.project), "trainer.wandb.project", "must not be empty")


@dataclass
class ProfileConfig:
    """trainer.profile: torch.profiler traces of a window of steps, per rank, in the run directory's
    profile/ (scifm/train/profiling.py)."""

    start_step: int = 0  # the window's first step, counted from 1; 0 = no profiling
    steps: int = 3

    def validate(self) -> None:
        require(self.start_step >= 0, "trainer.profile.start_step", f"must be >= 0 (0 = off), got {self.start_step}")
        require(self.steps >= 1, "trainer.profile.steps", f"must be >= 1, got {self.steps}")


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
    # auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 | fp8 (trainer.fp8 layers in FP8,
    # the rest as auto)
    precision: str = "auto"
    fp8: Fp8Config = field(default_factory=Fp8Config)
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    val_every: int = 100
    ckpt_every: int = 100  # 0 = only at the end
    keep_last: int = 0  # checkpoints kept besides every keep_every-th and the resume source; 0 = all
    keep_every: int = 0  # also keep the checkpoints of steps that are multiples of this; 0 = none
    async_checkpoint: bool = False  # write checkpoint shards in the background while training goes on
    nonfinite_reload_after: int = 3  # non-finite steps in a row that reload the last checkpoint; 0 = never
    max_nonfinite_steps: int = 10  # more steps with a non-finite loss or gradient than this stop the run
    tensorboard: bool = True  # TensorBoard event files of the logged metrics in the run directory's tensorboard/
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self) -> None:
        # NumPy's generators take no negative seed (the loaders draw with seed and seed + 1)
        require(self.seed >= 0, "trainer.seed", f"must be >= 0, got {self.seed}")
        require(self.max_steps >= 0, "trainer.max_steps", "must be >= 0")
        require(self.batch_size >= 1, "trainer.batch_size", "must be >= 1")
        require(self.grad_accum >= 1, "trainer.grad_accum", "must be >= 1")
        require(self.lr > 0, "trainer.lr", "must be > 0")
        require(0 <= self.min_lr_ratio <= 1, "trainer.min_lr_ratio", "must be in [0, 1]")
        require(self.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0")
        require(self.weight_decay >= 0, "trainer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for key in ("beta1", "beta2"):  # what AdamW accepts
            require(0 <= getattr(self, key) < 1, f"trainer.{key}", f"must be in [0, 1), got {getattr(self, key)}")
        require(self.grad_clip >= 0, "trainer.grad_clip", "must be >= 0")
        require(self.precision in ("auto", "fp32", "bf16", "fp8"), "trainer.precision",
                 f"must be auto, fp32, bf16 or fp8, got {self.precision!r}")
        self.fp8.validate()
        require(self.device in ("auto", "cpu", "cuda"), "trainer.device",
                 f"must be auto, cpu or cuda, got {self.device!r}")
        for key in ("log_every", "val_every"):
            require(getattr(self, key) >= 1, f"trainer.{key}", "must be >= 1")
        for key in ("ckpt_every", "keep_last", "keep_every", "nonfinite_reload_after", "max_nonfinite_steps"):
            require(getattr(self, key) >= 0, f"trainer.{key}", f"must be >= 0, got {getattr(self, key)}")
        self.wandb.validate()
        self.profile.validate()

    def saves_checkpoint_at(self, step: int) -> bool:
        """Every ckpt_every steps and at the end (step 0 only when max_steps is 0: the initial weights)."""
        return step == self.max_steps or (self.ckpt_every > 0 and step > 0 and step % self.ckpt_every == 0)


@dataclass
class EvalJobConfig:
    """The `--eval-after` array's resources (cluster.eval.*): one process on one node per task,
    none of the training job's --exclusive, --mem or time limit."""

    gpus: int | None = None  # 0 or 1 (the eval runs on one device); None = 1 if cluster.gpus_per_node > 0
    cpus_per_task: int | None = None  # None = cluster.cpus_per_task
    mem: str = ""  # sbatch --mem; "" = the partition's default (not cluster.mem)
    time: str = "02:00:00"  # sbatch --time, per task
    partition: str = ""  # "" = cluster.partition
    parallelism: int = 0  # at most this many eval tasks at once (--array=...%N); 0 = no limit
    sbatch_args: list[str] = field(default_factory=list)  # the eval script's only (cluster.sbatch_args: training's)

    def validate(self) -> None:
        require(self.gpus in (None, 0, 1), "cluster.eval.gpus",
                f"the eval runs in one process on one device: 0 or 1 (or null: 1 on a GPU cluster), got {self.gpus}")
        require(self.cpus_per_task is None or self.cpus_per_task >= 1, "cluster.eval.cpus_per_task",
                f"must be >= 1, got {self.cpus_per_task}")
        require(bool(self.time), "cluster.eval.time", "give a time limit, e.g. 02:00:00")
        require(self.parallelism >= 0, "cluster.eval.parallelism", f"must be >= 0, got {self.parallelism}")


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
    array_parallelism: int = 0  # a sweep's points training at once (--array=...%N); 0 = no limit
    container_image: str = ""  # pyxis/enroot image for srun --container-image; "" = no container
    container_mounts: str = ""  # srun --container-mounts, e.g. /lustre:/lustre (mount the run directory)
    setup: list[str] = field(default_factory=list)  # shell lines before launch: module load, venv, conda
    env: dict[str, str] = field(default_factory=dict)  # exported to every task, e.g. NCCL_* settings
    sbatch_args: list[str] = field(default_factory=list)  # more sbatch options for training, e.g. --qos=high
    # the command that runs python, after setup; split into words as a shell would, e.g.
    # "apptainer exec --nv img.sif python"
    python: str = "python"
    eval: EvalJobConfig = field(default_factory=EvalJobConfig)

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def python_words(self) -> list[str]:
        return shlex.split(self.python)

    def validate(self) -> None:
        for key in ("nodes", "cpus_per_task"):
            require(getattr(self, key) >= 1, f"cluster.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("gpus_per_node", "signal_seconds", "max_restarts", "array_parallelism"):
            require(getattr(self, key) >= 0, f"cluster.{key}", f"must be >= 0, got {getattr(self, key)}")
        require(bool(self.time), "cluster.time", "give a time limit, e.g. 04:00:00 or 2-00:00:00")
        require(not self.container_mounts or bool(self.container_image), "cluster.container_mounts",
                "mounts need cluster.container_image")
        try:
            words = self.python_words
        except ValueError as err:  # shlex: an unclosed quote or a trailing backslash
            raise ConfigError(f"cluster.python: {self.python!r}: {err}") from None
        require(bool(words), "cluster.python", "give the command that runs python, e.g. python")
        self.eval.validate()


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
        dp_size = self.parallel.dp_replicate * self.parallel.dp_shard
        # the loader checks this too, but only after the corpus and the tokenizer are built
        require(self.trainer.batch_size % dp_size == 0, "trainer.batch_size",
                f"{self.trainer.batch_size} rows do not split over dp_replicate x dp_shard = {dp_size} "
                f"data-parallel ranks; use a multiple of {dp_size}")


ConfigStore.instance().store(name="run_schema", node=RunConfig)


@hydra_errors_as_config_errors  # OmegaConf.to_object's errors too
def compose_run_config(overrides: list[str]) -> RunConfig:
    """The RunConfig `scifm train` would run with these overrides (for scripts and tests)."""
    return OmegaConf.to_object(compose_config("config", overrides))
