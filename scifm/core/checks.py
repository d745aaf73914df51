"""Range checks of typed configs: one line naming the key's path."""

from __future__ import annotations

from scifm.core.errors import ConfigError


def require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")
