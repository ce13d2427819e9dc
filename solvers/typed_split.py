"""Exact pipeline split with one chunk per stage on a few kinds of GPU.

A pipeline of ``pp`` stages runs an ordered list of ``n`` layers, stage s a
contiguous run [i, j) of them, on a device group of type t (speed, memory).
With one chunk per stage the schedule takes (Narayanan et al. 2021, sec. 2.2)

    step = (m - 1) * T + sum_s tau_s,    tau_s = speed_t(s) * work[i_s, j_s),   T = max_s tau_s

and each stage must fit: fixed_t + state[i, j) + in_flight[s] * act[i, j) <= capacity_t.
Either each position's type is given, or the solver chooses it, using each
type at most as many times as there are groups of it (mixed clusters: which
GPUs run which stage).

For a fixed cap T on every tau, the least sum of tau is a dynamic program
over (position, boundary, groups used of each type). Both constraints on a
run grow with its end, so from each start the feasible ends form an interval
whose end never moves left as the start moves right; the best predecessor of
a boundary is then a range minimum, answered for all boundaries at once from
a sparse table (Bender and Farach-Colton 2000). The least feasible T is found
by bisection over the run times that can occur; raising T by d costs (m - 1) d
and saves at most S(T*) - S(inf), so only run times in that window can do
better, and each is tried. Everything here is plain numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np

# How many caps above the least feasible one are tried at most. The window
# is wide only when (m - 1) is small against the spread of run times (few
# micro batches); past this many the answer reports its remaining gap.
MAX_CAPS_TRIED = 48
# Count states (groups used of each type but the last) the program may hold:
# two types of up to 511 groups, or three of up to 21 each; beyond, the
# program's time (a range minimum per state, stage and type) passes the
# MILP's limit, so the MILP takes it.
MAX_COUNT_STATES = 512


def last_ends(prefix: np.ndarray, budget: float | np.ndarray) -> np.ndarray:
    """For each start i, the last end e with prefix[e] - prefix[i] <= budget
    (``prefix``: non-decreasing cumulative sums over the layers, 0 first):
    how far a stage that starts at i may reach."""
    return np.searchsorted(prefix, prefix + budget, side="right") - 1


@dataclass(frozen=True)
class DeviceType:
    speed: float  # time multiplier (2.0: twice as slow)
    capacity_bytes: float
    fixed_bytes: float
    groups: int  # how many stages may run on it (when types are chosen)


@dataclass(frozen=True)
class TypedSplit:
    sizes: tuple[int, ...]  # layers per stage, in stage order
    stage_type: tuple[int, ...]  # device type of each stage
    step_s: float
    bound_s: float  # proven lower bound (step_s when every cap in the window was tried)


def solve_typed_split(work_s: np.ndarray, state_bytes: np.ndarray, activation_bytes: np.ndarray, in_flight: tuple[int, ...],
                      microbatches: int, types: list[DeviceType], position_type: tuple[int, ...] | None) -> TypedSplit | None:
    """The split minimising the step time, or None when no split fits.

    ``work_s``, ``state_bytes``, ``activation_bytes``: per layer (n), non-negative;
    ``in_flight`` and ``position_type`` (None: the solver picks): per stage.
    Raises ValueError when the count states would exceed MAX_COUNT_STATES."""
    program = _Program(work_s, state_bytes, activation_bytes, in_flight, microbatches, types, position_type)
    # Every time a stage can take: a run of layers [i, j) on a type.
    runs = np.unique(np.concatenate([t.speed * (program.work[None, :] - program.work[:, None]).ravel() for t in types]))
    runs = runs[runs >= 0]
    unbounded = program.least_sum(math.inf)
    if unbounded is None:
        return None
    lo, hi = 0, len(runs) - 1  # runs[hi], a stage of every layer, is feasible where anything is
    while lo < hi:  # the least cap with a feasible split
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if program.feasible(runs[mid]) else (mid + 1, hi)
    floor_sum, sizes, stage_type = unbounded
    # The split of least total time is a candidate too (with m = 1 it is the answer).
    best = TypedSplit(sizes, stage_type, program.step_s(sizes, stage_type), 0.0)
    window = runs[lo:][: MAX_CAPS_TRIED]
    for cap in window:
        found = program.least_sum(cap)
        if found is None:
            continue
        total, sizes, stage_type = found
        step = program.step_s(sizes, stage_type)
        if step < best.step_s * (1 - 1e-12):
            best = TypedSplit(sizes, stage_type, step, 0.0)
        if (microbatches - 1) * cap + floor_sum >= best.step_s * (1 - 1e-12):
            return TypedSplit(best.sizes, best.stage_type, best.step_s, best.step_s)  # no higher cap can do better
    # Caps left untried: any better split has T above the last one tried.
    untried = runs[lo + len(window)] if lo + len(window) < len(runs) else math.inf
    bound = min(best.step_s, (microbatches - 1) * untried + floor_sum)
    return TypedSplit(best.sizes, best.stage_type, best.step_s, bound)


class _Program:
    def __init__(self, work_s, state_bytes, activation_bytes, in_flight, microbatches, types, position_type):
        self.n, self.pp, self.m = len(work_s), len(in_flight), microbatches
        self.types, self.position_type = types, position_type
        self.work = np.concatenate([[0.0], np.cumsum(work_s)])
        state = np.concatenate([[0.0], np.cumsum(state_bytes)])
        act = np.concatenate([[0.0], np.cumsum(activation_bytes)])
        self.starts = np.arange(self.n + 1)
        # Count states: groups used of each type but the last (whose count
        # follows from the position) when the solver picks; one state otherwise.
        ranges = [range(t.groups + 1) for t in types[:-1]] if position_type is None else []
        self.counts = [tuple(c) for c in product(*ranges)] if ranges else [()]
        if len(self.counts) > MAX_COUNT_STATES:
            raise ValueError(f"{len(self.counts)} count states (at most {MAX_COUNT_STATES})")
        self.index = {c: a for a, c in enumerate(self.counts)}
        # memory_end[t][s][i]: the last end e whose run [i, e) fits type t at position s.
        self.memory_end = [[self._fits_until(state + f * act, t) for f in in_flight] for t in types]
        self.moves = [self._moves(s) for s in range(self.pp)]

    def _fits_until(self, held: np.ndarray, device: DeviceType) -> np.ndarray:
        return last_ends(held, device.capacity_bytes * (1 + 1e-9) - device.fixed_bytes)

    def _ends(self, t: int, s: int, cap: float) -> np.ndarray:
        device = self.types[t]
        work_end = last_ends(self.work, cap / device.speed * (1 + 1e-12))
        leave = self.n - (self.pp - 1 - s)  # one layer at least for every later stage
        return np.minimum(np.minimum(work_end, self.memory_end[t][s]), leave)

    def _moves(self, s: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(type, count states that may take it at position s, the count state
        each moves to) for every type position s may run on."""
        if self.position_type is not None:
            return [(self.position_type[s], np.zeros(1, dtype=int), np.zeros(1, dtype=int))]
        moves = []
        last = len(self.types) - 1
        for t in range(len(self.types)):
            target = np.full(len(self.counts), -1)
            for a, used in enumerate(self.counts):
                if t < last:
                    after = used[:t] + (used[t] + 1,) + used[t + 1:]
                    if used[t] < self.types[t].groups:
                        target[a] = self.index[after]
                elif s - sum(used) < self.types[last].groups:
                    target[a] = a
            sources = np.flatnonzero(target >= 0)
            moves.append((t, sources, target[sources]))
        return moves

    def feasible(self, cap: float) -> bool:
        """Whether some split keeps every stage time <= cap: reachability of
        (boundary, count state), each start marking its interval of ends."""
        n, A = self.n, len(self.counts)
        reach = np.zeros((n + 1, A), dtype=bool)
        reach[0, 0] = True
        for s in range(self.pp):
            marks = np.zeros((n + 2, A), dtype=int)
            for t, sources, targets in self.moves[s]:
                ends = self._ends(t, s, cap)
                rows, columns = np.nonzero(reach[:, sources] & (ends >= self.starts + 1)[:, None])
                np.add.at(marks, (rows + 1, targets[columns]), 1)
                np.add.at(marks, (ends[rows] + 1, targets[columns]), -1)
            reach = np.cumsum(marks, axis=0)[: n + 1] > 0
        return bool(reach[n].any())

    def least_sum(self, cap: float) -> tuple[float, tuple[int, ...], tuple[int, ...]] | None:
        """The least sum of stage times with every stage time <= cap, its
        sizes and stage types; None when nothing fits."""
        n, A = self.n, len(self.counts)
        value = np.full((n + 1, A), np.inf)
        value[0, 0] = 0.0
        choices = []
        for s in range(self.pp):
            best = np.full((n + 1, A), np.inf)
            choice = np.full((n + 1, A, 3), -1)  # type, start, previous count state
            for t, sources, targets in self.moves[s]:
                ends = self._ends(t, s, cap)
                speed = self.types[t].speed
                # Boundary e takes its predecessor from [first start reaching e, e - 1].
                first = np.searchsorted(ends, self.starts, side="left")
                valid = first <= self.starts - 1
                g = value - speed * self.work[:, None]
                low, arg = _range_min(g, first[valid], self.starts[valid] - 1)
                e = self.starts[valid]
                candidate = low[:, sources] + speed * self.work[e][:, None]
                # Each count state moves to its own target: no two write one cell.
                rows, columns = np.nonzero(candidate < best[np.ix_(e, targets)])
                cells = (e[rows], targets[columns])
                best[cells] = candidate[rows, columns]
                choice[cells] = np.stack([np.full(len(rows), t), arg[rows, sources[columns]], sources[columns]], axis=1)
            value = best
            choices.append(choice)
        finals = np.flatnonzero(np.isfinite(value[n]))
        if not len(finals):
            return None
        a = int(finals[np.argmin(value[n, finals])])
        total, e, sizes, stage_type = float(value[n, a]), n, [], []
        for s in reversed(range(self.pp)):
            t, start, a = (int(x) for x in choices[s][e, a])
            sizes.append(e - start)
            stage_type.append(t)
            e = start
        return total, tuple(reversed(sizes)), tuple(reversed(stage_type))

    def step_s(self, sizes: tuple[int, ...], stage_type: tuple[int, ...]) -> float:
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        tau = [self.types[t].speed * (self.work[bounds[s + 1]] - self.work[bounds[s]]) for s, t in enumerate(stage_type)]
        return float((self.m - 1) * max(tau) + sum(tau))


def _range_min(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise minimum of ``values`` (rows x columns) over rows [low_k,
    high_k] for each query k (low_k <= high_k), and the first row reaching it,
    from a sparse table of argmins."""
    rows = len(values)
    table = [np.broadcast_to(np.arange(rows)[:, None], values.shape).copy()]
    span = 1
    columns = np.arange(values.shape[1])
    while 2 * span <= rows:
        previous = table[-1]
        left, right = previous[: len(previous) - span], previous[span:]
        pick_right = values[right, columns] < values[left, columns]
        table.append(np.where(pick_right, right, left))
        span *= 2
    level = np.floor(np.log2(high - low + 1)).astype(int)
    result_arg = np.empty((len(low), values.shape[1]), dtype=int)
    for k in np.unique(level):
        q = level == k
        width = 1 << k
        left = table[k][low[q]]
        right = table[k][high[q] - width + 1]
        pick_right = values[right, columns] < values[left, columns]
        result_arg[q] = np.where(pick_right, right, left)
    return values[result_arg, columns], result_arg
