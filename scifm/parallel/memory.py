"""What a rank holds: bytes of parameters, gradients and optimizer state (its shards only), and the
peak of what one training step allocates on top of them (activations, gradients, gathered
weights, communication buffers), measured where the device's allocator lets us."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def memory_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.named_parameters())
    optim = sum(_local_bytes(v) for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {
        "param_bytes": sum(_local_bytes(p) for _, p in params),
        "grad_bytes": sum(_local_bytes(p.grad) for _, p in params if p.grad is not None),
        "optimizer_bytes": optim,
        "expert_param_bytes": sum(_local_bytes(p) for n, p in params if ".experts." in n),
    }


@contextlib.contextmanager
def step_peak_bytes(device: torch.device) -> Iterator[dict[str, int]]:
    """Yields a dict that holds, once the block ends, `step_peak_bytes`: the largest amount the
    block allocated on `device` above what was allocated when it began. CUDA: the caching
    allocator's peak statistic. CPU: torch's profiler, which reports every CPU allocation and free
    (the CPU allocator keeps no peak of its own)."""
    result: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["step_peak_bytes"] = torch.cuda.max_memory_allocated(device) - start
        return
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints a line as it starts and as it stops
        prof.__enter__()
    try:
        yield result
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    result["step_peak_bytes"] = _peak_of_allocations(prof.profiler.kineto_results.experimental_event_tree())


def _peak_of_allocations(roots) -> int:
    allocation = torch._C._profiler._EventType.Allocation
    events, stack = [], list(roots)
    while stack:
        node = stack.pop()
        if node.tag == allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
        stack.extend(node.children)
    return peak_of_events(events)


def peak_of_events(events: list[tuple[int, int, int]]) -> int:
    """The highest sum of live allocations over (time, size, address) events, frees negative, taken in
    time order. Frees of memory allocated before profiling began may take the sum below zero, so the
    peak is >= 0. Some frees never reach the events (seen under FSDP and tensor parallelism: a block
    allocated at an address whose block was never seen freed). An address handed out again must have
    been freed, so an allocation at a live address frees the block there first, and that block's free,
    if it is recorded later, is not counted twice."""
    live: dict[int, int] = {}  # address -> size of the block allocated there
    freed_unseen: dict[int, int] = {}  # address -> frees implied by a reuse, whose event may still come
    total = peak = 0
    for _, size, address in sorted(events, key=lambda e: e[0]):
        if size > 0:
            if address in live:
                total -= live[address]
                freed_unseen[address] = freed_unseen.get(address, 0) + 1
            live[address] = size
            total += size
            peak = max(peak, total)
        elif freed_unseen.get(address) and live.get(address) != -size:
            freed_unseen[address] -= 1  # the late event of a free already implied
        else:
            total -= live.pop(address, -size)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null (the lines come from C++, past Python's sys.stderr)."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
