"""Values the search computes again and again across layouts, remembered.

A search prices tens of thousands of layouts that differ in a few knobs, and
most of what it prices depends on only some of them: a chunk's time not on
DP, PP or the optimizer's sharding; a stage's model state not on the micro
batch or recomputation. Each cost function keys its ``Memo`` on exactly the
inputs it reads (its docstring says which), so layouts that agree on those
share the value.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class Memo(Generic[T]):
    """A bounded memo: values by key, emptied when it holds ``max_entries``
    (DeepSeek-V3's search on 1,024 GPUs fills the largest, a stage's
    activations, with 94,544 per token dispatcher; the bound keeps a
    long-lived process, a test run, from growing without end)."""

    def __init__(self, max_entries: int = 1 << 18):
        self.max_entries, self._values = max_entries, {}

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The value for ``key``, from ``compute()`` the first time."""
        found = self._values.get(key)
        if found is None:
            if len(self._values) >= self.max_entries:
                self._values.clear()
            found = self._values[key] = compute()
        return found
