"""Discrete-event simulation of the pipeline schedule of one data-parallel replica.

A closed-form bubble is exact only for identical stages with free
communication. Here every stage runs its forward (F), backward (B) and, for
ZB-H1, weight-gradient (W) passes one at a time in the order its schedule
prescribes, each as soon as the stage is free and its inputs have arrived:

- F of (micro batch i, model chunk c) needs F of chunk c - 1 of i, plus one
  p2p transfer when chunk c - 1 lives on another stage (always, if pp > 1);
- B of chunk c needs B of chunk c + 1 plus a transfer; the last chunk's B
  needs its own F;
- W of chunk c needs its B (same stage, no transfer).

Transfers are pure latency on those edges (no link contention); they are
recorded as "send" events on the sending stage for the timeline. After its
compute, each stage reduces its gradients over data parallelism on a separate
channel (overlapped: from the start of its last backward op; otherwise from
its end), then steps its optimizer once both are done.

Activations (``ChunkCost.activation_bytes``) are held from the start of a
chunk's F to the end of its B. For ZB-H1 that is the end of B (input
gradient): we assume W needs only the layer inputs and output gradients of the
linear layers, counted in the activations until B ends and not beyond. (The
paper's accounting keeps a micro batch until its W, which makes every ZB-H1
stage hold pp micro batches at peak — 1F1B's peak on stage 0.)

Everything is plain numbers: seconds and bytes. Model chunk c runs on stage
c % pp as that stage's local chunk c // pp (Megatron's interleaving), so
``costs.stages[s][v]`` is model chunk v * pp + s. ``Event.chunk`` is the model
chunk index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
COMPUTE_KINDS = ("F", "B", "W")
# The most ops (stages x micro batches x chunks, ``PipelineCosts.ops``) a
# caller that re-simulates a saved plan should accept: simulating costs about
# 13 us and 1.2 KB per op (its F, B and send events), so this many take about
# 7 s and under 1 GB, while the 70B-on-1,024-GPU example has 10,240.
# ``simulate`` does not enforce it (the search simulates what it enumerates);
# ``loom explain`` refuses larger plans as bad input.
MAX_OPS = 1 << 19

# One compute op of a stage: (kind "F" | "B" | "W", micro batch, local chunk).
Op = tuple[str, int, int]


@dataclass(frozen=True)
class ChunkCost:
    """One model chunk (virtual stage) for one micro batch."""

    forward_s: float
    backward_s: float  # whole backward (input grad + weight grad), incl. recompute
    weight_grad_s: float = 0.0  # part of backward_s that is weight gradient (ZB-H1's W); 0: not split
    activation_bytes: float = 0.0  # held from the start of its forward to the end of its backward


@dataclass(frozen=True)
class PipelineCosts:
    stages: tuple[tuple[ChunkCost, ...], ...]  # stages[s][v]: model chunk v * pp + s
    microbatches: int
    p2p_s: float = 0.0  # one activation (or gradient) transfer between neighbouring stages
    dp_reduce_s: tuple[float, ...] = ()  # per stage (or none): gradient reduce over data parallelism
    dp_overlap: bool = True  # reduce from the start of the stage's last backward op; False: from its end
    optimizer_s: tuple[float, ...] = ()  # per stage (or none): after its compute and its reduce

    @property
    def ops(self) -> int:
        """(micro batch, chunk) ops the simulation runs: stages x micro batches x chunks per stage."""
        return len(self.stages) * self.microbatches * (len(self.stages[0]) if self.stages else 0)


@dataclass(frozen=True, slots=True)
class Event:
    stage: int
    kind: str  # "F" | "B" | "W" | "send" | "dp" | "optimizer"; idle is the gap between events
    microbatch: int  # -1 for "dp" and "optimizer"
    chunk: int  # model chunk (v * pp + s); -1 for "dp" and "optimizer"
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Simulation:
    schedule: str
    step_time_s: float
    events: tuple[Event, ...]  # per stage, in start order; empty unless recorded
    peak_in_flight: tuple[int, ...]  # per stage: most chunk-micro-batches whose activations it holds at once
    peak_activation_bytes: tuple[float, ...]  # per stage
    busy_s: tuple[float, ...]  # per stage: F + B + W time
    pipeline_time_s: float  # when the last compute op ends; the rest of the step is exposed reduce and optimizer

    def bubble_fraction(self) -> float:
        """Idle share of the pipeline part of the step: 1 - mean busy / pipeline time."""
        return 1.0 - sum(self.busy_s) / len(self.busy_s) / self.pipeline_time_s


# --- per-stage op orders -----------------------------------------------------
def gpipe_order(pp: int, m: int, stage: int) -> list[Op]:
    """GPipe (Huang et al. 2019, sec. 2.2): every micro batch's forward, then
    every micro batch's backward."""
    return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]


