"""Composing a configuration from the packaged Hydra configs (scifm/configs, importable as
scifm.configs), with Hydra's and OmegaConf's errors as one-line ConfigErrors."""

from __future__ import annotations

import functools

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from scifm.core.errors import ConfigError

CONFIG_MODULE = "scifm.configs"


def hydra_errors_as_config_errors(fn):
    """Hydra's and OmegaConf's errors as one `scifm: error:` line (without Hydra's search path)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(" ".join(str(err).strip().split("\n\n")[0].split())) from None

    return wrapped


@hydra_errors_as_config_errors
def compose_config(config_name: str, overrides: list[str], *, return_hydra_config: bool = False) -> DictConfig:
    """configs/<config_name>.yaml with the overrides, as `scifm train` or `scifm eval` would see it;
    the schema registered for it checks every key and type."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)
