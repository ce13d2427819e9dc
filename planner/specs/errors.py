"""Errors that map to the CLI's exit codes (see ARCHITECTURE.md).

``SpecError`` (exit 2) always names the file, the field and what was expected,
so a user can fix the input without reading code. ``InfeasibleError`` (exit 3)
says what binds.
"""

from __future__ import annotations


class SpecError(ValueError):
    """Bad input: a file or field that is missing, mistyped or inconsistent."""

    exit_code = 2

    def __init__(self, source: str, field: str, expected: str, got: object = None):
        self.source, self.field, self.expected, self.got = source, field, expected, got
        got_text = "" if got is None else f" (got {got!r})"
        super().__init__(f"{source}: field '{field}': expected {expected}{got_text}")


class InfeasibleError(RuntimeError):
    """The job has no layout that fits; the message says what binds."""

    exit_code = 3
