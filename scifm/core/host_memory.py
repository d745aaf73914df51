"""Host memory that CPU training frees and allocates again every step stays in the process.

glibc's malloc maps fresh pages for a large block (always above 32 MiB) and unmaps them on free,
and trims the heap whenever more than a few tens of MiB at its top are free; a training step
frees its activations and gradients each time, so the next step's tensors page-fault and are
zeroed by the kernel all over again (bench/host_memory.py, the small bf16 step at one thread:
173,352 page faults a step, against 28,993 with the settings here). Here every block comes from the
heap, and the heap gives memory back only past 1 GiB free at its top, as CUDA's caching allocator
keeps device memory. `python bench/host_memory.py` prints step time, page faults and peak RSS
with and without.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = (
    (M_MMAP_MAX, 0),  # no block is mapped on its own: all come from the heap and are reused
    (M_TRIM_THRESHOLD, 1 << 30),
    (M_TOP_PAD, 64 << 20),  # each time the heap grows, by this much more, so it grows seldom
)


def keep_freed_host_memory() -> bool:
    """Sets this process's malloc as the module docstring says; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)  # 1: accepted
