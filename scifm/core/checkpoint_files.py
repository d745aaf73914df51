"""Which directories are checkpoints a run can use: `step_N` under a run's checkpoints/, complete
once meta.json (written last, before the directory is renamed into place) exists. The one rule
for resume, eval, export and the Slurm tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

from scifm.core.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d+)$")
META_FILE = "meta.json"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / META_FILE).is_file()


def require_complete(ckpt: Path, what: str) -> Path:
    """`ckpt`, or a CheckpointError naming `what` (e.g. "resume=PATH") when it is not complete."""
    if not is_complete(ckpt):
        raise CheckpointError(f"{what}: not a complete scifm checkpoint directory (no {META_FILE})")
    return ckpt


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (a run's checkpoints/), in step order."""
    steps = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(steps)]


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def step_of(ckpt: Path) -> int:
    m = STEP_DIR.match(ckpt.name)
    return int(m.group(1)) if m else json.loads((ckpt / META_FILE).read_text())["step"]
