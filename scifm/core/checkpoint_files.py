"""Which directories are checkpoints a run can use: `step_N` under a run's checkpoints/, whose
meta.json (written last, before the directory is renamed into place) lists every file of the
checkpoint with its size, and every listed file is there with that size. The one rule for resume,
eval, export and the Slurm tasks: a checkpoint that a kill or a full disk left short is never
picked as the latest, and naming it gives one line saying what is wrong with it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from pathlib import Path

from scifm.core.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d+)$")
META_FILE = "meta.json"
IN_USE_PREFIX = ".in_use."  # a marker an evaluation leaves in a checkpoint while it reads it
# what a checkpoint written before meta.json listed its files must hold
LEGACY_FILES = ("train_state.pt", "loader.json", "config.yaml", "model/model.safetensors.index.json",
                "optimizer/model.safetensors.index.json", "tokenizer/tokenizer.json")


def file_sizes(ckpt: Path) -> dict[str, int]:
    """Every file under `ckpt` (but meta.json) by relative path, with its size: meta.json's list."""
    return {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != META_FILE}


def read_meta(ckpt: Path) -> dict:
    """meta.json, checked: a JSON object with an integer step and the file list; CheckpointError else."""
    path = ckpt / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not a complete scifm checkpoint directory (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise CheckpointError(f"{path}: no step number; the checkpoint is damaged")
    files = meta.get("files", {name: None for name in LEGACY_FILES})
    if not isinstance(files, dict) or not all(isinstance(s, int) or s is None for s in files.values()):
        raise CheckpointError(f"{path}: the file list is damaged")
    return meta | {"files": files}


def check_complete(ckpt: Path) -> dict:
    """meta.json of a checkpoint whose every file is present with its recorded size; else a
    CheckpointError naming the first file that is missing or of another size."""
    meta = read_meta(ckpt)
    for name, size in meta["files"].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: incomplete checkpoint, {name} is missing")
        if size is not None and path.stat().st_size != size:
            raise CheckpointError(f"{ckpt}: damaged checkpoint, {name} has {path.stat().st_size} bytes, "
                                  f"{size} were written")
    return meta


def is_complete(ckpt: Path) -> bool:
    try:
        check_complete(ckpt)
    except CheckpointError:
        return False
    return True


def require_complete(ckpt: Path) -> Path:
    """`ckpt`, or a CheckpointError naming it and what is wrong with it."""
    check_complete(ckpt)
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
    return int(m.group(1)) if m else read_meta(ckpt)["step"]


@contextlib.contextmanager
def marked_in_use(ckpt: Path):
    """While inside, `ckpt` holds a marker that checkpoint retention respects (it never deletes a
    checkpoint being evaluated). Best effort: a read-only checkpoint is evaluated unmarked."""
    marker = ckpt / f"{IN_USE_PREFIX}{socket.gethostname()}.{os.getpid()}"
    try:
        marker.touch()
    except OSError:
        marker = None
    try:
        yield
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


def in_use(ckpt: Path) -> bool:
    return any(ckpt.glob(f"{IN_USE_PREFIX}*"))
