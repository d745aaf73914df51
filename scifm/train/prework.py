"""What a run checks before any work, the same on every rank: the config's ranges, the layout against
the model and the world, and that the engine, FP8 backend and dashboards it asks for are there.
The command line runs it for every point of a sweep before Hydra starts one; `train` runs it again
for callers that come straight to it."""

from __future__ import annotations

import os

import torch

from scifm.config import RunConfig
from scifm.core.checks import require
from scifm.core.device import pick_device
from scifm.hf.pretrained import pretrained_model_config
from scifm.parallel.deepspeed_engine import require_deepspeed
from scifm.parallel.distributed import dims_of
from scifm.parallel.fp8 import resolve_fp8
from scifm.parallel.megatron_engine import check_megatron
from scifm.train.dashboards import require_dashboards


def check_before_work(cfg: RunConfig) -> torch.device:
    """Fills in model.init_from's architecture, then raises ConfigError at the first problem; returns
    this process's device."""
    cfg.model = pretrained_model_config(cfg.model)
    cfg.validate()
    device = pick_device(cfg.trainer.device, "trainer.device")
    dims_of(cfg.parallel).validate(cfg.model, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.parallel.engine == "deepspeed":
        require_deepspeed()
    if cfg.parallel.engine == "megatron":
        check_megatron(cfg.parallel, cfg.model, cfg.trainer.precision, device)
    if cfg.trainer.precision == "fp8":
        backend, _ = resolve_fp8(cfg.trainer.fp8, device)  # a backend or recipe this machine lacks
        require(backend != "te" or cfg.parallel.engine != "deepspeed", "trainer.fp8.backend",
                "te keeps FP8 scaling state per rank, which the checkpoints of parallel.engine=deepspeed do not "
                "carry; use trainer.fp8.backend=torchao, or parallel.engine=native")
        require(backend != "te" or cfg.parallel.tp == 1, "trainer.fp8.backend",
                "te's Linear is not an nn.Linear, which parallel.tp shards (te splits its layers by its own "
                "tensor-parallel settings, which scifm does not make); use trainer.fp8.backend=torchao with tp > 1")
    require_dashboards(cfg.trainer)
    return device
