"""`scifm train` / `python -m scifm.train`: the command line's config is checked, then Hydra
composes it (run directory, .hydra/, -m sweeps) and the trainer runs it.

Hydra reports a bad override itself in several lines with exit status 1, and under torchrun every
rank would print each error; so the overrides are composed and validated first, and a config error
is one `scifm: error:` line with status 2, printed by rank 0 alone.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser  # the parser hydra.main reads sys.argv with
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from scifm.config import RunConfig, compose_run_config  # importing it registers run_schema
from scifm.core.errors import ConfigError, ScifmError, exit_on_user_error
from scifm.core.hydra_compose import CONFIG_MODULE, expand_sweep
from scifm.train.prework import check_before_work

# how long a rank other than 0 waits before leaving on a config error (see exit_on_config_error)
QUIET_RANK_WAIT_S = 30.0


def hydra_train() -> None:
    """The overrides in sys.argv, checked (every point of a -m sweep), then run by Hydra."""
    # DeepSpeed's launcher appends --local_rank=N unless told --no_local_rank; the rank is in the
    # environment (LOCAL_RANK) as under torchrun, and Hydra would refuse the flag
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank=")]
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        exit_on_config_error(err)
    hydra_job()


def check_command_line(argv: list[str]) -> None:
    args = get_args_parser().parse_args(argv)
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.config_path
            or args.config_dir or args.experimental_rerun or args.config_name not in (None, "config")):
        return  # Hydra prints help or composes another config; it reports on that itself
    multirun = args.multirun or "hydra.mode=MULTIRUN" in args.overrides
    for overrides in expand_sweep(args.overrides) if multirun else [args.overrides]:
        cfg = compose_run_config(overrides)
        if args.cfg is None:  # --cfg only prints the config, whatever its values
            check_before_work(cfg)


def exit_on_config_error(err: ConfigError) -> None:
    """A config error is the same on every rank, so rank 0 alone prints it. The others leave with the
    same status, but only after a wait: torchrun stops every worker once one fails, and a rank that
    left at once could get rank 0 stopped before it printed. The launcher's stop ends the wait."""
    if int(os.environ.get("RANK", "0")) != 0:
        signal.signal(signal.SIGTERM, _leave_quietly)
        time.sleep(QUIET_RANK_WAIT_S)
        sys.exit(2)
    exit_on_user_error(err)


def _leave_quietly(signum, frame) -> None:
    sys.exit(2)


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base=None)
def hydra_job(cfg: DictConfig) -> None:
    from scifm.train.trainer import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_cfg: RunConfig = OmegaConf.to_object(cfg)
    try:
        train(run_cfg, run_dir)
    except ConfigError as err:
        exit_on_config_error(err)
    except ScifmError as err:
        exit_on_user_error(err)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's threads can abort a normal interpreter exit after a successful run (docs/architecture.md, "Lessons from gloo on CPU")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
