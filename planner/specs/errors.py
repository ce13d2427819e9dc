"""Errors that map to the CLI's exit codes (see ARCHITECTURE.md and the
README): 0 ok, 1 a --gate failed, 2 bad input (``SpecError``), 3 no
feasible layout (``InfeasibleError``), 4 an internal error (anything else:
a bug, reported with a request to file it).

``SpecError`` always names the file or flag, the field, what was expected
and what was found, so a user can fix the input without reading code. It
can carry several problems of one source at once, so that fixing one does
not merely reveal the next.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence

INTERNAL_ERROR_EXIT_CODE = 4
WHOLE_FILE = "<file>"  # the field of a problem with the file itself

# (field, what was expected, what was found or None)
Problem = tuple[str, str, object]


def _describe(source: str, field: str, expected: str, got: object) -> str:
    got_text = "" if got is None else f" (got {_short(got)})"
    # A flag is its own field: "--cp: expected ..." rather than "--cp: field 'cp': ...".
    if source.startswith("--") and source.lstrip("-").replace("-", "_") == field:
        return f"expected {expected}{got_text}"
    if field.startswith("--"):
        return f"{field}: expected {expected}{got_text}"
    if field == WHOLE_FILE:  # the file itself: missing, unreadable, not the format
        return f"expected {expected}{got_text}"
    return f"field '{field}': expected {expected}{got_text}"


def _short(value: object, limit: int = 80) -> str:
    """``repr`` of a found value, cut so that one line stays one line (and
    a huge value costs no more than its first items: reprlib's limits)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    """``text`` on one line: control characters (a newline in a field name or
    a path) as their escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


class SpecError(ValueError):
    """Bad input: a file or flag whose fields are missing, mistyped,
    impossible or inconsistent. ``source``/``field``/``expected``/``got`` are
    the first problem's; ``problems`` lists them all."""

    exit_code = 2

    def __init__(self, source: str, field: str, expected: str, got: object = None, more: Sequence[Problem] = ()):
        self.source, self.field, self.expected, self.got = source, field, expected, got
        self.problems: list[Problem] = [(field, expected, got), *more]
        described = "; ".join(_describe(source, *problem) for problem in self.problems)
        count = f"{len(self.problems)} problems: " if len(self.problems) > 1 else ""
        super().__init__(_printable(f"{source}: {count}{described}"))

    @classmethod
    def of(cls, source: str, problems: Sequence[Problem]) -> SpecError:
        """One error for all of ``problems`` (at least one) of ``source``."""
        return cls(source, *problems[0], more=problems[1:])


class InfeasibleError(RuntimeError):
    """The job has no layout that fits; the message says what binds."""

    exit_code = 3
