"""Reading a Hugging Face ``config.json`` field by field: each value checked
for its type (an integer is an integer, not ``true`` or ``"16"``), its
range (what no model has is refused, with the limit in the message) and
finiteness, and every problem collected, so one error names them all.

``ConfigReader(config, source, prefix)`` reads one mapping (``prefix`` is
where it sits in the file, e.g. ``text_config``); ``read.int("hidden_size")``
returns the value, or a harmless placeholder after recording a problem;
``read.check()`` raises the ``SpecError`` listing every problem.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from loom.planner.specs.errors import Problem, SpecError

# What no model has: the largest published decoders have ~200 layers,
# hidden sizes of ~25K, a few hundred heads, vocabularies of ~260K and
# context windows of a few million tokens. Each limit leaves ample room.
LIMITS = {
    "layers": 10_000,
    "width": 1 << 20,  # hidden, ffn, head dims, latent ranks
    "heads": 1 << 14,
    "vocab": 1 << 24,
    "positions": 1 << 26,
    "experts": 1 << 16,
}
MIN_VOCAB = 256  # a byte-level vocabulary; anything smaller is not a language model's


class ConfigReader:
    """Typed, bounded access to one mapping of a model config."""

    def __init__(self, config: dict, source: str, prefix: str = "", problems: list[Problem] | None = None):
        self.config, self.source, self.prefix = config, source, prefix
        self.problems: list[Problem] = [] if problems is None else problems

    def field(self, key: str) -> str:
        """The field's name as the error message gives it."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def nested(self, key: str) -> ConfigReader | None:
        """The reader of a nested mapping (problems shared), or None when absent."""
        value = self.config.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problems.append((self.field(key), "a mapping of the sub-model's fields", value))
            return None
        return ConfigReader(value, self.source, self.field(key), self.problems)

    def has(self, *keys: str) -> bool:
        return any(self.config.get(key) is not None for key in keys)

    def _pick(self, keys: tuple[str, ...]) -> tuple[str, Any]:
        """The first of ``keys`` present (families name fields differently)."""
        for key in keys:
            if self.config.get(key) is not None:
                return key, self.config[key]
        return keys[0], None

    def int(self, *keys: str, default: int | None = None, low: int = 1, high: int | None = None, placeholder: int = 1) -> int:
        """An integer in [low, high]; ``default`` when absent (required when None)."""
        key, value = self._pick(keys)
        if value is None:
            if default is None:
                self._missing(keys)
                return placeholder
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append((self.field(key), "an integer", value))
            return placeholder
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"an integer from {low} to {high:,}"
            self.problems.append((self.field(key), bound, value))
            return placeholder
        return value

    def _missing(self, keys: tuple[str, ...]) -> None:
        """Record a required field that the config lacks."""
        self.problems.append((self.field(keys[0]), f"a value in the model config (looked for {', '.join(self.field(k) for k in keys)})", None))

    def number(self, *keys: str, default: float | None, low: float = 0.0, high: float = math.inf, below_high: bool = False,
               above_low: bool = False) -> float:
        """A finite number in its range (open at either end where asked);
        ``default`` when absent (required when None: its placeholder is 1)."""
        key, value = self._pick(keys)
        if value is None:
            if default is None:
                self._missing(keys)
                return 1.0
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.problems.append((self.field(key), "a finite number", value))
            return 1.0 if default is None else default
        too_low = value <= low if above_low else value < low
        too_high = value >= high if below_high else value > high
        if too_low or too_high:
            interval = f"{'(' if above_low else '['}{low:g}, {high:g}{')' if below_high else ']'}"
            self.problems.append((self.field(key), f"a number in {interval}", value))
            return 1.0 if default is None else default
        return float(value)

    def _checked(self, key: str, default: Any, ok: Callable[[Any], bool], expected: str) -> Any:
        """The value of ``key`` when ``ok`` says it is one; ``default`` when
        absent or (after recording the problem) when it is not."""
        value = self.config.get(key)
        if value is None:
            return default
        if not ok(value):
            self.problems.append((self.field(key), expected, value))
            return default
        return value

    def bool(self, key: str, default: bool) -> bool:
        return self._checked(key, default, lambda v: isinstance(v, bool), "true or false")

    def str(self, key: str, default: str | None = None) -> str | None:
        return self._checked(key, default, lambda v: isinstance(v, str), "a string")

    def int_list(self, key: str) -> list[int] | None:
        return self._checked(key, None, lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
                             "a list of integers")

    def str_list(self, key: str, choices: tuple[str, ...]) -> list[str] | None:
        """A list of strings, each one of ``choices`` (e.g. ``layer_types``)."""
        return self._checked(key, None, lambda v: isinstance(v, list) and all(isinstance(i, str) and i in choices for i in v),
                             f"a list of {' or '.join(repr(c) for c in choices)}")

    def valid(self, *keys: str) -> bool:
        """No problem recorded for any of ``keys`` (their values are real, not placeholders)."""
        fields = {self.field(key) for key in keys}
        return not any(problem[0] in fields for problem in self.problems)

    def require(self, ok: bool, key: str, expected: str, got: object = None, given: tuple[str, ...] = ()) -> None:
        """Record a problem unless ``ok`` (a check across fields); skipped
        when a field in ``given`` already has one (its value is a placeholder)."""
        if not ok and self.valid(*given):
            self.problems.append((self.field(key), expected, got))

    def check(self) -> None:
        """Raise the SpecError naming every problem recorded, each once (a
        field read by two checks records its problem twice)."""
        if self.problems:
            first = {}  # by repr: a value in a problem may be a list or a mapping
            for problem in self.problems:
                first.setdefault(repr(problem), problem)
            raise SpecError.of(self.source, list(first.values()))
