"""trainer.profile: torch.profiler over a window of training steps. Every rank writes its own Chrome
trace (profile/rank{R}.json, open it in chrome://tracing or Perfetto) so the ranks' timelines can be
laid side by side; rank 0 also writes its operators' totals (profile/ops.txt)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from scifm.config import ProfileConfig

PROFILE_DIR = "profile"


def step_marker(step: int) -> str:
    """The trace event that spans training step `step` (counted from 1)."""
    return f"scifm step {step}"


class StepProfiler:
    """Profiles steps start_step .. start_step + steps - 1 (an off config profiles nothing) but
    `memory_step`: on a CPU the process's first step measures memory.json's peak with torch's profiler,
    and a second profiler session at once crashes the process, so a window that holds that step
    starts after it, said in one line on rank 0."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device, memory_step: int | None):
        self.rank, self.out = rank, run_dir / PROFILE_DIR
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
        if cfg.start_step > 0 and memory_step is not None and self.first <= memory_step <= self.last:
            self.first = memory_step + 1
            if rank == 0:
                left = f"steps {self.first} to {self.last}" if self.first <= self.last else "no step"
                print(f"trainer.profile: step {memory_step} measures memory.json with torch's profiler, which "
                      f"does not nest; profiling {left}", flush=True)
        self.prof: profile | None = None

    def step(self, step: int):
        """A context around training step `step`: starts the profiler at the window's first step and
        writes the traces after its last one."""
        return self._profiled(step) if self.first > 0 and self.first <= step <= self.last else nullcontext()

    @contextmanager
    def _profiled(self, step: int):
        if self.prof is None:
            self.prof = profile(activities=self.activities)
            self.prof.__enter__()
        with record_function(step_marker(step)):
            yield
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Writes what was profiled; a run that stops inside the window keeps the steps it profiled."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / f"rank{self.rank}.json"))
        if self.rank == 0:
            (self.out / "ops.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=80))
