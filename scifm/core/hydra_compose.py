"""Composing a configuration from the packaged Hydra configs (scifm/configs, importable as
scifm.configs), with Hydra's and OmegaConf's errors as one-line ConfigErrors that start with the
full path of the key at fault."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from scifm.core.errors import ConfigError

CONFIG_MODULE = "scifm.configs"


def hydra_errors_as_config_errors(fn):
    """Hydra's and OmegaConf's errors as one `<key>: <what>` line (without Hydra's search path)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(describe_hydra_error(err)) from None

    return wrapped


def describe_hydra_error(err: Exception) -> str:
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        return f"{_full_key(err, cause)}: {_what_is_wrong(cause)}"
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        return _missing_config(err)
    if isinstance(err, OverrideParseException):
        return _unparsable(err.override)
    text = str(err)
    for pattern, describe in _HYDRA_MESSAGES:
        match = re.search(pattern, text)
        if match:
            return describe(match)
    return " ".join(text.strip().split("\n\n")[0].split())


def unknown_key_message(schema: type) -> str:
    """What to say about a key the schema (a dataclass) does not declare."""
    names = ", ".join(f.name for f in dataclasses.fields(schema))
    return f"no such key in {schema.__name__} (its keys: {names}); check the spelling"


def _what_is_wrong(cause: OmegaConfBaseException) -> str:
    first = str(cause.msg or cause).strip().splitlines()[0]
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and " not in " in first:
        if dataclasses.is_dataclass(cause.object_type):
            return unknown_key_message(cause.object_type)
        return f"{first}; add a new key with +{cause.full_key}=VALUE"
    return first


def _full_key(err: Exception, cause: OmegaConfBaseException) -> str:
    """OmegaConf names a key inside a list entry (data.sources=[{...}]) relative to that entry, which
    it checks on its own; the override the error came from gives the entry's path."""
    key = str(cause.full_key)
    override = _failed_override(str(err))
    if override is None:
        return key
    root = override.key_or_group
    if _on_one_path(key, root):
        return key
    inside = _locate(override.value(), key.split("."))
    return f"{root}{inside}" if inside is not None else f"{root}.{key}"


def _on_one_path(a: str, b: str) -> bool:
    """Whether one key is the other or lies inside it."""
    return a == b or a.startswith((f"{b}.", f"{b}[")) or b.startswith((f"{a}.", f"{a}["))


def _failed_override(message: str) -> Override | None:
    """The override Hydra's message quotes (`Error merging override K=V`, `... use +K=V`)."""
    match = re.search(r"(?:Error merging override |To append to your config use \+)(.+)", message, re.DOTALL)
    if match is None:
        return None
    try:
        return OverridesParser.create().parse_overrides([match.group(1).strip()])[0]
    except HydraException:
        return None


def _locate(value, parts: list[str], path: str = "") -> str | None:
    """The path (".a[0].b") inside a parsed override value at which the dotted `parts` exist."""
    if _has_path(value, parts):
        return f"{path}.{'.'.join(parts)}"
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, child in children:
        found = _locate(child, parts, f"{path}[{name}]" if isinstance(value, list) else f"{path}.{name}")
        if found is not None:
            return found
    return None


def _has_path(value, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def _missing_config(err: MissingConfigException) -> str:
    group, name = err.missing_cfg_file.rsplit("/", 1)
    available = f"; available: {', '.join(err.options)}" if err.options else ""
    return f"{group}: no config named {name!r}{available}"


def _unparsable(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    if "=" not in override and not override.startswith("~"):
        return f"{key}: no value; write {key}=VALUE"
    return (f"{key}: cannot parse the override {override!r}; quote a value with spaces or special characters "
            f"(https://hydra.cc/docs/advanced/override_grammar/basic)")


# Hydra errors without an OmegaConf cause: (pattern, one-line description of its match)
_HYDRA_MESSAGES = [
    (r"Ambiguous value for argument '([^=']+)=", lambda m: (
        f"{m.group(1)}: a comma makes a sweep; quote the value ('a,b'), make it a list ([a,b]) "
        f"or sweep with -m")),
    (r"Could not append to config\. An item is already at '([^']+)'", lambda m: (
        f"{m.group(1)}: already set; drop the + ({m.group(1)}=VALUE)")),
]


@hydra_errors_as_config_errors
def parse_overrides(overrides: list[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(overrides)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic sweeper: the product of every sweep override's values, in order."""
    parsed = parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [text]
        for o, text in zip(parsed, overrides)
    ]
    return [list(point) for point in itertools.product(*choices)]


@hydra_errors_as_config_errors
def compose_config(config_name: str, overrides: list[str], *, return_hydra_config: bool = False) -> DictConfig:
    """configs/<config_name>.yaml with the overrides, as `scifm train` or `scifm eval` would see it;
    the schema registered for it checks every key and type."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    reject_undeclared_keys(cfg)
    return cfg


def reject_undeclared_keys(cfg: DictConfig) -> None:
    """Hydra lets `+trainer.nope=1` add a key that no dataclass declares, which nothing would read."""
    found = next(_undeclared_keys(cfg, ""), None)
    if found is not None:
        path, schema = found
        raise ConfigError(f"{path}: {unknown_key_message(schema)}")


def _undeclared_keys(node, path: str):
    if node._is_none() or node._is_missing() or node._is_interpolation():
        return
    if isinstance(node, DictConfig):
        schema = OmegaConf.get_type(node)
        names = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in node.keys():
            if not path and key == "hydra":  # Hydra's own node (return_hydra_config=True)
                continue
            child = f"{path}.{key}" if path else str(key)
            if names is not None and key not in names:
                yield child, schema
            else:
                yield from _undeclared_keys(node._get_node(key), child)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _undeclared_keys(node._get_node(i), f"{path}[{i}]")
