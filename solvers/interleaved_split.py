"""Exact interleaved split of one run of equal layers, in milliseconds.

The problem ``solvers/partition.py`` hands here: a first entry (the
embedding), ``n`` equal decoder layers, a last entry (the LM head), cut into
C = pp x v contiguous non-empty chunks, chunk c on stage c mod pp, every
stage equally fast. The step time (m - 1/v) T + sum(tau) / v then depends on
the split only through T, the slowest stage (sum(tau) is all the work), and
only through how many decoder layers n_s each stage holds:

    tau_s = speed * (w n_s + [s = 0] e + [s = pp - 1] h)

Memory of stage s is its fixed bytes, its layers' states and in-flight
micro batches times its largest chunk's activations. For a given n_s the
largest chunk is smallest when the stage's v chunks are filled one layer at
a time into the chunk that stays smallest (min-max allocation with equal
slopes: greedy is optimal), so each stage fits at most some U_s layers.

Minimising max tau_s over lo_s <= n_s <= U_s with sum n_s = n is again
min-max allocation of increasing functions: handing out layers one at a time
to the stage whose time after it is smallest reaches the optimum (Ibaraki &
Katoh 1988, "Resource Allocation Problems", ch. 4, the greedy for the
min-max problem). The answer is the most even split that optimum allows;
ties go to the later stage and, inside a stage, to the later chunk, since
earlier stages and chunks hold more micro batches in flight.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One entry of the layer list: work (s, on the reference GPU), state
    bytes and activation bytes per micro batch in flight."""

    work_s: float
    state_bytes: float
    activation_bytes: float


@dataclass(frozen=True)
class StageMemory:
    capacity_bytes: float
    fixed_bytes: float
    in_flight: int  # chunk-micro-batches of activations held at peak


def _chunk_floor(c: int, chunks: int) -> int:
    """Decoder layers chunk c needs at least: the end chunks hold the first
    or last entry, so they may hold none."""
    return 0 if c in (0, chunks - 1) else 1


def _stage_chunks(stage: int, pp: int, v: int) -> list[int]:
    return [stage + pp * i for i in range(v)]


@functools.lru_cache(maxsize=4096)
def _filled(stage: int, most: int, pp: int, v: int, first_bytes: float, body_bytes: float, last_bytes: float) -> tuple[tuple[tuple[int, ...], float], ...]:
    """For each count of decoder layers ``stage`` may hold, from the least
    that fills its chunks up to ``most``: the layers per chunk and the
    largest chunk's activation bytes (``*_bytes``: the first entry's, a
    decoder layer's and the last entry's activation bytes). Each count adds
    one layer to the chunk that stays smallest (ties to the later chunk),
    which is optimal at every count. Layouts that share their activations
    share these (the search splits many), hence the cache."""
    chunks = pp * v
    own = _stage_chunks(stage, pp, v)
    sizes = [_chunk_floor(c, chunks) for c in own]
    extra = [(first_bytes if c == 0 else 0.0) + (last_bytes if c == chunks - 1 else 0.0) for c in own]

    def largest() -> float:
        return max(e + body_bytes * x for e, x in zip(extra, sizes))

    found = [(tuple(sizes), largest())]
    for _ in range(most - sum(sizes)):
        i = min(reversed(range(v)), key=lambda i: extra[i] + body_bytes * (sizes[i] + 1))
        sizes[i] += 1
        found.append((tuple(sizes), largest()))
    return tuple(found)


def _stage_extra(stage: int, pp: int, first: Entry, last: Entry, field: str) -> float:
    return (getattr(first, field) if stage == 0 else 0.0) + (getattr(last, field) if stage == pp - 1 else 0.0)


def solve_interleaved_run(first: Entry, body: Entry, last: Entry, n: int, pp: int, v: int,
                          memory: tuple[StageMemory, ...]) -> tuple[int, ...] | None:
    """Entries per chunk (chunk order, the first and last entries counted in
    chunks 0 and C - 1) of the split minimising the slowest stage, or None
    when no split fits in memory. ``memory`` has one entry per stage."""
    if len(memory) != pp or pp * v < 2:
        raise ValueError("need one memory entry per stage and at least two chunks")
    floors = [sum(_chunk_floor(c, pp * v) for c in _stage_chunks(s, pp, v)) for s in range(pp)]
    if sum(floors) > n:
        return None
    fills, caps = [], []
    for s in range(pp):
        fixed = memory[s].fixed_bytes + _stage_extra(s, pp, first, last, "state_bytes")
        # Held bytes grow with the count: the counts that fit are the first
        # ones (the same relative slack as evaluate_partition, so a split
        # filling memory exactly is kept).
        fitting = list(itertools.takewhile(
            lambda counted: fixed + body.state_bytes * counted[0] + memory[s].in_flight * counted[1][1] <= memory[s].capacity_bytes * (1 + 1e-9),
            enumerate(_filled(s, n, pp, v, first.activation_bytes, body.activation_bytes, last.activation_bytes), start=floors[s])))
        if not fitting:
            return None
        fills.append([fill for _, fill in fitting])
        caps.append(floors[s] + len(fitting) - 1)
    if sum(caps) < n:
        return None
    counts = list(floors)
    extra = [_stage_extra(s, pp, first, last, "work_s") for s in range(pp)]
    for _ in range(n - sum(counts)):
        open_stages = [s for s in reversed(range(pp)) if counts[s] < caps[s]]
        s = min(open_stages, key=lambda s: extra[s] + body.work_s * (counts[s] + 1))
        counts[s] += 1
    sizes = [0] * (pp * v)
    for s in range(pp):
        for c, size in zip(_stage_chunks(s, pp, v), fills[s][counts[s] - floors[s]][0]):
            sizes[c] = size
    sizes[0] += 1
    sizes[-1] += 1
    return tuple(sizes)
