"""Pipeline partition: split an ordered layer list into PP x VPP contiguous chunks.

Chunk c (0-based, model order) runs on pipeline stage ``c % pp`` -- Megatron's
interleaved order, where stage s holds chunks s, s + pp, s + 2pp, ...  Everything
here is plain numbers; the planner turns a model spec and a cluster into a
:class:`PartitionProblem`.

Step time of the schedule, with tau_s = speed of stage s's device x the forward +
backward time of its layers and v = vpp::

    step = m * max_s tau_s + (sum_s tau_s - max_s tau_s) / v
         = (m - 1/v) * T + sum_s tau_s / v,      T = max_s tau_s

(for v = 1 this is 1F1B's ``sum tau + (m - 1) max tau``).  Memory of stage s::

    fixed + sum of its layers' state_bytes + in_flight[s] * (largest activation of one of its chunks)

Four exact methods return the same optimum:

* ``"bottleneck"`` (vpp = 1 and every stage as fast as every other): sum tau is
  then a constant, so the step time is minimised by minimising T alone.  Binary
  search over the O(n^2) candidate values of T with an O(n * pp) reachability
  check per candidate; runs in milliseconds for 128 layers on 64 stages.
* ``"typed"`` (vpp = 1, stages of a few GPU types, in a given order or
  placed by the solver): a dynamic program over boundaries and groups used
  (``solvers/typed_split.py``), in milliseconds where the MILP needs seconds.
* ``"interleaved"`` (vpp > 1, equally fast stages, the layer list one run of
  equal decoder layers between the embedding and the head): only the layers
  per stage matter, and a greedy min-max allocation is exact
  (``solvers/interleaved_split.py``), in milliseconds.
* ``"milp"``: the general model (interleaving, unequal speeds, choosing which
  device group runs which pipeline position) as a MILP in PuLP, solved by HiGHS
  or, when HiGHS cannot load, by CBC.

Ties: the bottleneck method returns, among the optimal splits, the one whose
earlier chunks are as short as possible (the first stages hold the most
activations).  The MILP returns whichever optimum the solver reaches first; the
solver is deterministic, so the same problem gives the same split, except when
the time limit cuts the search short.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pulp

from loom.solvers.gap import relative_gap
from loom.solvers.interleaved_split import Entry, StageMemory, solve_interleaved_run
from loom.solvers.typed_split import MAX_COUNT_STATES, DeviceType, last_ends, solve_typed_split

GIB = 2.0**30


@dataclass(frozen=True)
class Layer:
    """One entry of the ordered layer list, for one micro batch on the reference GPU."""

    forward_s: float
    backward_s: float  # including recompute
    state_bytes: float  # weights + grads + optimizer state on its stage's GPU
    activation_bytes: float  # activations kept per in-flight micro batch

    @property
    def work_s(self) -> float:
        return self.forward_s + self.backward_s


@dataclass(frozen=True)
class StageDevice:
    """The device group a pipeline stage may run on."""

    speed: float  # time multiplier vs the reference GPU (1.0; 2.0 = twice as slow)
    capacity_bytes: float  # usable memory per GPU
    fixed_bytes: float = 0.0  # framework overhead etc. on that GPU


@dataclass(frozen=True)
class PartitionProblem:
    layers: tuple[Layer, ...]
    pp: int
    vpp: int
    microbatches: int  # m
    in_flight: tuple[int, ...]  # per stage: chunk-micro-batches of activations held at peak
    devices: tuple[StageDevice, ...]  # one per device group; stage s runs on devices[s] ...
    assign_devices: bool = False  # ... unless the solver also picks the permutation

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "in_flight", tuple(self.in_flight))
        object.__setattr__(self, "devices", tuple(self.devices))
        if self.pp < 1 or self.vpp < 1 or self.microbatches < 1:
            raise ValueError("pp, vpp and microbatches must be >= 1")
        if len(self.layers) < self.chunks:
            raise ValueError(f"{len(self.layers)} layers cannot fill {self.chunks} non-empty chunks")
        if len(self.in_flight) != self.pp or len(self.devices) != self.pp:
            raise ValueError("in_flight and devices need one entry per pipeline stage")
        if any(d.speed <= 0 for d in self.devices):
            raise ValueError("device speeds must be positive")
        if any(min(l.forward_s, l.backward_s, l.state_bytes, l.activation_bytes) < 0 for l in self.layers):
            raise ValueError("layer times and bytes must be non-negative")

    @property
    def chunks(self) -> int:
        return self.pp * self.vpp


@dataclass(frozen=True)
class Partition:
    chunk_sizes: tuple[int, ...]  # layers per chunk, chunk order; () when no split was found
    stage_device: tuple[int, ...]  # device group index of each pipeline stage
    objective_s: float  # predicted step time (inf when no split was found)
    bound_s: float  # best proven lower bound on the step time
    gap: float  # (objective - bound) / objective
    status: str  # "optimal" | "time_limit" (its best split and bound; no split when none was found) | "infeasible"
    wall_time_s: float
    binding: str | None  # infeasible / no incumbent: what binds
    method: str  # "bottleneck" | "typed" | "interleaved" | "milp-highs" | "milp-cbc"

    @property
    def stage_layers(self) -> tuple[int, ...]:
        """Layers per pipeline stage (summed over its virtual chunks)."""
        pp = len(self.stage_device)
        return tuple(sum(self.chunk_sizes[s::pp]) for s in range(pp))


# --------------------------------------------------------------------------- evaluation


def stage_memory_bytes(problem: PartitionProblem, chunk_sizes, stage_device=None) -> tuple[float, ...]:
    """Peak bytes per GPU of each stage under the schedule."""
    stage_device = tuple(range(problem.pp)) if stage_device is None else stage_device
    state = [0.0] * problem.pp
    largest_activation = [0.0] * problem.pp
    start = 0
    for c, size in enumerate(chunk_sizes):
        s = c % problem.pp
        chunk = problem.layers[start : start + size]
        state[s] += sum(l.state_bytes for l in chunk)
        largest_activation[s] = max(largest_activation[s], sum(l.activation_bytes for l in chunk))
        start += size
    return tuple(
        problem.devices[stage_device[s]].fixed_bytes + state[s] + problem.in_flight[s] * largest_activation[s]
        for s in range(problem.pp)
    )


def step_time_s(problem: PartitionProblem, chunk_sizes, stage_device=None) -> float:
    """Predicted step time of the schedule, memory ignored."""
    stage_device = tuple(range(problem.pp)) if stage_device is None else stage_device
    work = [0.0] * problem.pp
    start = 0
    for c, size in enumerate(chunk_sizes):
        work[c % problem.pp] += sum(l.work_s for l in problem.layers[start : start + size])
        start += size
    tau = [problem.devices[stage_device[s]].speed * work[s] for s in range(problem.pp)]
    v = problem.vpp
    return (problem.microbatches - 1.0 / v) * max(tau) + sum(tau) / v


def evaluate_partition(problem: PartitionProblem, chunk_sizes, stage_device=None) -> float | None:
    """Step time of a split, or None if it is malformed or some stage's memory overflows."""
    chunk_sizes = tuple(chunk_sizes)
    stage_device = tuple(range(problem.pp)) if stage_device is None else tuple(stage_device)
    if (
        len(chunk_sizes) != problem.chunks
        or min(chunk_sizes) < 1
        or sum(chunk_sizes) != len(problem.layers)
        or sorted(stage_device) != list(range(problem.pp))
    ):
        return None
    memory = stage_memory_bytes(problem, chunk_sizes, stage_device)
    for s in range(problem.pp):
        # Relative slack so a split that fills memory exactly is not lost to rounding.
        if memory[s] > problem.devices[stage_device[s]].capacity_bytes * (1 + 1e-9):
            return None
    return step_time_s(problem, chunk_sizes, stage_device)


