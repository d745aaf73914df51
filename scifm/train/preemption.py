"""Pre-emption: USR1 (Slurm's warning before the time limit) or SIGTERM asks the run to stop.

The handler only sets a flag; the trainer reads it after each optimizer step through
`requested()`, which takes the maximum over all ranks, so every rank decides to checkpoint at
the same step even when the signal reached only some of them. The run then writes a checkpoint
and leaves with REQUEUE_EXIT_CODE, which the Slurm batch script (slurm/train.sbatch) turns into
`scontrol requeue`; the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from scifm.parallel.distributed import DistContext

# EX_TEMPFAIL of sysexits.h: "try again later"; distinct from errors (1, 2) and signals (128+n)
REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised by the training loop once the pre-emption checkpoint is written."""


class PreemptionWatch:
    """Installs the handlers for its lifetime (main thread only: Python delivers signals there)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def requested(self, ctx: DistContext) -> bool:
        """Collective: whether any rank has received a signal."""
        flag = torch.tensor([int(self.received is not None)], device=ctx.device)
        if ctx.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def exit_for_requeue() -> None:
    """After the process group is gone: os._exit, as the entry point does after multi-process runs
    (gloo's threads can abort a normal interpreter exit: docs/architecture.md, "Lessons from gloo on CPU")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(REQUEUE_EXIT_CODE)
