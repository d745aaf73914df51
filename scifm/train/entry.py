"""`scifm train` / `python -m scifm.train`: Hydra composes the config, the trainer runs it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from scifm.config import RunConfig  # importing it registers run_schema, which configs/config.yaml names
from scifm.core.errors import ScifmError, exit_on_user_error
from scifm.core.hydra_compose import CONFIG_MODULE


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base=None)
def hydra_train(cfg: DictConfig) -> None:
    from scifm.train.trainer import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_cfg: RunConfig = OmegaConf.to_object(cfg)
    try:
        train(run_cfg, run_dir)
    except ScifmError as err:
        exit_on_user_error(err)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's threads can abort a normal interpreter exit after a successful run (docs/architecture.md, "Lessons from gloo on CPU")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
