"""The exit codes of every `guard` command, in one place: the CLI, the errors and the docs (docs/cli.md) use these."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CHECK_FAILED = 1  # guard verify found a FAIL, prepare --strict met a bad record, data failed its recorded sha256s
    BAD_INPUT = 2  # a config, an option, a file or a folder that is missing or wrong; nothing was done
    COPIES_FOUND = 3  # guard audit / guard run: a sample copies a protected original; guard membership: ATTENTION
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), or the command was aborted


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "ok",
    ExitCode.CHECK_FAILED: "a check failed (verify FAIL, prepare --strict, data not matching its fingerprints)",
    ExitCode.BAD_INPUT: "bad input (a config key, an option, a missing file); nothing was done",
    ExitCode.COPIES_FOUND: "copies found (audit, run); membership: ATTENTION",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C) or aborted",
}


def exit_code_lines() -> list[str]:
    """One line per code, `CODE  meaning`, in ascending order (the epilog of `guard --help`)."""
    return [f"{int(code):>3}  {MEANINGS[code]}" for code in ExitCode]
