"""The memory a plan must leave free on every GPU (``memory_headroom`` in a
job, ``--memory-headroom`` on the command line): a fraction of the GPU's
capacity (``0.05``) or a size (``"4 GiB"``).

Why a default of 5%: loom's memory model matches what Megatron-Core's own
CI measures to within 1% (tests/test_memory.py), but a job's reserved
memory exceeds its allocated memory by the caching allocator's
fragmentation, which depends on the workload: 2.3% of 78 GiB measured in
vllm-project/compressed-tensors#587, and a Llama-3 70B run in
Megatron-Bridge that ran out of memory at 58.8 of 80 GB allocated until
expandable segments were turned on (Megatron-Bridge PR #3107). NCCL also
grows its buffers at run time (an all-to-all added 3.3 GB on 8 H100s,
NVIDIA/nccl#1685). 5% of an H100 is 4 GiB.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

GiB = 1024**3
DEFAULT_FRACTION = 0.05
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB)\s*$", re.IGNORECASE)
UNITS = {"gib": GiB, "gb": 1e9, "mib": 1024**2, "mb": 1e6}
EXPECTED = "a fraction of capacity in [0, 1) or a size in GiB, GB, MiB or MB, such as '4 GiB'"


@dataclass(frozen=True)
class MemoryHeadroom:
    """The larger of a fraction of each GPU's capacity and a fixed size, and
    what a peak cap (``peak_bytes``) leaves of it."""

    fraction: float = 0.0
    bytes_: float = 0.0
    peak_bytes: float = math.inf  # use at most this much of any GPU (a --gate peak_memory_GiB<=X)

    def of(self, capacity_bytes: float) -> float:
        """Bytes to leave free on a GPU of ``capacity_bytes``."""
        return max(self.fraction * capacity_bytes, self.bytes_, capacity_bytes - self.peak_bytes)

    def usable(self, capacity_bytes: float) -> float:
        """What a plan may use of a GPU of ``capacity_bytes``."""
        return capacity_bytes - self.of(capacity_bytes)

    def at_least(self, fraction: float) -> MemoryHeadroom:
        """This headroom, or ``fraction`` of capacity where that is more: how
        a ``--gate memory_headroom>=X`` tightens the job's own."""
        return replace(self, fraction=max(self.fraction, fraction))

    def capped(self, peak_bytes: float) -> MemoryHeadroom:
        """This headroom leaving at most ``peak_bytes`` used on any GPU: how
        a ``--gate peak_memory_GiB<=X`` constrains the search."""
        return replace(self, peak_bytes=min(self.peak_bytes, peak_bytes))

    def __str__(self) -> str:
        parts = ([f"{self.fraction:.0%}"] if self.fraction else []) + ([f"{self.bytes_ / GiB:g} GiB"] if self.bytes_ else [])
        return " or ".join(parts) or "0"

    def describe(self) -> str:
        """As a message says what a plan must leave: 'the 5% memory headroom',
        and a peak cap where a gate set one."""
        cap = f" and the --gate cap of {self.peak_bytes / GiB:g} GiB used" if math.isfinite(self.peak_bytes) else ""
        return (f"the {self} memory headroom" if self.fraction or self.bytes_ else "no memory headroom") + cap


def parse_headroom(value: object) -> MemoryHeadroom:
    """``0.05`` (a fraction in [0, 1)) or a size: ``"4 GiB"``, ``"4GB"``,
    ``"512 MiB"``, ``"500 MB"`` (GB and MB decimal).

    Raises ValueError with what was expected."""
    if isinstance(value, bool):
        raise ValueError(EXPECTED)
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0 <= value < 1:
            raise ValueError(EXPECTED)
        return MemoryHeadroom(fraction=float(value))
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(EXPECTED)
    return MemoryHeadroom(bytes_=float(match.group(1)) * UNITS[match.group(2).lower()])


DEFAULT_HEADROOM = MemoryHeadroom(fraction=DEFAULT_FRACTION)
