"""Where a logged step's record goes: metrics.jsonl (one JSON object per logged step), the dashboards
(TensorBoard, W&B) and the live progress line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from scifm.core.formatting import format_duration
from scifm.train.dashboards import Dashboards


class MetricsLogger:
    def __init__(self, run_dir: Path, max_steps: int, start_step: int, dashboards: Dashboards):
        self.path = run_dir / "metrics.jsonl"
        self.max_steps = max_steps
        self.start_step = start_step
        self.dashboards = dashboards
        self.t0 = time.perf_counter()
        self._drop_steps_after(start_step)

    def _drop_steps_after(self, step: int) -> None:
        """A run resumed at `step` trains the steps after it again: the records a killed run wrote
        for them go, so the log holds each step once, from the trajectory the run continues."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.dashboards.log(record)
        step = record["step"]
        done = step - self.start_step
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.max_steps - step)
        line = (
            f"step {step}/{self.max_steps} | loss {record['loss']:.4f} | aux {record['aux_loss']:.4f}"
            f" | {record['tokens_per_s'] / 1000:.1f}k tok/s | lr {record['lr']:.2e} | ETA {format_duration(eta)}"
        )
        if "val_loss" in record:
            line += f" | val {record['val_loss']:.4f}"
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.dashboards.close()


def _step_of(line: str) -> float:
    """A record's step; a line a kill cut short has none and goes too."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
