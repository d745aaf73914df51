"""Typed configuration of `scifm eval` (the schema Hydra checks `configs/eval_run.yaml` against)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from scifm.core.errors import ConfigError
from scifm.core.hydra_compose import compose_config, hydra_errors_as_config_errors
from scifm.core.checks import require


@dataclass
class EvalConfig:
    # built-in task names (scifm.eval.builtin); [] = all of them when no task file is named, else none
    tasks: list[str] = field(default_factory=list)
    task_files: list[str] = field(default_factory=list)  # user JSONL task files (scifm/eval/tasks.py)
    max_items: int = 0  # per task, N items sampled over its skills (scifm/eval/selection.py); 0 = all
    num_fewshot: int = 0  # solved examples before each item, from the task's items marked "fewshot"
    seed: int = 0  # of the max_items sample and of the few-shot draws
    batch_size: int = 32  # rows per forward pass
    max_new_tokens: int = 16  # greedy generation budget of a short answer
    device: str = "auto"  # auto = cuda when available, else cpu
    out: str = ""  # "" = RUN/eval/step_N beside the checkpoint's run; else OUT/step_N

    def validate(self) -> None:
        require(self.max_items >= 0, "eval.max_items", f"must be >= 0, got {self.max_items}")
        require(self.num_fewshot >= 0, "eval.num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


@dataclass
class EvalRunConfig:
    checkpoint: str = MISSING  # a checkpoint dir, a run dir (all its checkpoints) or a glob of checkpoints
    eval: EvalConfig = field(default_factory=EvalConfig)


ConfigStore.instance().store(name="eval_run_schema", node=EvalRunConfig)


@hydra_errors_as_config_errors  # OmegaConf.to_object's other errors
def compose_eval_config(overrides: list[str]) -> EvalRunConfig:
    """configs/eval_run.yaml with the command line's overrides; a bad or missing key is a ConfigError."""
    cfg = compose_config("eval_run", overrides)
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue:
        raise ConfigError("checkpoint: required, e.g. scifm eval checkpoint=runs/demo/checkpoints/step_400 "
                          "(a checkpoint, a run directory or a quoted glob)") from None