def _warmup_steady_cooldown(warmup: int, total: int, forward: Callable[[int], Op], backward: Callable[[int], Op]) -> list[Op]:
    """The shape of Megatron's 1F1B loops: ``warmup`` forwards, then one
    forward and one backward at a time, then the remaining backwards."""
    order = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [forward(warmup + k), backward(k)]
    return order + [backward(k) for k in range(total - warmup, total)]


def one_f_one_b_order(pp: int, m: int, stage: int) -> list[Op]:
    """1F1B (PipeDream-Flush; Narayanan et al. SC'21 sec. 2.2), as Megatron's
    forward_backward_pipelining_without_interleaving runs it: a warm-up of
    min(pp - s - 1, m) forwards, then steady 1F1B, then the cool-down backwards."""
    return _warmup_steady_cooldown(min(pp - stage - 1, m), m, lambda i: ("F", i, 0), lambda i: ("B", i, 0))


def interleaved_order(pp: int, vpp: int, m: int, stage: int) -> list[Op]:
    """Interleaved 1F1B (SC'21 sec. 2.2.2), as Megatron-Core's
    forward_backward_pipelining_with_interleaving runs it
    (megatron/core/pipeline_parallel/schedules.py): virtual micro batch k
    walks groups of pp micro batches through chunks 0..vpp-1 (forwards) or
    vpp-1..0 (backwards); warm-up (pp - s - 1) * 2 + (vpp - 1) * pp
    forwards, capped at m * vpp."""
    if m % pp:
        raise ValueError(f"interleaved 1F1B needs micro batches ({m}) divisible by pp ({pp})")
    group = pp * vpp

    def position(k: int) -> tuple[int, int]:  # (micro batch, local chunk in forward order)
        groups, offset = divmod(k, group)
        return groups * pp + offset % pp, offset // pp

    def forward(k: int) -> Op:
        microbatch, chunk = position(k)
        return ("F", microbatch, chunk)

    def backward(k: int) -> Op:
        microbatch, chunk = position(k)
        return ("B", microbatch, vpp - 1 - chunk)

    total = m * vpp
    return _warmup_steady_cooldown(min((pp - stage - 1) * 2 + (vpp - 1) * pp, total), total, forward, backward)


def zb_h1_order(pp: int, m: int, stage: int) -> list[Op]:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", sec. 3.1;
    the authors' handcrafted schedule, get_hand_schedule in their
    efficiency.py): 1F1B with each backward split into B (input gradient) and
    W (weight gradient). Stage s holds back its first min(s, m) W's: after
    each B, once that many are pending, it runs the oldest pending W; the held
    back W's fill the cool-down. Bubble (pp - 1)(F + B - W) per stage instead
    of 1F1B's (pp - 1)(F + B + W), with 1F1B's forwards-before-backwards, so
    the same activations in flight."""
    held_back = min(stage, m)
    order: list[Op] = []
    backwards = weight_grads = 0
    for op in one_f_one_b_order(pp, m, stage):
        order.append(op)
        if op[0] == "B":
            backwards += 1
            if backwards > held_back:
                order.append(("W", weight_grads, 0))
                weight_grads += 1
    return order + [("W", i, 0) for i in range(weight_grads, m)]


def megatron_schedule(vpp: int) -> str:
    """1F1B, or interleaved 1F1B with ``vpp`` > 1 virtual stages: the two
    schedules Megatron-Core runs."""
    return "interleaved" if vpp > 1 else "1f1b"


def stage_order(schedule: str, pp: int, vpp: int, m: int, stage: int) -> list[Op]:
    """The compute ops stage ``stage`` runs, in order, under ``schedule``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    if schedule == "interleaved":
        if vpp < 2:
            raise ValueError("interleaved 1F1B needs vpp >= 2 chunks per stage ('1f1b' is vpp 1)")
        return interleaved_order(pp, vpp, m, stage)
    if vpp != 1:
        raise ValueError(f"{schedule} runs one chunk per stage, not vpp {vpp} (use 'interleaved')")
    return {"gpipe": gpipe_order, "1f1b": one_f_one_b_order, "zb-h1": zb_h1_order}[schedule](pp, m, stage)


