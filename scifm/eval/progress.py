"""The live progress line of an evaluation: items done, rate and ETA, at most about once a second."""

from __future__ import annotations

import sys
import time

from scifm.core.formatting import format_duration


class Progress:
    def __init__(self, label: str, total: int, min_interval_s: float = 1.0):
        self.label, self.total, self.done = label, total, 0
        self.min_interval_s = min_interval_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        now = time.perf_counter()
        if now - self.last >= self.min_interval_s:
            self.last = now
            self._print(now)

    def finish(self) -> float:
        """Prints the final line; returns the elapsed seconds."""
        self.done = self.total
        now = time.perf_counter()
        self._print(now)
        return now - self.t0

    def _print(self, now: float) -> None:
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        print(f"{self.label} | {self.done}/{self.total} items | {rate:.1f} items/s | "
              f"{'done in ' + format_duration(elapsed) if self.done == self.total else 'ETA ' + format_duration(eta)}",
              file=sys.stderr, flush=True)
