"""Builds a directory once, safely across processes: the corpus and the built-in task set use it.

The directory is written beside its final place and swapped in, so a reader never sees half a build.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from scifm.core.errors import DataError


def build_once(out_dir: Path, *, marker: str, kind: str, is_current: Callable[[Path], dict | None],
               write: Callable[[Path], dict]) -> dict:
    """The report of an up-to-date build in `out_dir` (`is_current(out_dir)`), else `write(staging)`'s,
    after swapping the staged build in.

    Safe to call from several processes at once (e.g. every rank of a job): one builds, the others
    wait on a lock file beside `out_dir` and then find the finished build. `marker` is the file a
    finished build holds; a non-empty directory without it is not replaced (it is not a `kind`).
    """
    current = is_current(out_dir)
    if current is not None:  # checked before locking, so a read-only build can still be used
        return current
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = is_current(out_dir)
        if current is not None:
            return current
        if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / marker).exists():
            raise DataError(f"{out_dir} exists and is not a {kind}; build into an empty or new directory")
        staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            report = write(staging)
            swap_in(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return report


def swap_in(staging: Path, out_dir: Path) -> None:
    """Replaces out_dir by the staged build with renames, so the old build stays whole until then."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old)
