"""The progress bar of long work (corpus build, tokenizer training, evaluation, export): items done,
rate and ETA, redrawn in place at most about once a second.

It draws only on a terminal: in a log file or a Slurm job's output every redraw would be one more
line, so there it stays silent (the work's own result lines say what happened).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from scifm.core.formatting import format_duration

BAR_WIDTH = 24


def draws_on(stream: TextIO) -> bool:
    """A bar is drawn on a terminal, and never inside a Slurm job (SLURM_JOB_ID set), whose
    output a pseudo-terminal may carry when run interactively (srun --pty) but is still a log."""
    isatty = getattr(stream, "isatty", None)
    return not os.environ.get("SLURM_JOB_ID") and callable(isatty) and bool(isatty())


class Progress:
    def __init__(self, label: str, total: int, unit: str = "items", *, stream: TextIO | None = None,
                 min_interval_s: float = 1.0):
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = draws_on(self.stream)
        self.min_interval_s = min_interval_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, n: int = 1) -> None:
        """`n` more items are done."""
        self.done = min(self.total, self.done + n)
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.min_interval_s:
            self.last = now
            self._draw(now, end="")

    def finish(self) -> float:
        """Draws the full bar and ends its line; returns the elapsed seconds."""
        self.done = self.total
        now = time.perf_counter()
        if self.enabled:
            self._draw(now, end="\n")
        return now - self.t0

    def _draw(self, now: float, end: str) -> None:
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        filled = BAR_WIDTH * self.done // max(self.total, 1)
        when = (f"done in {format_duration(elapsed)}" if self.done == self.total
                else f"ETA {format_duration((self.total - self.done) / rate) if rate > 0 else '?'}")
        line = (f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total} {self.unit}"
                f" | {rate:.1f} {self.unit}/s | {when}")
        # \r returns to the line's start, \x1b[K clears what a longer previous line left
        self.stream.write(f"\r{line}\x1b[K{end}")
        self.stream.flush()
