"""One source of defaults (issue 9): the typed dataclasses hold every default, and the YAML files
under scifm/configs hold only what a preset changes.

The dataclass of each group is read off the root schema's fields (RunConfig.trainer is the
TrainerConfig, ...), so these tests follow the classes wherever their modules live.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, ListConfig, OmegaConf

import scifm.configs
from scifm.config import RunConfig  # registers run_schema
from scifm.eval.config import EvalRunConfig  # registers eval_run_schema

CONFIG_DIR = Path(scifm.configs.__file__).parent
PRIMARY = {"config.yaml": RunConfig, "eval_run.yaml": EvalRunConfig}  # root file -> its schema
GLOBAL_GROUPS = {"experiment": RunConfig}  # groups written as `# @package _global_` overrides of the root
NOT_VALUES = {"defaults", "hydra"}  # root-level keys that are Hydra's, not the schema's
_ABSENT = object()


def compose_cfg(config_name: str, overrides: list[str]):
    with initialize_config_module(config_module="scifm.configs", version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def group_root(group: str) -> type:
    """The root schema a config group belongs to."""
    if group in GLOBAL_GROUPS:
        return GLOBAL_GROUPS[group]
    for root in PRIMARY.values():
        if group in {f.name for f in dataclasses.fields(root)}:
            return root
    raise AssertionError(f"configs/{group}/ is no field of {', '.join(r.__name__ for r in PRIMARY.values())}; "
                         f"map it in {Path(__file__).name}")


def package_of(path: Path) -> str | None:
    """The file's `# @package` directive, if any (Hydra reads it from the header comments)."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("# @package"):
            return line.removeprefix("# @package").strip()
        if line and not line.startswith("#"):
            break
    return None


def leaves(node, prefix: str = ""):
    """(dotted path, value) of every leaf; a list or an empty dict below the top is one leaf."""
    if isinstance(node, dict) and (node or not prefix):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def redundant_keys(root: type, values: dict, prefix: str = "") -> list[str]:
    """Key paths (relative to `root`) whose value, merged into the schema as Hydra merges it,
    equals the dataclass default."""
    schema = OmegaConf.structured(root)
    nested = values
    for part in reversed(prefix.split(".") if prefix else []):
        nested = {part: nested}
    merged = OmegaConf.merge(schema, nested)
    found = []
    for rel, _ in leaves(values):
        path = f"{prefix}.{rel}" if prefix else rel
        default = OmegaConf.select(schema, path, default=_ABSENT, throw_on_missing=False)
        if default is _ABSENT:  # e.g. a new key of a dict field (cluster.env): nothing to repeat
            continue
        if plain(OmegaConf.select(merged, path)) == plain(default):
            found.append(path)
    return found


def yaml_files() -> list[tuple[str, type, str, Path]]:
    """(label, root schema, package prefix, file) of every YAML file under scifm/configs."""
    files = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        rel = path.relative_to(CONFIG_DIR)
        if len(rel.parts) == 1:
            assert rel.name in PRIMARY, f"{rel}: a new root config; name its schema in PRIMARY"
            files.append((str(rel), PRIMARY[rel.name], "", path))
            continue
        group = rel.parts[0]
        package = package_of(path)
        if package is None:
            package = "/".join(rel.parts[:-1])
        prefix = "" if package == "_global_" else package.replace("/", ".")
        if group in GLOBAL_GROUPS:
            assert prefix == "", f"{rel}: expected `# @package _global_`"
        files.append((str(rel), group_root(group), prefix, path))
    return files


def test_default_config_is_the_dataclass_defaults():
    cfg = OmegaConf.to_object(compose_cfg("config", []))
    defaults = RunConfig()
    for group in ("trainer", "parallel", "data"):
        got, want = getattr(cfg, group), getattr(defaults, group)
        assert type(got) is type(want)
        assert got == want, f"{group}: composed {got} != {type(want).__name__}() {want}"
    # the old trainer/default.yaml lacked these; they must still come from TrainerConfig
    assert (cfg.trainer.beta1, cfg.trainer.beta2) == (defaults.trainer.beta1, defaults.trainer.beta2)


def test_no_yaml_file_repeats_a_dataclass_default():
    files = yaml_files()
    groups = {Path(label).parts[0] for label, *_ in files if "/" in label}
    assert {"model", "data", "trainer", "parallel", "cluster", "experiment", "eval"} <= groups
    redundant = []
    for label, root, prefix, path in files:
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if not prefix:  # root-level content: Hydra's own keys are not schema values
            values = {k: v for k, v in values.items() if k not in NOT_VALUES}
        else:
            values = {k: v for k, v in values.items() if k != "defaults"}
        redundant += [f"{label}: {key}" for key in redundant_keys(root, values, prefix)]
    assert not redundant, ("these YAML keys repeat the dataclass default (delete them; the dataclass is "
                           "the one source of defaults):\n  " + "\n  ".join(redundant))


def test_redundancy_check_catches_a_repeated_default():
    values = {"trainer": {"beta1": 0.9, "lr": 1.0, "max_steps": 300}, "data": {"sources": [{"path": "builtin"}]},
              "cluster": {"env": {"NCCL_DEBUG": "WARN"}, "setup": []}}
    assert sorted(redundant_keys(RunConfig, values)) == [
        "cluster.setup", "data.sources", "trainer.beta1", "trainer.max_steps"]
    assert redundant_keys(EvalRunConfig, {"max_items": 0, "tasks": ["tpsa"]}, "eval") == ["eval.max_items"]


def test_group_files_compose_and_keep_every_key():
    cfg = OmegaConf.to_object(compose_cfg("config", [
        "trainer=default", "parallel=single", "data=builtin",
        "parallel.engine=native", "trainer.beta1=0.8", "data.seq_len=128"]))
    assert cfg.parallel.engine == "native"
    assert cfg.trainer.beta1 == 0.8
    assert cfg.data.seq_len == 128
    assert cfg.parallel == RunConfig().parallel


@pytest.mark.parametrize("group,option", [(p.parent.name, p.stem) for p in sorted(CONFIG_DIR.glob("*/*.yaml"))])
def test_every_preset_composes_and_validates(group, option):
    if group_root(group) is EvalRunConfig:
        cfg = OmegaConf.to_object(compose_cfg("eval_run", ["checkpoint=x", f"{group}={option}"]))
        cfg.eval.validate()
    else:
        cfg = OmegaConf.to_object(compose_cfg("config", [f"{group}={option}"]))
        cfg.validate()