# --- bounds: no schedule runs faster ------------------------------------------
def pipeline_floor_s(stage_s: list[float], first_chunk_s: list[float], microbatches: int) -> float:
    """Seconds no schedule (GPipe, 1F1B, interleaved) of these stages runs
    its pipeline in less, whatever its transfers cost. Stage b computes
    m * ``stage_s[b]`` (one micro batch through all its chunks, F and B),
    and cannot start before micro batch 1's F has passed every stage before
    it (through their first chunks, model chunks 0..b-1), nor end before its
    last B (of its first chunk) has passed back through them:
    max_b (m stage_s[b] + sum_{s<b} first_chunk_s[s]), ``first_chunk_s[s]``
    stage s's first chunk's F + B (0 where unknown: the bound still holds).
    And micro batch 1 alone goes forward through every chunk and back:
    sum(stage_s). For equal stages without interleaving the first is the
    closed form's (m + p - 1) tau (time_model.pipeline_term_s); for unequal
    ones the closed form's m max(tau) + sum(tau) - max(tau) can exceed it,
    and the simulation with it (warm-up forwards hide later stages' work)."""
    stages = max(microbatches * stage + sum(first_chunk_s[:b]) for b, stage in enumerate(stage_s))
    return max(stages, sum(stage_s))


def split_pipeline_floor_s(work_s: float, pp: int, vpp: int, microbatches: int) -> float:
    """The least pipeline_floor_s over every split of ``work_s`` seconds
    (per micro batch, all stages together) over ``pp`` stages. With one
    chunk per stage (vpp 1) the first chunk is the stage, and the least of
    max_b (m tau_b + sum_{s<b} tau_s) over tau summing to work_s evens the
    terms out: tau_b = (C / m) (1 - 1/m)^b, a geometric series, so
    C = work_s / (1 - (1 - 1/m)^p); between m work_s / p and the closed
    form's (m + p - 1) work_s / p, and at least work_s. Interleaved stages
    may hold little in their first chunks: the larger of m work_s / p and
    work_s (micro batch 1's way through the model)."""
    if vpp > 1:
        return max(microbatches * work_s / pp, work_s)
    return work_s / (1 - (1 - 1 / microbatches) ** pp)


# --- the simulation ----------------------------------------------------------
def _check(costs: PipelineCosts) -> tuple[int, int]:
    """(pp, vpp) of ``costs``, or ValueError."""
    pp = len(costs.stages)
    if pp == 0 or costs.microbatches < 1:
        raise ValueError("need at least one stage and one micro batch")
    vpp = len(costs.stages[0])
    if vpp == 0 or any(len(chunks) != vpp for chunks in costs.stages):
        raise ValueError("every stage needs the same number (>= 1) of chunks")
    for name in ("dp_reduce_s", "optimizer_s"):
        if len(getattr(costs, name)) not in (0, pp):
            raise ValueError(f"{name} needs one entry per stage ({pp}) or none")
    for chunk in (c for chunks in costs.stages for c in chunks):
        if min(chunk.forward_s, chunk.backward_s, chunk.weight_grad_s, chunk.activation_bytes, costs.p2p_s) < 0:
            raise ValueError(f"negative cost in {chunk} or p2p_s")
        if chunk.weight_grad_s > chunk.backward_s:
            raise ValueError(f"weight_grad_s exceeds backward_s in {chunk}")
    return pp, vpp


