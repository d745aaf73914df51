"""User-facing errors. Each message says what is wrong and what to do about it."""

from __future__ import annotations

import sys


class ScifmError(Exception):
    """Base class of every error a user is meant to read (the CLI prints it on one line)."""


class ConfigError(ScifmError):
    """A configuration key has a bad value; the message names the key's path."""


class DataError(ScifmError):
    """Input data cannot be used (missing file, malformed document, too many bad records)."""


class DocumentFormatError(DataError):
    """One document breaks the document format (docs/architecture.md); `reason` is a short counted category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class BadFractionExceeded(DataError):
    """A source's fraction of skipped documents passed the configured budget."""


class CheckpointError(ScifmError):
    """A checkpoint is missing, incomplete or belongs to another configuration."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def exit_on_user_error(err: ScifmError) -> None:
    """The one way a command reports a user's mistake: one line on stderr, exit status 2."""
    print(f"scifm: error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)
