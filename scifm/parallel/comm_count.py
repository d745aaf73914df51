"""What collectives a piece of code issues, counted by kind, size and group: the measure the planner's
communication model is checked against (tests/test_plan_collectives.py, bench/tp_collectives.py).

`CollectiveRecorder` is a dispatch mode that lets DTensor run its operators first (as torch's
CommDebugMode does), so it sees the collectives DTensor issues inside them as well as those issued
directly: the functional ones (tensor parallelism) and c10d's in-place ones (FSDP2). On torch's fake
process group every collective returns at once with its real shapes, so one process can stand for
a rank of any group size."""

from __future__ import annotations

import torch
import torch.distributed.distributed_c10d as c10d
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

# a ring collective over n ranks passes its data (n-1)/n of the way this many times, in as many
# times n-1 latency steps
RING_PASSES = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


def _functional(name: str, args) -> tuple[str, int, int] | None:
    """(kind, bytes of the whole tensor, ranks) of a functional collective's arguments."""
    if name == "all_gather_into_tensor":  # (this rank's shard, group size, group name)
        return "all_gather", _nbytes(args[0]) * args[1], args[1]
    if name == "reduce_scatter_tensor":  # (the whole input, op, group size, group name)
        return "reduce_scatter", _nbytes(args[0]), args[2]
    if name == "all_reduce":  # (input, op, group name)
        return "all_reduce", _nbytes(args[0]), c10d._resolve_process_group(args[2]).size()
    if name == "all_to_all_single":  # (input, output splits, input splits, group name)
        return "all_to_all", _nbytes(args[0]), c10d._resolve_process_group(args[3]).size()
    return None


def _ranks(group) -> int:
    return c10d.ProcessGroup.unbox(group).size()  # the dispatcher hands the group over boxed


def _in_place(name: str, args) -> tuple[str, int, int] | None:
    """The same of an in-place c10d collective (output, input, process group, ...)."""
    if name in ("_allgather_base_", "allgather_into_tensor_coalesced_", "allgather_"):
        return "all_gather", _nbytes(args[0]), _ranks(args[2])
    if name in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
        return "reduce_scatter", _nbytes(args[1]), _ranks(args[2])
    if name == "allreduce_":  # (tensors, process group, ...)
        return "all_reduce", _nbytes(args[0]), _ranks(args[1])
    return None


class CollectiveRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.issued: list[tuple[str, int, int]] = []  # (kind, bytes of the whole tensor, ranks)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs the operator, its collectives come back through here
        namespace, name = func._schema.name.split("::")
        record = _functional(name, args) if namespace == "_c10d_functional" else \
            _in_place(name, args) if namespace == "c10d" else None
        if record is not None:
            self.issued.append(record)
        return func(*args, **(kwargs or {}))


def ring_cost(issued: list[tuple[str, int, int]]) -> tuple[float, int]:
    """(bytes each rank moves, latency steps) of `issued` collectives, each over a ring of its ranks;
    an all-to-all sends (n-1)/n of its input (an even share to each peer), to every peer at once: one step."""
    moved = steps = 0
    for kind, size, n in issued:
        passes = RING_PASSES.get(kind, 1)
        moved += passes * (n - 1) / n * size
        steps += 1 if kind == "all_to_all" else passes * (n - 1)
    return moved, steps