def simulate(costs: PipelineCosts, schedule: str, record_events: bool = True) -> Simulation:
    """Simulate one training step of ``costs`` under ``schedule`` (one of
    SCHEDULES). Without ``record_events`` (what the search needs: times,
    not a timeline) ``Simulation.events`` is empty and it runs ~3x faster."""
    pp, vpp = _check(costs)
    orders = [stage_order(schedule, pp, vpp, costs.microbatches, s) for s in range(pp)]
    return _execute(costs, schedule, orders, record_events)


# A long step is simulated at k + r, 2k + r and 3k + r micro batches (k the
# least multiple of pp from SETTLE_FROM to start with) and extended along its
# steady state once the two increments agree (``simulate_long``).
SETTLE_FROM = 64
# Relative difference below which two increments of k micro batches count as
# the same steady state (float sums of the same costs in another order).
SETTLED_REL = 1e-9


def simulate_long(costs: PipelineCosts, schedule: str) -> Simulation:
    """``simulate`` without events, in time that stops growing with the
    number of micro batches m once the schedule settles.

    Megatron's schedules (1F1B, interleaved) and ZB-H1 are max-plus linear
    systems: after a transient, every further k micro batches add the same
    time to each stage and to the step (the cycle time; Cohen et al. 1985,
    "A linear-system-theoretic view of discrete-event processes"). So it
    simulates k + r, 2k + r and 3k + r micro batches (r = m mod pp, so that
    interleaving's groups of pp line up); when the two increments agree to
    SETTLED_REL on the step, the pipeline, every stage's busy time and the
    in-flight peaks, it extends the last run linearly to m. Otherwise k
    doubles, and once 3k + r would reach m the step is simulated whole. Equal
    stages settle within 2 pp; stages several times uneven take longer and
    are found so (tests/test_simulate.py). GPipe, whose in-flight count grows
    with m, is simulated whole."""
    pp, microbatches = len(costs.stages), costs.microbatches
    k, r = pp * -(-SETTLE_FROM // pp), microbatches % pp

    def run(m: int) -> Simulation:
        return simulate(replace(costs, microbatches=m), schedule, record_events=False)

    if schedule == "gpipe" or 6 * k + 3 * r >= microbatches:
        return run(microbatches)
    first = run(k + r)
    while 6 * k + 3 * r < microbatches:  # three runs cost less than the whole
        second, third = run(2 * k + r), run(3 * k + r)
        if _settled(first, second, third):
            return _extended(second, third, (microbatches - (3 * k + r)) / k)
        k, first = 2 * k, second
    return run(microbatches)


def _settled(a: Simulation, b: Simulation, c: Simulation) -> bool:
    """Whether runs ``a``, ``b``, ``c`` of k + r, 2k + r, 3k + r micro
    batches grow by the same increments and hold the same peaks."""
    def same(x: float, y: float, z: float) -> bool:
        return abs((z - y) - (y - x)) <= SETTLED_REL * max(abs(z), 1e-30)

    return (b.peak_in_flight == c.peak_in_flight and b.peak_activation_bytes == c.peak_activation_bytes
            and same(a.step_time_s, b.step_time_s, c.step_time_s) and same(a.pipeline_time_s, b.pipeline_time_s, c.pipeline_time_s)
            and all(same(x, y, z) for x, y, z in zip(a.busy_s, b.busy_s, c.busy_s)))


def _extended(b: Simulation, c: Simulation, stretches: float) -> Simulation:
    """Run ``c`` with each time grown by ``stretches`` more increments c - b."""
    def grown(y: float, z: float) -> float:
        return z + stretches * (z - y)

    return replace(
        c,
        step_time_s=grown(b.step_time_s, c.step_time_s),
        pipeline_time_s=grown(b.pipeline_time_s, c.pipeline_time_s),
        busy_s=tuple(grown(y, z) for y, z in zip(b.busy_s, c.busy_s)),
    )


def _execute(costs: PipelineCosts, schedule: str, orders: list[list[Op]], record_events: bool) -> Simulation:
    """Run each stage's ``orders[s]``: an op starts when its stage is free and
    its inputs have arrived. Sweeps the stages, advancing each as far as its
    inputs allow, until every op has run."""
    pp, vpp, m = len(costs.stages), len(costs.stages[0]), costs.microbatches
    last_chunk = pp * vpp - 1
    hop = costs.p2p_s if pp > 1 else 0.0
    split = schedule == "zb-h1"
    forward_end = [[-1.0] * m for _ in range(pp * vpp)]  # -1: not run yet
    backward_end = [[-1.0] * m for _ in range(pp * vpp)]  # B: the input gradient is ready

    def inputs_ready_s(kind: str, microbatch: int, chunk: int) -> float:
        """When the op's inputs are on its stage; -1 if their producer has not run."""
        if kind == "F":
            if chunk == 0:
                return 0.0
            end = forward_end[chunk - 1][microbatch]
        elif kind == "B":
            if chunk == last_chunk:
                return forward_end[chunk][microbatch]
            end = backward_end[chunk + 1][microbatch]
        else:
            return backward_end[chunk][microbatch]
        return end + hop if end >= 0 else -1.0

    def duration_s(kind: str, cost: ChunkCost) -> float:
        if kind == "F":
            return cost.forward_s
        if kind == "B":
            return cost.backward_s - cost.weight_grad_s if split else cost.backward_s
        return cost.weight_grad_s

    events: list[Event] = []
    free_s, last_start_s, busy_s = [0.0] * pp, [0.0] * pp, [0.0] * pp
    held, held_bytes = [0] * pp, [0.0] * pp
    peak, peak_bytes = [0] * pp, [0.0] * pp
    done = [0] * pp
    while any(done[s] < len(orders[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            order = orders[s]
            while done[s] < len(order):
                kind, microbatch, local = order[done[s]]
                chunk = local * pp + s
                ready_s = inputs_ready_s(kind, microbatch, chunk)
                if ready_s < 0:
                    break
                cost = costs.stages[s][local]
                start_s = max(free_s[s], ready_s)
                end_s = start_s + duration_s(kind, cost)
                if record_events:
                    events.append(Event(s, kind, microbatch, chunk, start_s, end_s))
                free_s[s], last_start_s[s] = end_s, start_s
                busy_s[s] += end_s - start_s
                if kind == "F":
                    forward_end[chunk][microbatch] = end_s
                    held[s] += 1
                    held_bytes[s] += cost.activation_bytes
                    peak[s], peak_bytes[s] = max(peak[s], held[s]), max(peak_bytes[s], held_bytes[s])
                    if chunk < last_chunk and hop > 0 and record_events:
                        events.append(Event(s, "send", microbatch, chunk, end_s, end_s + hop))
                elif kind == "B":
                    backward_end[chunk][microbatch] = end_s
                    held[s] -= 1
                    held_bytes[s] -= cost.activation_bytes
                    if chunk > 0 and hop > 0 and record_events:
                        events.append(Event(s, "send", microbatch, chunk, end_s, end_s + hop))
                done[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: orders[s][done[s]] for s in range(pp) if done[s] < len(orders[s])}
            raise RuntimeError(f"schedule {schedule!r} deadlocks; next ops per stage: {stuck}")

    step_s = max(_finish_stage(costs, s, free_s[s], last_start_s[s], events) for s in range(pp))
    events.sort(key=lambda e: (e.stage, e.start_s))
    return Simulation(
        schedule=schedule, step_time_s=step_s, events=tuple(events) if record_events else (), peak_in_flight=tuple(peak),
        peak_activation_bytes=tuple(peak_bytes), busy_s=tuple(busy_s), pipeline_time_s=max(free_s),
    )


def _finish_stage(
    costs: PipelineCosts, stage: int, compute_end_s: float, last_backward_start_s: float, events: list[Event]
) -> float:
    """Gradient reduce and optimizer step of ``stage``; returns when it is done."""
    end_s = compute_end_s
    if costs.dp_reduce_s:
        start_s = last_backward_start_s if costs.dp_overlap else compute_end_s
        reduced_s = start_s + costs.dp_reduce_s[stage]
        events.append(Event(stage, "dp", -1, -1, start_s, reduced_s))
        end_s = max(end_s, reduced_s)
    if costs.optimizer_s:
        events.append(Event(stage, "optimizer", -1, -1, end_s, end_s + costs.optimizer_s[stage]))
        end_s += costs.optimizer_s[stage]
    return end_s
