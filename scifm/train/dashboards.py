"""Where rank 0 sends each metrics.jsonl record besides the file: TensorBoard event files
(trainer.tensorboard, on by default) and a Weights & Biases run (trainer.wandb.mode offline or online).

Both get the same series, named by `scalars_of` and `expert_loads`, from the very records
metrics.jsonl holds, so a dashboard never disagrees with the file.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from scifm.config import TrainerConfig, WandbConfig
from scifm.core.errors import ConfigError, first_line

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # W&B's own layout below it (offline-run-*/, latest-run)
WANDB_ID_FILE = "scifm-run-id"  # in WANDB_DIR: the W&B run a resumed run continues

TRAIN_KEYS = ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen")


def load_imbalance(tokens_per_expert: list[float]) -> float:
    """The busiest expert's tokens over the mean: 1 is a perfectly balanced layer (nan without tokens)."""
    total = sum(tokens_per_expert)
    return max(tokens_per_expert) * len(tokens_per_expert) / total if total > 0 else math.nan


def scalars_of(record: dict) -> dict[str, float]:
    """A record's series: moe/layer{i} counts MoE layers only; val/ and data/ appear at validation steps."""
    out = {f"train/{key}": float(record[key]) for key in TRAIN_KEYS}
    for i, layer in enumerate(record["moe"]):
        out[f"moe/layer{i}/dropped_tokens"] = float(layer["dropped_tokens"])
        out[f"moe/layer{i}/load_imbalance"] = load_imbalance(layer["tokens_per_expert"])
    if "val_loss" in record:
        out["val/loss"] = float(record["val_loss"])
        for group in ("source", "skill"):
            out |= {f"val/loss_by_{group}/{name}": float(v) for name, v in record[f"val_loss_by_{group}"].items()}
            out |= {f"data/tokens_by_{group}/{name}": float(v) for name, v in record[f"tokens_by_{group}"].items()}
    return out


def expert_loads(record: dict) -> dict[str, list[float]]:
    """Each MoE layer's tokens per expert, a histogram on a dashboard (the heatmap in plots/ has the rest)."""
    return {f"moe/layer{i}/tokens_per_expert": layer["tokens_per_expert"] for i, layer in enumerate(record["moe"])}


def require_dashboards(tc: TrainerConfig) -> None:
    """Before any work: a dashboard is asked for whose package is not installed."""
    if tc.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("trainer.tensorboard: true needs tensorboard, which is not installed; "
                          "pip install tensorboard, or set trainer.tensorboard=false")
    if tc.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"trainer.wandb.mode: {tc.wandb.mode} needs wandb, which is not installed; "
                          "pip install -e '.[wandb]'")


class TensorBoardLog:
    def __init__(self, run_dir: Path, start_step: int):
        # imported here: tensorboard's protobufs load only for a run that writes event files
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run trains the steps after start_step again; TensorBoard's readers drop what an
        # earlier session logged from purge_step on, so the curve continues without duplicates
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, values in histograms.items():
            self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)
        self.writer.flush()  # a killed run's event files hold what its metrics.jsonl holds

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    def __init__(self, cfg: WandbConfig, run_dir: Path, run_config: dict):
        import wandb

        self.wandb = wandb
        id_file = run_dir / WANDB_DIR / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        try:
            # a resumed run continues its W&B run (the steps it trains again carry the same values:
            # resuming is exact)
            self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or run_dir.name,
                                  tags=list(cfg.tags), mode=cfg.mode, dir=str(run_dir), id=run_id, resume="allow",
                                  config=run_config)
        except wandb.errors.Error as err:
            raise ConfigError(f"trainer.wandb: W&B did not start ({first_line(err)}); trainer.wandb.mode=offline "
                              "needs no network or account") from None
        id_file.write_text(self.run.id + "\n")

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        self.run.log(scalars | {tag: self.wandb.Histogram(values) for tag, values in histograms.items()}, step=step)

    def close(self) -> None:
        self.run.finish()
        # finish() may return before W&B's service process has written the run file out; teardown
        # waits for it (measured: an offline run's last 10 KB came seconds after finish returned)
        self.wandb.teardown()


class Dashboards:
    """Rank 0's dashboards of one run, as trainer.tensorboard and trainer.wandb ask."""

    def __init__(self, tc: TrainerConfig, run_dir: Path, start_step: int, run_config: dict):
        self.sinks: list[TensorBoardLog | WandbLog] = []
        if tc.tensorboard:
            self.sinks.append(TensorBoardLog(run_dir, start_step))
        if tc.wandb.mode != "disabled":
            self.sinks.append(WandbLog(tc.wandb, run_dir, run_config))

    def log(self, record: dict) -> None:
        scalars, histograms = scalars_of(record), expert_loads(record)
        for sink in self.sinks:
            sink.log(record["step"], scalars, histograms)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
