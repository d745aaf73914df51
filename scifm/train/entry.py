"""`scifm train` / `python -m scifm.train`: Hydra composes the config, the trainer runs it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from scifm.config import RunConfig
from scifm.errors import ScifmError

CONFIG_MODULE = "scifm.configs"


def compose_run_config(overrides: list[str]) -> RunConfig:
    """The RunConfig `scifm train` would run with these overrides (for scripts and tests)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_object(cfg)


def exit_on_user_error(err: ScifmError) -> None:
    print(f"scifm: error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base=None)
def hydra_train(cfg: DictConfig) -> None:
    from scifm.train.trainer import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        train(OmegaConf.to_object(cfg), run_dir)
    except ScifmError as err:
        exit_on_user_error(err)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's threads can abort a normal interpreter exit after a successful run (PARALLEL-NOTES)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