# --------------------------------------------------------------------------- baselines


def _largest_remainder(total: int, weights: list[float]) -> tuple[int, ...]:
    """Integers >= 1 proportional to weights, summing to total (ties to the later chunk)."""
    spare = total - len(weights)
    shares = [spare * w / sum(weights) for w in weights]
    sizes = [1 + math.floor(x) for x in shares]
    by_remainder = sorted(range(len(weights)), key=lambda c: (shares[c] - math.floor(shares[c]), c), reverse=True)
    for c in by_remainder[: total - sum(sizes)]:
        sizes[c] += 1
    return tuple(sizes)


def uniform_partition(problem: PartitionProblem) -> tuple[int, ...]:
    """Megatron's default split: equal chunks.  When the layers do not divide
    evenly, the chunks at the ends are the short ones (first, last, second,
    second-to-last, ...), as in Llama-3-405B's recipe, since those hold the
    embedding and the LM head."""
    n, chunks = len(problem.layers), problem.chunks
    sizes = [n // chunks + 1] * chunks
    ends_first = [c for pair in zip(range(chunks), reversed(range(chunks))) for c in pair]
    for c in list(dict.fromkeys(ends_first))[: chunks - n % chunks if n % chunks else 0]:
        sizes[c] -= 1
    return tuple(sizes) if n % chunks else (n // chunks,) * chunks


def proportional_partition(problem: PartitionProblem) -> tuple[int, ...]:
    """Metis/AMP-style baseline: layer counts proportional to each stage's
    device throughput (1 / speed), stage s on devices[s]."""
    return _largest_remainder(len(problem.layers), [1.0 / problem.devices[c % problem.pp].speed for c in range(problem.chunks)])


# --------------------------------------------------------------------------- infeasibility


def _explain_infeasible(problem: PartitionProblem) -> str:
    """What binds, from best-case memory bounds (each a lower bound on any split)."""
    layers, pp, v = problem.layers, problem.pp, problem.vpp
    n, chunks = len(layers), problem.chunks
    min_state = min(l.state_bytes for l in layers)
    min_act = min(l.activation_bytes for l in layers)

    def best_case(s: int, device: StageDevice) -> float:  # one smallest layer per chunk
        return device.fixed_bytes + v * min_state + problem.in_flight[s] * min_act

    reasons = []
    if problem.assign_devices:
        for g, device in enumerate(problem.devices):
            need = min(best_case(s, device) for s in range(pp))
            if need > device.capacity_bytes:
                reasons.append(
                    f"device group {g} needs {need / GIB:.1f} GiB of {device.capacity_bytes / GIB:.1f} GiB "
                    "even with one layer per chunk on its least loaded stage"
                )
    else:
        for s, device in enumerate(problem.devices):
            need = best_case(s, device)
            if need > device.capacity_bytes:
                reasons.append(
                    f"stage {s} needs {need / GIB:.1f} GiB of {device.capacity_bytes / GIB:.1f} GiB "
                    "even with one layer per chunk"
                )
    if reasons:
        return "; ".join(reasons)

    need = sum(l.state_bytes for l in layers) + sum(d.fixed_bytes for d in problem.devices)
    need += sum(problem.in_flight) * min_act
    have = sum(d.capacity_bytes for d in problem.devices)
    if need > have:
        return f"all stages together need at least {need / GIB:.1f} GiB of {have / GIB:.1f} GiB"

    for i, layer in enumerate(layers):
        # Layer i can only sit in chunks max(0, i - (n - chunks)) .. min(i, chunks - 1).
        candidates = range(max(0, i - (n - chunks)), min(i, chunks - 1) + 1)
        options = [
            (problem.devices[g], c % pp)
            for c in candidates
            for g in (range(pp) if problem.assign_devices else [c % pp])
        ]
        needs = [
            (d.fixed_bytes + layer.state_bytes + (v - 1) * min_state + problem.in_flight[s] * layer.activation_bytes, d)
            for d, s in options
        ]
        if all(need > d.capacity_bytes for need, d in needs):
            need, d = min(needs, key=lambda nd: nd[0] - nd[1].capacity_bytes)
            return f"layer {i} needs {need / GIB:.1f} GiB of {d.capacity_bytes / GIB:.1f} GiB on every stage it can land on"
    return "every stage fits on its own, but no contiguous split fits every stage's memory at once"


# --------------------------------------------------------------------------- bottleneck method


class _Bottleneck:
    """vpp = 1, equal speeds: minimise T = the slowest stage by binary search.

    For a fixed T, the layers [j, e) can form stage k's chunk iff their work fits
    T and their memory fits stage k; both grow with e, so from each start j the
    feasible ends are an interval j+1 .. end_k(j).  Whether a split exists is then
    reachability over chunk boundaries, O(n) per stage.
    """

    def __init__(self, problem: PartitionProblem):
        self.problem = problem
        self.n = len(problem.layers)
        self.speed = problem.devices[0].speed
        self.work = np.concatenate([[0.0], np.cumsum([l.work_s for l in problem.layers])])
        state = np.concatenate([[0.0], np.cumsum([l.state_bytes for l in problem.layers])])
        act = np.concatenate([[0.0], np.cumsum([l.activation_bytes for l in problem.layers])])
        starts = np.arange(self.n + 1)
        self.memory_end = []
        for s, device in enumerate(problem.devices):
            # Memory of [j, e) is M[e] - M[j] + fixed, M non-decreasing: the last fitting end by bisection.
            held = state + problem.in_flight[s] * act
            budget = device.capacity_bytes * (1 + 1e-9) - device.fixed_bytes
            end = last_ends(held, budget)
            # Leave at least one layer for each later chunk.
            self.memory_end.append(np.minimum(end, self.n - (problem.pp - 1 - s)))
        self.starts = starts

    def _ends(self, s: int, t: float) -> np.ndarray:
        """Last feasible end of stage s's chunk from every start, at bottleneck t."""
        work_end = last_ends(self.work, t / self.speed * (1 + 1e-12))
        return np.minimum(work_end, self.memory_end[s])

    def feasible(self, t: float) -> bool:
        reach = np.zeros(self.n + 1, dtype=bool)
        reach[0] = True
        for s in range(self.problem.pp):
            ends = self._ends(s, t)
            # Mark every position in j+1 .. ends[j] for each reachable j (difference array).
            ok = reach & (ends >= self.starts + 1)
            delta = np.zeros(self.n + 2, dtype=int)
            np.add.at(delta, self.starts[ok] + 1, 1)
            np.add.at(delta, ends[ok] + 1, -1)
            reach = np.cumsum(delta)[: self.n + 1] > 0
        return bool(reach[self.n])

    def split(self, t: float) -> tuple[int, ...]:
        """The feasible split at t whose earlier chunks are shortest (canonical tie-break)."""
        pp = self.problem.pp
        ends = [self._ends(s, t) for s in range(pp)]
        # completes[s][i]: stages s.. can cover layers i..n-1.
        completes = [np.zeros(self.n + 1, dtype=bool) for _ in range(pp + 1)]
        completes[pp][self.n] = True
        for s in reversed(range(pp)):
            count = np.concatenate([[0], np.cumsum(completes[s + 1])])  # count[e] = #completing positions < e
            hi = ends[s]
            completes[s] = (hi >= self.starts + 1) & (count[np.maximum(hi, self.starts) + 1] > count[self.starts + 1])
        sizes, start = [], 0
        for s in range(pp):
            end = next(e for e in range(start + 1, ends[s][start] + 1) if completes[s + 1][e])
            sizes.append(end - start)
            start = end
        return tuple(sizes)

    def solve(self) -> tuple[int, ...] | None:
        if not self.feasible(math.inf):
            return None
        candidates = np.unique(self.speed * (self.work[None, :] - self.work[:, None]))
        candidates = candidates[candidates >= self.speed * self.work[-1] / self.problem.pp * (1 - 1e-12)]
        lo, hi = 0, len(candidates) - 1  # candidates[hi] (all layers) is feasible
        while lo < hi:
            mid = (lo + hi) // 2
            if self.feasible(candidates[mid]):
                hi = mid
            else:
                lo = mid + 1
        return self.split(candidates[lo])


# --------------------------------------------------------------------------- MILP


def _device_types(devices: tuple[StageDevice, ...]) -> tuple[list[StageDevice], list[list[int]]]:
    """Identical device groups collapse into one type, so the MILP does not
    branch over permutations of interchangeable groups."""
    types: list[StageDevice] = []
    members: list[list[int]] = []
    for g, device in enumerate(devices):
        if device in types:
            members[types.index(device)].append(g)
        else:
            types.append(device)
            members.append([g])
    return types, members


def _runs(layers: tuple[Layer, ...]) -> list[tuple[Layer, int, int]]:
    """Maximal runs of identical consecutive layers: (layer, length, index of its first layer)."""
    runs: list[tuple[Layer, int, int]] = []
    for i, layer in enumerate(layers):
        if runs and runs[-1][0] == layer:
            runs[-1] = (layer, runs[-1][1] + 1, runs[-1][2])
        else:
            runs.append((layer, 1, i))
    return runs


class _Milp:
    """The general model, over runs of identical layers.

    Layer lists are mostly one run of equal decoder layers, so instead of a
    binary per layer and chunk the model counts how many layers of each run fall
    in each chunk: K[r, c] = layers of run r in chunks <= c (those chunks hold a
    prefix of the list, so these are the first K[r, c] layers of the run).  A
    list of all-different layers degenerates to the usual binary-per-layer model.

    Times are scaled by the mean layer work and bytes by the largest capacity,
    so the solver's tolerances mean the same thing for every instance.
    """

    def __init__(self, problem: PartitionProblem, with_memory: bool = True, floor_s: float | None = None):
        self.problem = problem
        layers, pp, v = problem.layers, problem.pp, problem.vpp
        n, C = len(layers), problem.chunks
        self.time_unit = max(sum(l.work_s for l in layers) / n, 1e-30)
        self.byte_unit = max(max(d.capacity_bytes for d in problem.devices), 1e-30)
        self.runs = runs = _runs(layers)
        R = range(len(runs))
        work = [layer.work_s / self.time_unit for layer, _, _ in runs]
        state = [layer.state_bytes / self.byte_unit for layer, _, _ in runs]
        act = [layer.activation_bytes / self.byte_unit for layer, _, _ in runs]
        m = problem.microbatches
        chunks_of = {s: range(s, C, pp) for s in range(pp)}
        self.types, self.members = _device_types(problem.devices)
        assign = problem.assign_devices and len(self.types) > 1

        model = pulp.LpProblem("pipeline_partition", pulp.LpMinimize)

        # Chunks <= c hold between c + 1 layers (each non-empty) and n - (C - 1 - c)
        # (leaving one for every later chunk), and all n when c is the last chunk;
        # that bounds each run's count.
        def count_var(r: int, c: int):
            _, length, first = runs[r]
            low = length if c == C - 1 else min(length, max(0, c + 1 - first))
            high = min(length, max(0, n - (C - 1 - c) - first))
            if low == high:
                return low
            cat = pulp.LpBinary if length == 1 else pulp.LpInteger
            return pulp.LpVariable(f"K_{r}_{c}", lowBound=low, upBound=high, cat=cat)

        K = {(r, c): count_var(r, c) for r in R for c in range(C)}
        self.K = K
        # done[r, c] = 1 only if run r lies wholly in chunks <= c; a single layer's count is its own flag.
        done = {}
        for r in R:
            for c in range(C):
                length = runs[r][1]
                if length == 1 or not isinstance(K[r, c], pulp.LpVariable):
                    done[r, c] = K[r, c] if length == 1 else int(K[r, c] == length)
                else:
                    done[r, c] = pulp.LpVariable(f"done_{r}_{c}", cat=pulp.LpBinary)
                    model += K[r, c] >= length * done[r, c], f"done_{r}_{c}"
        self.done = done
        for r in R:
            for c in range(C - 1):
                model += K[r, c] <= K[r, c + 1], f"chunk_order_{r}_{c}"
        for r in range(len(runs) - 1):
            for c in range(C - 1):
                # Contiguity: run r+1 may start in chunks <= c only once run r is complete there.
                model += K[r + 1, c] <= runs[r + 1][1] * done[r, c], f"contiguous_{r}_{c}"
        in_chunk = {(r, c): K[r, c] - (K[r, c - 1] if c > 0 else 0) for r in R for c in range(C)}
        for c in range(C):
            model += pulp.lpSum(in_chunk[r, c] for r in R) >= 1, f"non_empty_{c}"

        def chunk_sum(values, c):
            return pulp.lpSum(values[r] * in_chunk[r, c] for r in R)

        stage_work = {s: pulp.lpSum(chunk_sum(work, c) for c in chunks_of[s]) for s in range(pp)}
        stage_state = {s: pulp.lpSum(chunk_sum(state, c) for c in chunks_of[s]) for s in range(pp)}

        # A[s] >= activation of each of stage s's chunks: the largest one, since memory pushes it down.
        largest_act = {}
        for s in range(pp):
            if v == 1:
                largest_act[s] = chunk_sum(act, s)
            else:
                largest_act[s] = pulp.LpVariable(f"A_{s}", lowBound=0)
                for c in chunks_of[s]:
                    model += largest_act[s] >= chunk_sum(act, c), f"largest_activation_{s}_{c}"

        total_work = sum(w * length for w, (_, length, _) in zip(work, runs))
        if assign:
            # u[s, t] = 1 iff stage s runs on a group of type t; each type fills as many stages as it has groups.
            T_types = range(len(self.types))
            u = {(s, t): pulp.LpVariable(f"u_{s}_{t}", cat=pulp.LpBinary) for s in range(pp) for t in T_types}
            self.u = u
            for s in range(pp):
                model += pulp.lpSum(u[s, t] for t in T_types) == 1, f"one_type_{s}"
            for t in T_types:
                model += pulp.lpSum(u[s, t] for s in range(pp)) == len(self.members[t]), f"type_count_{t}"
            # w[s, t] = u[s, t] * stage_work[s], exactly: w <= W_max * u and sum_t w = stage work.
            w = {(s, t): pulp.LpVariable(f"w_{s}_{t}", lowBound=0) for s in range(pp) for t in T_types}
            for s in range(pp):
                model += pulp.lpSum(w[s, t] for t in T_types) == stage_work[s], f"work_split_{s}"
                for t in T_types:
                    model += w[s, t] <= total_work * u[s, t], f"work_on_type_{s}_{t}"
            tau = {s: pulp.lpSum(self.types[t].speed * w[s, t] for t in T_types) for s in range(pp)}
            headroom = {
                s: pulp.lpSum((self.types[t].capacity_bytes - self.types[t].fixed_bytes) / self.byte_unit * u[s, t] for t in T_types)
                for s in range(pp)
            }
        else:
            stage_devices = [problem.devices[0]] * pp if problem.assign_devices else problem.devices
            tau = {s: stage_devices[s].speed * stage_work[s] for s in range(pp)}
            headroom = {s: (stage_devices[s].capacity_bytes - stage_devices[s].fixed_bytes) / self.byte_unit for s in range(pp)}
        self.assign = assign

        if with_memory:
            for s in _memory_may_bind(problem):
                model += stage_state[s] + problem.in_flight[s] * largest_act[s] <= headroom[s], f"memory_{s}"

        # T = the slowest stage; the slowest is at least the average over stages.
        slowest_speed_floor = min(d.speed for d in problem.devices)
        T = pulp.LpVariable("T", lowBound=slowest_speed_floor * total_work / pp)
        for s in range(pp):
            model += T >= tau[s], f"slowest_{s}"

        step = (m - 1.0 / v) * T + pulp.lpSum(tau.values()) / v
        model += step
        if floor_s is not None:
            # A proven lower bound from the memory-free model: lets the search stop
            # as soon as it meets an incumbent that good.
            model += step >= floor_s * (1 - 1e-9) / self.time_unit, "step_floor"
        self.model = model

    def solve(self, time_limit_s: float) -> tuple[str, tuple[int, ...] | None, tuple[int, ...], float | None, str]:
        with tempfile.TemporaryDirectory() as tmp:
            if pulp.HiGHS().available():
                method = "milp-highs"
                # No warm start from the uniform split: on these models it slowed HiGHS down.
                solver = pulp.HiGHS(
                    msg=False,
                    timeLimit=time_limit_s,
                    # The step time must match an enumeration's to 1e-6, so close the gap fully.
                    gapRel=1e-9,
                    gapAbs=1e-9,
                    random_seed=0,
                )
            else:
                method = "milp-cbc"
                log = Path(tmp) / "cbc.log"
                solver = pulp.PULP_CBC_CMD(
                    msg=False, timeLimit=time_limit_s, gapRel=1e-9, gapAbs=1e-9, threads=1,
                    logPath=str(log), options=["randomSeed 1"],
                )
            self.model.solve(solver)
            status, bound = self._status_and_bound(method, log if method == "milp-cbc" else None)
        if status == "infeasible" or status == "no_solution":
            return status, None, (), None, method
        return status, self._chunk_sizes(), self._stage_device(), bound, method

    def _status_and_bound(self, method: str, log: Path | None) -> tuple[str, float | None]:
        """Status and proven lower bound (in seconds) from the solver itself."""
        scale = self.time_unit
        # PuLP hands the solver the objective without its constant term (the
        # fixed counts' work); the bound must include it.
        offset = self.model.objective.constant
        if method == "milp-highs":
            import highspy

            highs = self.model.solverModel
            model_status = highs.getModelStatus()
            info = highs.getInfo()
            has_solution = info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible
            if model_status == highspy.HighsModelStatus.kOptimal:
                # With every count fixed by the bounds HiGHS solves an LP and sets no MIP bound.
                return "optimal", ((info.mip_dual_bound + offset) * scale if self.model.isMIP() else None)
            if model_status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
                return "infeasible", None
            return ("time_limit" if has_solution else "no_solution"), (info.mip_dual_bound + offset) * scale
        # CBC through PuLP exposes no bound; its log states one.
        text = log.read_text() if log is not None and log.exists() else ""
        found = re.findall(r"Lower bound:\s+([-\d.eE+]+)", text)
        bound = (float(found[-1]) + offset) * scale if found else None
        if self.model.status == pulp.LpStatusInfeasible:
            return "infeasible", None
        if self.model.sol_status == pulp.LpSolutionOptimal:
            return "optimal", bound
        if self.model.sol_status == pulp.LpSolutionIntegerFeasible:
            return "time_limit", bound
        return "no_solution", bound

    def _chunk_sizes(self) -> tuple[int, ...]:
        C = self.problem.chunks
        held = [sum(round(pulp.value(self.K[r, c])) for r in range(len(self.runs))) for c in range(C)]
        return tuple(held[c] - (held[c - 1] if c > 0 else 0) for c in range(C))

    def _stage_device(self) -> tuple[int, ...]:
        pp = self.problem.pp
        if not self.assign:
            return tuple(range(pp))
        # Hand each type's groups to its stages in order: the canonical member of the class of equal answers.
        unused = [list(group) for group in self.members]
        stage_device = []
        for s in range(pp):
            t = max(range(len(self.types)), key=lambda t: pulp.value(self.u[s, t]))
            stage_device.append(unused[t].pop(0))
        return tuple(stage_device)


# --------------------------------------------------------------------------- entry point


def _memory_may_bind(problem: PartitionProblem) -> list[int]:
    """Stages whose memory could overflow: those that would not fit every layer at once."""
    everything = sum(l.state_bytes for l in problem.layers)
    largest_chunk = sum(l.activation_bytes for l in problem.layers)
    smallest_headroom = min(d.capacity_bytes - d.fixed_bytes for d in problem.devices)
    return [
        s
        for s in range(problem.pp)
        if everything + problem.in_flight[s] * largest_chunk
        > (smallest_headroom if problem.assign_devices else problem.devices[s].capacity_bytes - problem.devices[s].fixed_bytes)
    ]


def _bottleneck_applies(problem: PartitionProblem) -> bool:
    """One chunk per stage and every stage equally fast, wherever it is placed."""
    if problem.vpp != 1 or len({d.speed for d in problem.devices}) != 1:
        return False
    # Choosing groups only matters if they differ in memory.
    return not problem.assign_devices or len(set(problem.devices)) == 1


def _typed_applies(problem: PartitionProblem) -> bool:
    """One chunk per stage, and few enough GPU types for the typed program."""
    if problem.vpp != 1:
        return False
    _, members = _device_types(problem.devices)
    return not problem.assign_devices or math.prod(len(group) + 1 for group in members[:-1]) <= MAX_COUNT_STATES


def _interleaved_applies(problem: PartitionProblem) -> bool:
    """Interleaved chunks on equally fast stages (wherever they are placed),
    over an embedding, one run of equal decoder layers and a head."""
    if problem.vpp == 1 or len({d.speed for d in problem.devices}) != 1 or (problem.assign_devices and len(set(problem.devices)) > 1):
        return False
    runs = _runs(problem.layers)
    return len(runs) == 3 and runs[0][1] == 1 and runs[2][1] == 1


def _solve_interleaved(problem: PartitionProblem) -> tuple[int, ...] | None:
    """solvers/interleaved_split.py on ``problem``: chunk sizes, or None when nothing fits."""
    first, body, last = (Entry(l.work_s, l.state_bytes, l.activation_bytes) for l, _, _ in _runs(problem.layers))
    memory = tuple(StageMemory(d.capacity_bytes, d.fixed_bytes, f) for d, f in zip(problem.devices, problem.in_flight))
    return solve_interleaved_run(first, body, last, len(problem.layers) - 2, problem.pp, problem.vpp, memory)


def _solve_typed(problem: PartitionProblem) -> tuple[tuple[int, ...], tuple[int, ...], float] | None:
    """solvers/typed_split.py on ``problem``: sizes, device group of each
    stage (each type's groups handed to its stages in order, as the MILP's
    answers are) and the proven bound; None when nothing fits."""
    kinds, members = _device_types(problem.devices)
    types = [DeviceType(d.speed, d.capacity_bytes, d.fixed_bytes, len(group)) for d, group in zip(kinds, members)]
    position_type = None if problem.assign_devices else tuple(kinds.index(d) for d in problem.devices)
    layers = problem.layers
    found = solve_typed_split(np.array([l.work_s for l in layers]), np.array([l.state_bytes for l in layers]),
                              np.array([l.activation_bytes for l in layers]), problem.in_flight, problem.microbatches, types, position_type)
    if found is None:
        return None
    if not problem.assign_devices:
        return found.sizes, tuple(range(problem.pp)), found.bound_s
    unused = [list(group) for group in members]
    return found.sizes, tuple(unused[t].pop(0) for t in found.stage_type), found.bound_s


def auto_method(problem: PartitionProblem) -> str:
    """The method ``solve_partition`` picks for ``problem``: the first exact
    fast one that applies, else "milp"."""
    if _bottleneck_applies(problem):
        return "bottleneck"
    if _typed_applies(problem):
        return "typed"
    return "interleaved" if _interleaved_applies(problem) else "milp"


def solve_partition(problem: PartitionProblem, time_limit_s: float = 10.0, method: str = "auto") -> Partition:
    """Optimal split of ``problem`` (``method``: "auto", "bottleneck",
    "typed", "interleaved" or "milp")."""
    started = time.perf_counter()
    if method == "auto":
        method = auto_method(problem)
    if method == "bottleneck" and not _bottleneck_applies(problem):
        raise ValueError("the bottleneck method needs vpp = 1 and equally fast stages")

    def result(status, sizes, stage_device, bound, method_name, binding=None) -> Partition:
        objective = step_time_s(problem, sizes, stage_device) if sizes else math.inf
        if status == "optimal" and (bound is None or bound > objective):
            bound = objective  # proven optimal: the solver's bound is the objective up to its tolerance
        bound = -math.inf if bound is None else bound
        return Partition(
            chunk_sizes=tuple(sizes), stage_device=tuple(stage_device), objective_s=objective,
            bound_s=bound, gap=relative_gap(objective, bound) if sizes else math.inf, status=status, wall_time_s=time.perf_counter() - started,
            binding=binding, method=method_name,
        )

    identity = tuple(range(problem.pp))
    if method == "typed":
        if not _typed_applies(problem):
            raise ValueError("the typed method needs vpp = 1 and few enough GPU types")
        typed = _solve_typed(problem)
        if typed is None:
            return result("infeasible", (), identity, None, "typed", _explain_infeasible(problem))
        sizes, stage_device, bound = typed
        objective = step_time_s(problem, sizes, stage_device)
        return result("optimal" if relative_gap(objective, bound) == 0 else "time_limit", sizes, stage_device, bound, "typed")
    if method == "interleaved":
        if not _interleaved_applies(problem):
            raise ValueError("the interleaved method needs vpp > 1, equally fast stages and one run of equal layers")
        sizes = _solve_interleaved(problem)
        if sizes is None:
            return result("infeasible", (), identity, None, "interleaved", _explain_infeasible(problem))
        return result("optimal", sizes, identity, None, "interleaved")
    if method == "bottleneck":
        sizes = _Bottleneck(problem).solve()
        if sizes is None:
            return result("infeasible", (), identity, None, "bottleneck", _explain_infeasible(problem))
        return result("optimal", sizes, identity, None, "bottleneck")

    # Memory rows weaken the search far more than they usually change the
    # optimum, so first solve without them: if that split fits, it is optimal;
    # if not, its bound still holds and is handed to the full model as a floor.
    deadline = started + time_limit_s
    floor = None
    if _memory_may_bind(problem):
        free = _Milp(problem, with_memory=False).solve(time_limit_s / 2)
        status, sizes, stage_device, bound, method_name = free
        if status == "optimal" and evaluate_partition(problem, sizes, stage_device) is not None:
            return result(status, sizes, stage_device, bound, method_name)
        floor = bound if status == "optimal" else None
    remaining = max(deadline - time.perf_counter(), 0.01)
    status, sizes, stage_device, bound, method_name = _Milp(problem, floor_s=floor).solve(remaining)
    if status == "infeasible":
        return result("infeasible", (), identity, None, method_name, _explain_infeasible(problem))
    if floor is not None and bound is not None:
        bound = max(bound, floor)
    if status != "optimal":
        # A solve stopped by its time limit is never worse than the splits
        # anyone would try first: the even one and the one proportional to
        # each stage's speed, in node order.
        found = [(step_time_s(problem, sizes, stage_device), sizes, stage_device)] if sizes else []
        for baseline in (uniform_partition(problem), proportional_partition(problem)):
            step = evaluate_partition(problem, baseline, identity)
            if step is not None:
                found.append((step, baseline, identity))
        if not found:
            return result("time_limit", (), identity, bound, method_name, "no feasible split found within the time limit")
        _, sizes, stage_device = min(found, key=lambda option: option[0])
        # No incumbent may come with no bound either: every stage doing its
        # share of the work at the fastest speed still bounds the step.
        status, bound = "time_limit", max(bound if bound is not None else -math.inf, _work_bound_s(problem))
    return result(status, sizes, stage_device, bound, method_name)


def _work_bound_s(problem: PartitionProblem) -> float:
    """A step no split beats: T is at least the mean stage's work and the
    sum of the stages' at least all of it, both at the fastest device's speed."""
    work = min(d.speed for d in problem.devices) * sum(layer.work_s for layer in problem.layers)
    v = problem.vpp
    return (problem.microbatches - 1.0 / v) * work / problem.pp + work / v


