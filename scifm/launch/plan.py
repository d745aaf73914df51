"""What a submission will run: each sweep point's overrides (as typed), validated config and run
directory. Run directories are fixed here, at submission, so that a requeued job and the eval
jobs find the same one; the job passes them on as hydra.run.dir."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from scifm.config import ClusterConfig, RunConfig, TrainerConfig
from scifm.core.errors import ConfigError
from scifm.core.hydra_compose import compose_config, expand_sweep, hydra_errors_as_config_errors, parse_overrides
from scifm.parallel.distributed import dims_of


@dataclass
class Point:
    overrides: list[str]  # the user's strings; a sweep's values as Hydra spells them
    run_dir: Path  # absolute
    cfg: RunConfig


@dataclass
class Plan:
    root: Path  # the run directory, or the sweep directory holding one run directory per point
    points: list[Point]
    cluster: ClusterConfig
    multirun: bool


def known_clusters() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in files("scifm.configs").joinpath("cluster").iterdir()
                  if p.name.endswith(".yaml"))


def hydra_quote(value: str) -> str:
    """A path as one Hydra override value (quoted: commas, brackets, spaces are no grammar then)."""
    if "'" in value or "\\" in value or "${" in value:
        raise ConfigError(f"path {value!r}: scifm submit cannot pass a path containing ', \\ or ${{ to Hydra")
    return f"'{value}'"


def checkpoint_steps(tc: TrainerConfig) -> list[int]:
    """The steps a run from step 0 saves at, by the trainer's own rule."""
    return [step for step in range(tc.max_steps + 1) if tc.saves_checkpoint_at(step)]


@hydra_errors_as_config_errors  # OmegaConf.to_object's errors too
def _compose(overrides: list[str]) -> tuple[RunConfig, DictConfig]:
    cfg = compose_config("config", overrides, return_hydra_config=True)
    hydra_cfg = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_object(cfg), hydra_cfg


def check_world(cfg: RunConfig) -> None:
    cluster, dims = cfg.cluster, dims_of(cfg.parallel)
    if dims.world_size != cluster.world_size:
        per_node = f"gpus_per_node={cluster.gpus_per_node}" if cluster.gpus_per_node else "1 CPU task per node"
        raise ConfigError(
            f"cluster: nodes={cluster.nodes} x {per_node} = {cluster.world_size} processes, but the parallel "
            f"layout pp={dims.pp} x dp_replicate={dims.dp_replicate} x dp_shard={dims.dp_shard} x tp={dims.tp} "
            f"needs {dims.world_size}{dims.ep_note()}; change cluster.nodes / cluster.gpus_per_node or the "
            f"parallel.* sizes"
        )
    dims.validate(cfg.model, cluster.world_size)  # the layout's other constraints (heads % tp, ...)


def make_plan(overrides: list[str], multirun: bool) -> Plan:
    for o in parse_overrides(overrides):
        if o.get_key_element().lstrip("+~") == "cluster" and not o.is_sweep_override():
            name = o.value()
            if name not in known_clusters():
                raise ConfigError(f"cluster={name}: unknown cluster; available: {', '.join(known_clusters())} "
                                  f"(scifm/configs/cluster/*.yaml)")
    points_overrides = expand_sweep(overrides) if multirun else [overrides]
    composed = [_compose(p) for p in points_overrides]
    first_hydra = composed[0][1]
    root = Path(first_hydra.sweep.dir if multirun else first_hydra.run.dir).absolute()
    points = []
    for i, (ovr, (cfg, _)) in enumerate(zip(points_overrides, composed)):
        cfg.validate()
        check_world(cfg)
        if cfg.cluster != composed[0][0].cluster:
            raise ConfigError("cluster: the points of a sweep share one job array and so one cluster shape; "
                              "submit each cluster.* setting separately")
        run_dir = root / str(i) if multirun else root
        hydra_quote(str(run_dir))
        points.append(Point(ovr, run_dir, cfg))
    return Plan(root, points, points[0].cfg.cluster, multirun)
