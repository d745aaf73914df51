"""User-facing errors. Each message says what is wrong and what to do about it."""


class ScifmError(Exception):
    """Base class of every error a user is meant to read (the CLI prints it on one line)."""


class ConfigError(ScifmError):
    """A configuration key has a bad value; the message names the key's path."""


class DataError(ScifmError):
    """Input data cannot be used (missing file, malformed document, too many bad records)."""


class DocumentFormatError(DataError):
    """One document breaks the format of DESIGN.md; `reason` is a short counted category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class BadFractionExceeded(DataError):
    """A source's fraction of skipped documents passed the configured budget."""


class CheckpointError(ScifmError):
    """A checkpoint is missing, incomplete or belongs to another configuration."""
