"""The corpus version and where a built corpus is cached; importing this loads no data libraries."""

from __future__ import annotations

import os
from pathlib import Path

# Bump whenever the documents a build writes would change; cached corpora of other versions are rebuilt.
CORPUS_VERSION = 1


def default_corpus_dir() -> Path:
    """$SCIFM_CACHE/corpus-v{CORPUS_VERSION}, with SCIFM_CACHE defaulting to ~/.cache/scifm."""
    cache = os.environ.get("SCIFM_CACHE") or Path.home() / ".cache" / "scifm"
    return Path(cache).expanduser() / f"corpus-v{CORPUS_VERSION}"
