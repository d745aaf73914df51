"""keep_freed_host_memory: a CPU process that frees a step's tensors and allocates them again stops
page-faulting them in, as it does under glibc's default malloc settings."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# four tensors of 64 MiB (logits and their gradients are this size at 4 x 512 tokens of a
# 8,192-id vocabulary) made, touched and freed per "step"; counts the minor page faults of three
# steps after five of warm-up (the heap takes a few to grow to the pattern)
STEPS = """
import resource, sys, torch
from scifm.core.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
def step():
    held = [torch.ones(16 << 20) for _ in range(4)]
    del held
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_STEP = 4 * (64 << 20) // 4096


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_freed_tensors_are_reused_without_page_faults():
    default, keep = faults("default"), faults("keep")
    # glibc's defaults map each block and unmap it on free, so every step faults its 256 MiB in
    # again (4 KiB pages; fewer if the kernel backs some with huge pages, hence the half); kept, the
    # heap's blocks are reused
    assert default > 3 * PAGES_PER_STEP // 2, default
    assert keep < default // 20, (keep, default)
