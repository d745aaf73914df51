"""A run directory's logged metrics (metrics.jsonl), by step."""

from __future__ import annotations

import json
from pathlib import Path


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(run_dir).items()}
