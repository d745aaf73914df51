"""The built-in task set's version and cache directory; importing this loads no data libraries."""

from __future__ import annotations

from pathlib import Path

from scifm.data.corpus.version import default_corpus_dir

# Bump whenever the items a build writes would change; cached task sets of other versions are rebuilt.
TASKS_VERSION = 1


def default_tasks_dir() -> Path:
    """$SCIFM_CACHE/eval-tasks-v{TASKS_VERSION}, beside the corpus (same cache resolution)."""
    return default_corpus_dir().parent / f"eval-tasks-v{TASKS_VERSION}"
