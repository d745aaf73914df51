"""What collectives a piece of code issues, counted by kind and size: the measure the planner's
communication model is checked against (tests/test_plan_tp_collectives.py, bench/tp_collectives.py).

`CollectiveRecorder` is torch's CommDebugMode (which also sees the collectives DTensor issues inside
its operators) keeping each functional collective's kind and the bytes of the tensor it was given.
On torch's fake process group every collective returns at once with its real shape, so one process
can stand for a rank of any group size."""

from __future__ import annotations

from torch.distributed.tensor.debug import CommDebugMode

# a ring collective over n ranks passes its data (n-1)/n of the way this many times, in as many
# times n-1 latency steps
RING_PASSES = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}
_KINDS = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter", "all_reduce": "all_reduce"}


class CollectiveRecorder(CommDebugMode):
    def __init__(self):
        super().__init__()
        self.issued: list[tuple[str, int]] = []  # (kind, bytes of the tensor given to it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if func._schema.name.startswith("_c10d_functional::") and name in _KINDS:
            t = args[0]
            self.issued.append((_KINDS[name], t.numel() * t.element_size()))
        return super().__torch_dispatch__(func, types, args, kwargs)


def ring_cost(issued: list[tuple[str, int]], n: int) -> tuple[float, int]:
    """(bytes each rank moves, latency steps) of `issued` collectives over a ring of n ranks: an
    all-gather is given this rank's shard (the whole is n times it), a reduce-scatter and an
    all-reduce the whole tensor."""
    moved = steps = 0
    for kind, size in issued:
        whole = size * n if kind == "all_gather" else size
        moved += RING_PASSES[kind] * (n - 1) / n * whole
        steps += RING_PASSES[kind] * (n - 1)
    return moved, steps
