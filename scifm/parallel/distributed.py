"""Process-group set-up from torchrun's environment, and a shutdown that cannot crash at exit."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from scifm.parallel.config import ParallelConfig
from scifm.model.config import ModelConfig
from scifm.parallel.dims import ParallelDims


@dataclass
class DistContext:
    dims: ParallelDims
    rank: int
    world_size: int
    device: torch.device
    mesh: object | None  # DeviceMesh when world_size > 1, or under an engine that needs process groups
    # what an engine set up over the process groups (Megatron's parallel state), torn down before them
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def submesh(self, *names: str):
        # torch warns that slicing flattened dims from the root will change; until its
        # replacement exists in every supported version this is the documented way
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            return self.mesh[names if len(names) > 1 else names[0]]

    @property
    def dp_rank(self) -> int:
        return self.submesh("dp").get_local_rank() if self.mesh is not None else 0

    @property
    def dp_group(self):
        return self.submesh("dp").get_group() if self.mesh is not None else None

    def same_path_everywhere(self, path):
        """Rank 0's path on every rank (Hydra's timestamped run dirs may differ by a second)."""
        if not self.distributed:
            return path
        box = [str(path)]
        dist.broadcast_object_list(box, src=0)
        return type(path)(box[0])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor, group=None) -> torch.Tensor:
        """In place over `group` (default: the data-parallel group); a no-op in one process. CPU
        tensors go through this process's device (NCCL reduces only GPU tensors)."""
        if self.distributed:
            on_device = t.to(self.device)
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group if group is not None else self.dp_group)
            if on_device is not t:
                t.copy_(on_device)
        return t


def dims_of(cfg: ParallelConfig) -> ParallelDims:
    return ParallelDims(cfg.dp_replicate, cfg.dp_shard, cfg.tp, cfg.pp, cfg.ep)


def init_distributed(cfg: ParallelConfig, model: ModelConfig, device: torch.device) -> DistContext:
    """Validates the layout against the model and the world before any process group is made;
    `device` is this process's (scifm.core.device.pick_device)."""
    dims = dims_of(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dims.validate(model, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size == 1 and cfg.engine != "megatron":
        return DistContext(dims, 0, 1, device, None)
    if world_size == 1 and not dist.is_initialized():
        # Megatron-Core keeps its parallel state in process groups, even for one process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    mesh = dims.build_mesh(device.type)
    return DistContext(dims, dist.get_rank(), world_size, device, mesh)


def shutdown(ctx: DistContext) -> None:
    """Barrier then destroy: gloo's threads can abort the interpreter at exit otherwise
    (docs/architecture.md, "Lessons from gloo on CPU"); the entry point then leaves with os._exit."""
    for teardown in reversed(ctx.on_shutdown):
        teardown()
    ctx.on_shutdown.clear()
    if ctx.distributed:
        dist.barrier()
        dist.destroy_process_group()
