"""The error hierarchy. The CLI turns a `GuardError` into one line on stderr and its exit code."""

from __future__ import annotations

from .exitcodes import ExitCode


class GuardError(Exception):
    """Base of every error the product reports to a user. `hint` is an optional second line. Exit code 1."""

    exit_code: int = ExitCode.CHECK_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class InputError(GuardError):
    """Bad input: a config, a flag, a missing dataset file, an existing output. Exit code 2."""

    exit_code = ExitCode.BAD_INPUT


class ConfigError(InputError):
    """A YAML config (policy, pipeline, audit) that does not validate."""


class DataError(GuardError):
    """Data that cannot be processed as asked (e.g. unreadable images under --strict). Exit code 1."""


class ImageDecodeError(Exception):
    """One record's image cannot be read; curation turns it into an `error` manifest row."""


class VerificationError(GuardError):
    """A check that failed: a prepared directory whose files do not match the fingerprints recorded at prepare time,
    a signature that does not verify, protected arrays that are not noisy copies. Exit code 1 (a failed check)."""

    exit_code = ExitCode.CHECK_FAILED
