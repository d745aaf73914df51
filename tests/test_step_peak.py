"""The step's peak memory on CPU, from the profiler's allocation events (scifm/parallel/memory.py)."""

from __future__ import annotations

import torch

from scifm.parallel.memory import peak_of_events, step_peak_bytes


def test_peak_is_the_most_live_at_once_frees_before_profiling_included():
    # (time, size, address): a 100-byte block, a 50-byte one, the first freed, a 30-byte one; then a
    # block allocated before profiling (address 9) is freed
    events = [(1, 100, 1), (2, 50, 2), (3, -100, 1), (4, 30, 3), (5, -40, 9), (6, 80, 4)]
    assert peak_of_events(events) == 150


def test_an_address_handed_out_again_was_freed_even_where_no_free_was_recorded():
    """Some frees never reach the profiler's events (seen under FSDP and tensor parallelism); the
    allocator can only hand an address out again once it is free, so the reuse frees the block there,
    and a late event for it is not counted again. Counting both blocks gives 300 here, the truth 200."""
    events = [(1, 100, 1), (2, 200, 1), (3, -100, 1), (4, -200, 1), (5, 100, 2)]
    assert peak_of_events(events) == 200
    # without the late event the same
    assert peak_of_events([(1, 100, 1), (2, 200, 1), (3, -200, 1), (4, 100, 2)]) == 200
    # the late event frees nothing: the 200-byte block is still live when 300 more arrive (taking it
    # for the 200-byte block's free would give 300)
    assert peak_of_events([(1, 100, 1), (2, 200, 1), (3, -100, 1), (4, 300, 2), (5, -200, 1)]) == 500


def test_a_real_step_peak_counts_what_is_live_at_once():
    x = torch.randn(256, 256)
    with step_peak_bytes(torch.device("cpu")) as peak:
        a = x * 2  # 256 KiB
        b = a + 1  # 256 KiB, both live
        del a
        c = b * 3  # a's memory (or another block): two live at once again
        del b, c
    # two 256 KiB tensors, plus a few bytes of the ops' own bookkeeping (12 here)
    assert 2 * 256 * 256 * 4 <= peak["step_peak_bytes"] < 2 * 256 * 256 * 4 + 1024
