"""The search: enumerate layouts, prune by divisibility and memory, rank by
predicted step time, keep the best k. Layouts are priced in the order of a
lower bound on their step, and one whose bound cannot reach the lists the
search draws from is not timed (branch and bound, ``_Frontier``).

Every GPU of the cluster is used (dp = gpus / (tp * pp * cp)), except that a
cluster of an awkward size is also searched on fewer nodes, leaving the
slowest idle (search/alternatives.py). "auto" knobs
take these candidates:

- tp: powers of two up to a node's GPUs that divide heads and key/value heads
  (TP across nodes is never faster than PP there: Narayanan et al. SC'21 sec. 3.3);
- cp: 1, 2, 4, 8 where 2*cp divides the sequence (Megatron's load-balanced chunks);
- pp: divisors of gpus / (tp * cp) up to the layer count (Megatron runs an
  uneven split through --pipeline-model-parallel-layout; DeepSpeed needs pp to
  divide the layers);
- vpp: the degrees that split layers / pp evenly, and 2-4 (interleaving needs
  micro batches divisible by pp);
- micro batch: 1, 2, 4, 8;
- sequence parallel: on whenever tp > 1 (it moves the same bytes as TP's
  all-reduce and saves memory and elementwise work: Korthikanti et al. 2022);
- recompute: none, selective, full; distributed optimizer: on and off;
- sharded data parallelism (fsdp): see _shard_degrees; torchtitan also
  keeps the gathered weights from forward to backward (reshard off);
- DeepSpeed: ZeRO 0-3, tp = cp = 1.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import pydantic

from loom.planner.cost.layers import shape_of
from loom.planner.specs import torchtitan
from loom.planner.specs.errors import InfeasibleError, SpecError
from loom.planner.specs.job import Features, Job, check_job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import ModelSpec
from loom.planner.cost.memory import GiB, stage_peak_bytes, stage_state_bytes
from loom.planner.search.alternatives import MIN_GAIN, NearbyBatch, idle_node_counts, nearby_batch_sizes
from loom.planner.search.recompute import PARTIAL_CANDIDATES, partial_variants
from loom.planner.search.split import solve_split
from loom.planner.search.placement import can_place, place
from loom.planner.plan import Plan, build_plan, with_pp_comm
from loom.planner.specs.rules import default_recompute_modules, layout_problems
from loom.planner.specs.stages import Placement, Stage, default_placement, default_stages, stage_gpus, stage_signature
from loom.profiles.catalogue import GPU
from loom.solvers.partition import Partition
from loom.planner.cost.simulated_step import step_floor_s as simulated_step_floor_s
from loom.planner.cost.time_model import StepTime, chunk_bounds_s, chunk_stage_times_s, hideable_s, mixed_split_floor_s, pipeline_term_s, step_lower_bound_s, step_parts, step_time
from loom.planner.schedule.simulate import pipeline_floor_s, split_pipeline_floor_s


# Layouts that fit are priced by the closed form. Then the REFINED fastest
# and REFINED of lowest bound of those within NEAR_FIT of fitting (an uneven
# split may make them fit) are split optimally, the FASTEST_SPLIT fastest
# that fit, and the others that fit, then those near, in order of their
# split bound while it is below the k-th fastest plan, at most BRANCHED of each
# (_branch_and_bound). Each list is the same at any k up to that cutoff, so
# the best plan does not depend on k. The cap is there because where bounds
# are loose (a split may move work to faster GPUs; interleaving's bubble is
# one a split may shrink) thousands can be below the cutoff: 4,904 for
# Llama-3 8B at global batch 64 on 8 A100 and 8 H100 nodes, whose search
# then took 25 s; where it binds, the best plan is the best of those split.
# The FASTEST_SPLIT run first because there a layout that keeps its split
# (no pipeline) can sit beyond BRANCHED by bound. Without interleaving the
# split is solved exactly in milliseconds (the bottleneck method; mixed
# GPUs: the typed program), and so is interleaving over one run of equal
# layers (the interleaved method); the general MILP (interleaving over
# several kinds of layer, or on GPUs of different speeds) runs for the first
# MILP_REFINED layouts that fit and need it, each solve capped at
# SPLIT_TIME_LIMIT_S.
REFINED = 8
FASTEST_SPLIT = 16
BRANCHED = 256
MILP_REFINED = 3
NEAR_FIT = 1.25
SPLIT_TIME_LIMIT_S = 2.0
# Where links differ (faults, oversubscription, a measured profile), the
# best PLACED plans get the rank placement solver (planner/search/placement.py).
PLACED = 2


@dataclass(frozen=True)
class SearchResult:
    plans: list[Plan]  # best first
    candidates: int
    feasible: int
    wall_time_s: float
    solver: str = "enumeration"  # and the split methods that ran
    # "time_limit" when a split or placement solve behind the returned plans
    # stopped short of proving its answer optimal (or of finding a split)
    status: str = "optimal"
    gap: float = 0.0  # largest relative gap of those solves that found a split or placement
    # Nearby global batch sizes that would train faster (search/alternatives.py).
    nearby_batches: tuple[NearbyBatch, ...] = ()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choices(job: Job) -> dict[str, list]:
    """The values each knob may take, "auto" resolved for this job."""
    model, gpus, space = job.model, job.cluster.num_gpus, job.search
    megatron, deepspeed = job.framework == "megatron", job.framework == "deepspeed"
    flavor = torchtitan.flavor_of(model) if job.framework == "torchtitan" else None
    # TP inside a node, or up to 8 across the nodes of an NVLink domain
    # (NVL72: TP8 over two 4-GPU trays), as Megatron's recipes go no wider.
    nvlink_gpus = max(job.cluster.gpus_per_node, min(job.cluster.slowest.domain_gpus, 8))
    powers = [2**i for i in range(8) if 2**i <= nvlink_gpus]
    stages = [p for p in _divisors(gpus) if p <= model.num_layers]
    auto = {
        "tp": [t for t in powers if model.num_attention_heads % t == 0 and model.num_query_groups % t == 0] if not deepspeed else [1],
        "cp": [c for c in (1, 2, 4, 8) if c == 1 or job.seq_length % (2 * c) == 0] if not deepspeed and job.features.flash_attention else [1],
        "ep": [e for e in _divisors(model.moe.num_experts) if e <= gpus] if model.moe else [1],
        # Experts are small GEMMs already: splitting them (ETP) rarely pays; Megatron's MoE recipes keep etp = 1.
        "etp": [1],
        "pp": stages if megatron or deepspeed or flavor.pipeline else [1],
        "vpp": [1] if deepspeed else None,  # per pp: see _virtual_stages
        "micro_batch_size": [1, 2, 4, 8],
        "sequence_parallel": None,  # on exactly when tp > 1
        "recompute": ["none", "full"] if deepspeed else ["none", "selective", "full"],
        "distributed_optimizer": [True, False] if megatron else [False],
        "zero_stage": [0, 1, 2, 3] if deepspeed else [0],
        "fsdp": None,  # per layout: see _shard_degrees
        "reshard_after_forward": [True, False] if flavor else [True],
        "optimizer_offload": [False],
    }
    # A value listed twice is tried once.
    return {knob: auto[knob] if getattr(space, knob) == "auto" else list(dict.fromkeys(getattr(space, knob))) for knob in auto}



def _virtual_stages(num_layers: int, pp: int) -> list[int]:
    """Interleaving degrees worth trying at ``pp``: those splitting the layers
    evenly, and 2-4 (uneven chunks are fine with a pipeline layout)."""
    return sorted({v for v in _divisors(num_layers // pp) if num_layers % (pp * v) == 0} | {v for v in (1, 2, 3, 4) if pp * v <= num_layers})


def _shard_degrees(job: Job, tp: int, cp: int, dp: int, zero: int) -> list[int]:
    """Sharded data parallelism worth trying: over all of DP (Megatron-FSDP,
    ZeRO-3, FSDP), and for torchtitan also over the DP ranks of one NVLink
    domain, replicated across domains (HSDP: the gathers stay on NVLink). Megatron
    also runs without; torchtitan without only as 1-D DDP; DeepSpeed shards
    weights exactly under ZeRO-3, over all of DP."""
    if job.framework == "deepspeed":
        return [dp if zero == 3 else 0]
    if dp * cp == 1:
        return [0]
    in_node = job.cluster.slowest.domain_gpus // (tp * cp)
    degrees = {dp} | ({in_node} if job.framework == "torchtitan" and 1 < in_node < dp and dp % in_node == 0 else set())
    if job.framework == "megatron" or (job.framework == "torchtitan" and tp * cp == 1):
        degrees.add(0)
    return sorted(degrees)


def candidate_layouts(job: Job) -> Iterator[Layout]:
    """Every combination of knob values, with dp filling the cluster."""
    c, gpus = _choices(job), job.cluster.num_gpus
    for tp, cp, pp, ep, etp in itertools.product(c["tp"], c["cp"], c["pp"], c["ep"], c["etp"]):
        if gpus % (tp * cp * pp) or (gpus // pp) % (ep * etp):
            continue  # expert ranks regroup the tp x cp x dp ranks of a stage
        dp = gpus // (tp * cp * pp)
        sequence_parallel = [tp > 1] if c["sequence_parallel"] is None else c["sequence_parallel"]
        for vpp, mbs, sp, recompute, dist_opt, zero, reshard, offload in itertools.product(
            _virtual_stages(job.model.num_layers, pp) if c["vpp"] is None else c["vpp"], c["micro_batch_size"], sequence_parallel,
            c["recompute"], c["distributed_optimizer"], c["zero_stage"], c["reshard_after_forward"], c["optimizer_offload"]
        ):
            # The distributed optimizer over one rank is the plain one, unless
            # offload or bf16 states need it (Megatron runs those only with it).
            needs_distributed = offload or job.features.optimizer_states == "bf16"
            if (sp and tp == 1) or (vpp > 1 and pp == 1) or (dist_opt and dp * cp == 1 and not needs_distributed) or (zero and dp * cp == 1):
                continue  # same layout as the one without the knob
            for fsdp in _shard_degrees(job, tp, cp, dp, zero) if c["fsdp"] is None else c["fsdp"]:
                if (not fsdp and not reshard) or (fsdp and job.framework == "megatron" and not dist_opt):
                    continue  # nothing to reshard; Megatron-FSDP runs with the distributed optimizer
                yield Layout(
                    tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, etp=etp, vpp=vpp, micro_batch_size=mbs, global_batch_size=job.global_batch_size,
                    sequence_parallel=sp, recompute=recompute, distributed_optimizer=dist_opt, zero_stage=zero, fsdp=fsdp,
                    reshard_after_forward=reshard, optimizer_offload=offload,
                    recompute_modules=default_recompute_modules(job, recompute),
                )


@dataclass(frozen=True)
class _Fullest:
    """The fullest stage of a layout: its peak bytes, its GPU's capacity and
    what of it a plan may use (capacity less the job's memory headroom)."""

    peak_bytes: float
    capacity_bytes: float
    usable_bytes: float

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def fullness(self) -> float:
        return self.peak_bytes / self.usable_bytes


def fullest_stage(job: Job, layout: Layout, gpus: list[GPU], skip_beyond: float = math.inf) -> _Fullest | None:
    """Of the layout's default split (default_stages), stage s on ``gpus[s]``,
    the stage closest to (or furthest over) its GPU's usable memory, or
    None when some stage's model state alone fills more than
    ``skip_beyond`` of its usable memory (then the fullest is fuller still).

    Stages alike in what they hold (the same layers, dense and MoE, per
    chunk, the same embedding, head and GPU type) differ only in how many
    micro batches are in flight, and Megatron's schedules hold no fewer on
    an earlier stage (``in_flight_chunks``; for unequal chunks every count
    a later stage reaches is covered by an earlier one's, which
    tests/test_memory.py checks): only the first of each kind is priced."""
    shape, stages = shape_of(job, layout), default_stages(job.model, layout, job.framework)
    if job.cluster.heterogeneous:
        kinds = _first_of_each((stage_signature(job.model, stage), gpu.kind) for stage, gpu in zip(stages, gpus))
    else:
        kinds = _distinct_default_stages(job.model, layout.pp, layout.vpp, job.framework)
    if skip_beyond < math.inf and any(stage_state_bytes(shape, layout, stages[s], job.framework, gpus[s])
                                      > skip_beyond * job.memory_headroom.usable(gpus[s].memory_bytes) for s in kinds):
        return None
    return max(
        (_Fullest(stage_peak_bytes(shape, layout, stages[s], job.framework, gpus[s]), gpus[s].memory_bytes,
                  job.memory_headroom.usable(gpus[s].memory_bytes)) for s in kinds),
        key=lambda fullest: fullest.fullness,
    )


@functools.lru_cache(maxsize=1024)
def _distinct_default_stages(model: ModelSpec, pp: int, vpp: int, framework: str) -> tuple[int, ...]:
    """Of the default split's stages (default_stages: their layers depend on
    pp, vpp and the framework alone), the first of each stage_signature."""
    stages = default_stages(model, Layout(tp=1, pp=pp, dp=1, cp=1, vpp=vpp, micro_batch_size=1, global_batch_size=1), framework)
    return _first_of_each(stage_signature(model, stage) for stage in stages)


def _first_of_each(kinds: Iterable[Hashable]) -> tuple[int, ...]:
    """The position of the first of each distinct value of ``kinds``, in order."""
    first: dict[Hashable, int] = {}
    for i, kind in enumerate(kinds):
        first.setdefault(kind, i)
    return tuple(first.values())


@dataclass(frozen=True)
class _Scored:
    """A feasible layout with what it is ranked by: fastest first, ties broken
    by less memory, then by the layout's label, so the ranking is deterministic."""

    step_time_s: float  # the closed form's, on the even split
    peak_bytes: float
    layout: Layout
    # No split of the layers can make the step shorter than this (split_bound_s).
    bound_s: float = 0.0
    # The plan on the even split, where the search built it (_Frontier.add).
    even_plan: Plan | None = None

    def key(self) -> tuple:
        return (round(self.step_time_s, 9), round(self.peak_bytes), self.layout.label())

    def bound_key(self) -> tuple:
        """Lowest split bound first, then as key()."""
        return (round(self.bound_s, 9), *self.key())


def search(job: Job, top_k: int, progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """Rank the layouts of ``job`` — for an MoE job, under each token
    dispatcher its ``search.moe_token_dispatcher`` lists (each plan carries
    its job, so its launch files name its dispatcher); also on fewer nodes,
    the slowest idle, where the cluster mixes GPUs of different compute or
    its node count or the global batch is awkward; and for an awkward global
    batch, the nearby sizes that would train faster (search/alternatives.py).
    Raises InfeasibleError saying what binds, and which nearby global batch
    sizes would fit."""
    try:
        result = _search_sizes(job, top_k, progress)
    except InfeasibleError as error:
        fitting = _nearby_batches(job)
        if not fitting:
            raise
        listed = ", ".join(f"{batch} ({plan.layout.label()}, {plan.tokens_per_s:,.0f} tokens/s)" for batch, plan in fitting)
        raise InfeasibleError(f"{error}; nearby global batch sizes fit: {listed}") from None
    started = time.perf_counter()
    best = result.plans[0].tokens_per_s
    nearby = [NearbyBatch(batch, plan.layout.label(), plan.tokens_per_s, gain, plan.idle_gpus)
              for batch, plan in _nearby_batches(job) if (gain := plan.tokens_per_s / best - 1) >= MIN_GAIN]
    return replace(result, nearby_batches=tuple(nearby), wall_time_s=result.wall_time_s + time.perf_counter() - started)


def _search_sizes(job: Job, top_k: int, progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """Rank the layouts of ``job`` on its whole cluster and on the fewer
    nodes alternatives.idle_node_counts offers (the slowest idle), together."""
    results, infeasible, tried = [], None, []
    try:
        results.append(_search_dispatchers(job, top_k, progress))
    except InfeasibleError as error:
        infeasible = error
    for nodes in idle_node_counts(job.cluster, job.global_batch_size):
        idle = job.cluster.num_gpus - nodes * job.cluster.gpus_per_node
        tried.append(str(nodes))
        try:
            found = _search_dispatchers(replace(job, cluster=job.cluster.fastest_nodes(nodes)), top_k)
        except (InfeasibleError, SpecError):  # the search lists were judged on the whole cluster
            continue
        results.append(replace(found, plans=[replace(plan, idle_gpus=idle) for plan in found.plans]))
    if not results:
        raise InfeasibleError(f"{infeasible} (nor on {' or '.join(tried)} of its nodes)" if tried else str(infeasible)) from None
    return _merged(results, top_k)


def _nearby_batches(job: Job) -> list[tuple[int, Plan]]:
    """Each nearby global batch size (alternatives.nearby_batch_sizes) that
    has a plan, with its best plan (on the whole cluster or fewer nodes)."""
    found = []
    for batch in nearby_batch_sizes(job.global_batch_size):
        try:
            found.append((batch, _search_sizes(replace(job, global_batch_size=batch), 1).plans[0]))
        except (InfeasibleError, SpecError):  # the search lists were judged at the job's own batch
            continue
    return found


def _search_dispatchers(job: Job, top_k: int, progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """Rank the layouts of ``job`` under each token dispatcher it lists."""
    variants = dispatcher_variants(job)
    if len(variants) == 1:
        return _search_layouts(variants[0], top_k, progress)
    results, infeasible = [], []
    for variant in variants:
        try:
            results.append(_search_layouts(variant, top_k, progress))
        except InfeasibleError as error:
            infeasible.append(error)
    if not results:
        raise infeasible[0]
    return _merged(results, top_k)


def _merged(results: list[SearchResult], top_k: int) -> SearchResult:
    """One result of several searches: their best top_k plans, their counts and times summed."""
    if len(results) == 1:
        return results[0]
    return SearchResult(
        plans=_ranked([plan for result in results for plan in result.plans])[:top_k],
        candidates=sum(result.candidates for result in results),
        feasible=sum(result.feasible for result in results),
        wall_time_s=sum(result.wall_time_s for result in results),
        solver="+".join(sorted({part for result in results for part in result.solver.split("+")}, key=lambda part: (part != "enumeration", part))),
        status="time_limit" if any(result.status == "time_limit" for result in results) else "optimal",
        gap=max(result.gap for result in results),
    )


def dispatcher_variants(job: Job) -> list[Job]:
    """``job`` once per token dispatcher its search lists ("auto": the job's
    own). Raises SpecError naming ``search.moe_token_dispatcher`` when a
    listed dispatcher contradicts the job's other MoE features (Features'
    checks, as megatron-core refuses them)."""
    wanted = job.search.moe_token_dispatcher
    if job.model.moe is None or wanted == "auto":
        return [job]
    variants = []
    for dispatcher in dict.fromkeys(wanted):
        try:
            features = Features(**{**job.features.model_dump(), "moe_token_dispatcher": dispatcher})
        except pydantic.ValidationError as error:
            reason = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise SpecError(job.source, "search.moe_token_dispatcher", f"dispatchers the job's features allow ({reason})", dispatcher) from None
        if job.framework == "torchtitan" and dispatcher not in torchtitan.DISPATCHERS:
            raise SpecError(job.source, "search.moe_token_dispatcher", f"{' or '.join(torchtitan.DISPATCHERS)} with torchtitan", dispatcher)
        variant = replace(job, features=features)
        try:  # what the framework runs (DeepSpeed: its own all-to-all; torchtitan: DeepEP for deepseek_v3 only)
            check_job(variant)
        except SpecError as refused:
            _, expected, _ = refused.problems[0]
            raise SpecError(job.source, "search.moe_token_dispatcher", f"dispatchers {job.framework} runs ({expected})", dispatcher) from None
        variants.append(variant)
    return variants


def _search_layouts(job: Job, top_k: int, progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """Rank the layouts of ``job`` as its features stand.

    Branch and bound: layouts are priced in the order of a lower bound on
    their step (step_lower_bound_s), and one whose bound cannot reach any
    list the search draws from (_Frontier) is not timed, nor one whose
    tighter bound from its chunks' times (chunk_bounds_s) cannot. Memory is
    judged for every layout (the count of those that fit, and what binds when
    none does), except one whose model state alone is beyond NEAR_FIT of its GPU
    and beyond the least full layout seen: it can neither fit nor be the
    one named in the message."""
    started = time.perf_counter()
    layouts = list(candidate_layouts(job))
    if not layouts:
        _refuse_empty_space(job)
    # Every layout fills the cluster, so they share Megatron's default placement,
    # on which the enumeration prices every layout.
    placement = default_placement(job.cluster, job.cluster.num_gpus)
    rejected: Counter[str] = Counter()
    broken: Counter[str] = Counter()  # every field a layout breaks a rule on, by layouts
    expectations: dict[str, Counter[str]] = {}  # what the rules on each field expected, by layouts
    valid = []
    for layout in layouts:
        problems = layout_problems(job, layout)
        if problems:
            field, expected, _ = problems[0]
            rejected[f"{field}: {expected}"] += 1
            broken.update({field for field, _, _ in problems})
            for field, expected, _ in problems:
                expectations.setdefault(field, Counter())[expected] += 1
        else:
            valid.append((step_lower_bound_s(job, layout), layout))
    if not valid:
        _refuse_search_list(job, broken, expectations, len(layouts))
    valid.sort(key=lambda bounded: bounded[0])  # stable: the enumeration's order among equal bounds
    smallest: tuple[_Fullest, Layout] | None = None
    frontier = _Frontier(job, top_k)
    fitting = 0
    chunk_bounds: dict[Layout, tuple[float, float]] = {}
    for i, (lower_bound_s, layout) in enumerate(valid):
        if progress and i % 256 == 0:
            progress(i, len(valid))
        stages = default_stages(job.model, layout, job.framework)
        gpus = stage_gpus(job.cluster, placement, stages)
        fullest = fullest_stage(job, layout, gpus, skip_beyond=max(NEAR_FIT, smallest[0].fullness) if smallest else math.inf)
        if fullest is None:
            continue
        if smallest is None or fullest.fullness < smallest[0].fullness:
            smallest = (fullest, layout)
        fitting += fullest.fits
        near = not fullest.fits and splittable(job, layout) and fullest.peak_bytes <= NEAR_FIT * fullest.usable_bytes
        if (fullest.fits or near) and frontier.may_enter(layout, lower_bound_s, lower_bound_s, fullest.fits):
            # Layouts that differ only in how the model state is sharded or
            # offloaded run the same chunks: their chunk bounds are one.
            unsharded = replace(layout, distributed_optimizer=False, zero_stage=0, fsdp=0, reshard_after_forward=True, optimizer_offload=False)
            if unsharded not in chunk_bounds:
                chunk_bounds[unsharded] = chunk_bounds_s(job, layout, stages, gpus)
            if not frontier.may_enter(layout, *chunk_bounds[unsharded], fullest.fits):
                continue
            timing = step_time(job, layout, stages, gpus)
            frontier.add(_Scored(timing.step_time_s, fullest.peak_bytes, layout, split_bound_s(job, layout, stages, timing, gpus)), fullest.fits)
    if progress:
        progress(len(valid), len(valid))
    scored, near = frontier.fitting, frontier.near
    partial = _partial_recompute(job, scored, placement)
    scored += partial
    ranked = sorted(scored, key=_Scored.key)
    promising = _promising(sorted(near, key=_Scored.key))
    others_near = [c for c in near if all(c is not p for p in promising)]
    plans, solves, near_fitting = _branch_and_bound(job, ranked[:FASTEST_SPLIT], ranked[FASTEST_SPLIT:], promising, others_near, frontier.kept)
    # Even plans built while pricing lowered the cutoff: a layout beyond
    # BRANCHED keeps its even split rather than vanishing from the ranking.
    split_layouts = {plan.layout for plan in plans}
    plans += [c.even_plan for c in scored if c.even_plan and c.even_plan.leaves_headroom and c.layout not in split_layouts]
    if not plans:
        raise InfeasibleError(_what_binds(job, smallest, rejected))
    plans = _ranked(plans)
    if any(can_place(plan) for plan in plans):
        plans = _ranked([place(plan) if i < PLACED else plan for i, plan in enumerate(plans)])
    methods = sorted({solve.method for solve in solves} | {plan.placement_solve.method for plan in plans if plan.placement_solve})
    placements = [plan.placement_solve for plan in plans[:top_k] if plan.placement_solve]
    return SearchResult(
        plans=[with_pp_comm(plan) for plan in plans[:top_k]],
        candidates=len(layouts),
        # Of the near ones, those always split (the count must not depend on k).
        feasible=fitting + len(partial) + near_fitting,
        wall_time_s=time.perf_counter() - started,
        solver="+".join(["enumeration", *methods]),
        status="time_limit" if any(solve.status == "time_limit" for solve in solves) or any(p.status != "optimal" for p in placements) else "optimal",
        gap=max([solve.gap for solve in solves if solve.chunk_sizes] + [p.gap for p in placements], default=0.0),
    )


class _Least:
    """The ``count`` least values offered so far: ``cutoff`` is the largest
    of them once there are ``count`` (no value above it can join), else inf."""

    def __init__(self, count: int):
        self.count, self._negated = count, []

    def offer(self, value: float) -> None:
        if len(self._negated) < self.count:
            heapq.heappush(self._negated, -value)
        elif value < -self._negated[0]:
            heapq.heapreplace(self._negated, -value)

    @property
    def cutoff(self) -> float:
        return -self._negated[0] if len(self._negated) == self.count else math.inf


class _FastestPlans:
    """The least step of each layout's plans built so far: ``cutoff`` is the
    ``count``-th least of them once ``count`` layouts have one (no layout
    beyond it can be among the ``count`` fastest), else inf. A layout's
    split plan replaces its even one, so none is counted twice."""

    def __init__(self, count: int):
        self.count, self.cutoff, self._steps = count, math.inf, {}

    def offer(self, layout: Layout, step_s: float) -> None:
        if step_s < self._steps.get(layout, math.inf):
            self._steps[layout] = step_s
            if len(self._steps) >= self.count:
                self.cutoff = heapq.nsmallest(self.count, self._steps.values())[-1]


class _Frontier:
    """The priced layouts, and the bound below which an unpriced one must be
    to reach a list the search draws from: ``kept``, the steps of the k
    fastest plans built (their even splits, simulated, all of them ranked:
    the layouts whose split bound is at most the k-th of them are split by
    _branch_and_bound, up to BRANCHED);
    the FASTEST_SPLIT fastest by the closed form (``fastest``, split whatever
    their bound); the PARTIAL_CANDIDATES fastest fully recomputed ones by the closed form
    (_partial_recompute); of the near ones, the REFINED fastest and lowest
    bounds (_promising), and, as for those that fit, those whose split bound
    is below ``kept``'s cutoff. Each list's cutoff only falls as layouts are
    priced, so a layout beyond every cutoff that applies to it would not
    have been chosen.

    ``kept`` holds at least PLACED steps: the placement solver runs for the
    PLACED fastest plans, which must not depend on k either."""

    def __init__(self, job: Job, top_k: int):
        self.job, self.fitting, self.near = job, [], []
        self.kept = _FastestPlans(max(top_k, PLACED))
        self.fastest = _Least(FASTEST_SPLIT)
        self.fully_recomputed = _Least(PARTIAL_CANDIDATES)
        self.near_fastest, self.near_bounds = _Least(REFINED), _Least(REFINED)

    def _cutoffs(self, layout: Layout, fits: bool) -> list[_Least | _FastestPlans]:
        if not fits:
            return [self.kept, self.near_fastest, self.near_bounds]
        if layout.recompute == "full" and not layout.recompute_num_layers:
            return [self.kept, self.fastest, self.fully_recomputed]
        return [self.kept, self.fastest]

    def may_enter(self, layout: Layout, step_bound_s: float, split_bound_s: float, fits: bool) -> bool:
        """Whether a layout whose step is at least ``step_bound_s``, and at
        least ``split_bound_s`` under any split of its layers, might enter a
        list (keys round steps to 1e-9 s: a bound that close counts)."""
        return any((split_bound_s if self._bounds(least) else step_bound_s) <= least.cutoff + 1e-9 for least in self._cutoffs(layout, fits))

    def _bounds(self, least: _Least | _FastestPlans) -> bool:
        """Whether ``least`` is compared with split bounds (split_bound_s), not steps."""
        return least in (self.kept, self.near_bounds)

    def add(self, candidate: _Scored, fits: bool) -> None:
        """Keep ``candidate``; one that fits and whose closed-form step is
        below the k-th plan's has its even split simulated (build_plan),
        which lowers that cutoff (the simulation, not the closed form, is the
        step a plan reports)."""
        if fits and candidate.step_time_s <= self.kept.cutoff:
            plan = build_plan(self.job, candidate.layout, send_recv=False)
            if plan.leaves_headroom:
                self.kept.offer(candidate.layout, plan.step_time_s)
            candidate = replace(candidate, even_plan=plan)
        (self.fitting if fits else self.near).append(candidate)
        for least in self._cutoffs(candidate.layout, fits):
            if least is not self.kept:
                least.offer(candidate.bound_s if self._bounds(least) else candidate.step_time_s)


def _promising(ranked: list[_Scored]) -> list[_Scored]:
    """Of the layouts near fitting ``ranked`` (fastest first), the REFINED
    fastest and the REFINED whose split bound is lowest: the even split
    misjudges deep pipelines whose end stages carry the embedding and the
    head, and the bound (which ignores that a layer cannot be cut)
    overrates them."""
    lowest = sorted(ranked, key=_Scored.bound_key)[:REFINED]
    return list({id(c): c for c in [*ranked[:REFINED], *lowest]}.values())


def split_bound_s(job: Job, layout: Layout, stages: list[Stage], timing: StepTime, gpus: list[GPU]) -> float:
    """A lower bound on the step of ``layout``'s plan (simulated) under any
    split of its layers, from its even split ``stages`` (on ``gpus``) and
    their closed-form ``timing``.

    Of the step only the embedding's gradient sync and the pipeline do not
    depend on the split: the optimizer, the sharded state's gathers and
    reduces and the gradient reduce follow each stage's parameters, and the
    simulation may hide the reduce and send/recv behind other stages' work.
    The pipeline takes at least m T, T the slowest stage's chunks' work
    (time_model.chunk_stage_times_s, whose sum W does not depend on the
    split), which no split makes smaller than W / p nor than the work a
    stage has beyond its layers (the embedding, the head and multi-token
    prediction, which cannot be cut: its even-split time less its layers at
    the slowest per-layer time of the stages that have nothing else), and no
    less than any split of W reaches (split_pipeline_floor_s). On GPUs of
    different speeds a split also moves work to the faster ones, so W is no
    constant: time_model.mixed_split_floor_s bounds the pipeline from each
    GPU's least time a layer instead. A layout that keeps its split: its
    closed-form step less what the simulation may hide (hideable_s) and with
    pipeline_floor_s of its own stages as its pipeline."""
    m, v, p = layout.num_microbatches, layout.vpp, layout.pp
    if not splittable(job, layout):
        tau = list(timing.stage_microbatch_s)
        # Without interleaving each stage is its own first chunk; with it the first chunks are not known here.
        floor_s = pipeline_floor_s(tau, tau if v == 1 else [0.0] * p, m)
        return timing.step_time_s - hideable_s(timing) - max(0.0, pipeline_term_s(tau, layout) - floor_s)
    mixed = mixed_split_floor_s(job, layout, gpus)
    if mixed is not None:
        return timing.breakdown_s["embedding_sync"] + mixed
    tau = chunk_stage_times_s(job, layout, stages, gpus)
    work = sum(tau)
    plain = [t / s.num_layers for t, s in zip(tau, stages) if s.num_layers and not (s.embedding or s.head or s.vision)]
    fixed = [t - s.num_layers * max(plain) for t, s in zip(tau, stages)] if plain else [0.0]
    return timing.breakdown_s["embedding_sync"] + max(m * max(work / p, *fixed), split_pipeline_floor_s(work, p, v, m))


def _partial_recompute(job: Job, scored: list[_Scored], placement) -> list[_Scored]:
    """Partial-recompute variants (search/recompute.py) of the fastest
    layouts that fit only by recomputing every layer."""
    if job.framework != "megatron" or "full" not in _choices(job)["recompute"]:
        return []
    fully = sorted((c for c in scored if c.layout.recompute == "full" and not c.layout.recompute_num_layers), key=_Scored.key)
    found = []
    for candidate in fully[:PARTIAL_CANDIDATES]:
        stages = default_stages(job.model, candidate.layout, job.framework)
        gpus = stage_gpus(job.cluster, placement, stages)

        def fits(layout: Layout) -> bool:  # the same stages: only recomputation changes
            return fullest_stage(job, layout, gpus).fits

        for variant in partial_variants(job, candidate.layout, fits):
            if not layout_problems(job, variant):
                timing = step_time(job, variant, stages, gpus)
                found.append(_Scored(timing.step_time_s, fullest_stage(job, variant, gpus).peak_bytes, variant,
                                     split_bound_s(job, variant, stages, timing, gpus)))
    return found


def _ranked(plans: list[Plan]) -> list[Plan]:
    return sorted(plans, key=lambda plan: (round(plan.step_time_s, 9), round(plan.peak_memory.peak_bytes), plan.layout.label()))


def splittable(job: Job, layout: Layout) -> bool:
    """Whether the partition MILP may split ``layout`` unevenly: pipelines
    of Megatron (--pipeline-model-parallel-layout) and torchtitan
    (module_fqns_per_model_part), not DeepSpeed's; block recompute saves per
    chunk, not per layer, so the partition's per-layer costs do not describe
    it and it keeps the even split; so does a hybrid Mamba model on
    Megatron, whose MambaStack takes no pipeline layout."""
    hybrid_megatron = job.model.mamba is not None and job.framework == "megatron"
    return job.framework != "deepspeed" and layout.pp > 1 and not layout.recompute_num_layers and not hybrid_megatron


def split_plan(job: Job, layout: Layout, milp: bool = True) -> Plan:
    """The plan of ``layout`` on the better of the even split and the
    optimal one (Megatron runs either), one that leaves the memory headroom
    first, carrying the split solve that ran as ``split_solve`` (``milp``:
    whether the general MILP may run; the exact methods always do)."""
    options, solve = _split_options(job, layout, milp)
    return _better([build_plan(job, layout, list(stages), placement) for stages, placement in options], solve)


def _split_options(job: Job, layout: Layout, milp: bool) -> tuple[list[tuple[tuple[Stage, ...], Placement]], Partition | None]:
    """The stages and placements ``layout`` may run: the even split, then
    the optimal split where it differs, and the split solve (None where the
    layout keeps its split or only the general MILP applies and ``milp`` is
    False). Only a proven optimum is offered: a time-limited incumbent
    depends on the machine's speed, and the same inputs must give the same
    plan."""
    even = (tuple(default_stages(job.model, layout, job.framework)), default_placement(job.cluster, layout.world_size))
    split = solve_split(job, layout, SPLIT_TIME_LIMIT_S, milp) if splittable(job, layout) else None
    if split is None:
        return [even], None
    # Often the optimal split is the even one.
    if split.stages and split.solution.status == "optimal" and (tuple(split.stages), split.placement) != even:
        return [even, (tuple(split.stages), split.placement)], split.solution
    return [even], split.solution


def _better(options: list[Plan], solve: Partition | None) -> Plan:
    """The fastest of ``options`` that leaves the memory headroom (the
    fastest of all when none does; the first on a tie), carrying ``solve``."""
    fitting = [plan for plan in options if plan.leaves_headroom]
    return replace(min(fitting or options, key=lambda plan: plan.step_time_s), split_solve=solve)


def step_floor_s(job: Job, layout: Layout, stages: Sequence[Stage], placement: Placement) -> float:
    """Seconds the plan build_plan simulates for ``layout`` on ``stages``
    and ``placement`` cannot go below, at a part of simulating it
    (simulated_step.step_floor_s)."""
    gpus = stage_gpus(job.cluster, placement, stages)
    return simulated_step_floor_s(step_parts(job, layout, list(stages), gpus, placement), list(stages))


def _branch_and_bound(job: Job, fastest: list[_Scored], rest: list[_Scored], near: list[_Scored], others_near: list[_Scored],
                      kept: _FastestPlans) -> tuple[list[Plan], list[Partition], int]:
    """Plans on the better of their even and optimal splits (as split_plan)
    for ``fastest`` (the FASTEST_SPLIT layouts fastest on the even split),
    ``rest`` (the other layouts that fit on it), ``near`` (the layouts
    within NEAR_FIT of fitting that _promising picks) and ``others_near``
    (the other near ones); the split solutions; and how many of ``near``
    fit once split.

    ``fastest`` first, every one (a split of one is simulated only if its
    step floor is below the cutoff). Then ``near``, every one split: a split
    decides whether it fits, and the count of layouts that fit must not
    depend on k (judged on memory; simulated below the cutoff). Then ``rest``, then ``others_near``, each in order of their split
    bound while it is at most the step of the ``kept.count``-th fastest plan
    built (``kept`` holds the steps built so far), at most BRANCHED of each
    (near ones, whose bounds are as loose, would crowd out the others): a
    layout beyond it cannot enter the plans returned, and a split whose step
    floor (step_floor_s) is beyond it is not simulated. Each of those lists
    is the same whatever k (up to the cutoff, which no layout that might be
    the fastest is beyond), so the best plan does not depend on k, except
    where BRANCHED binds and the best is a layout beyond it that keeps its
    even split: that one is ranked only if pricing simulated its even split,
    which it does when its closed-form step is below the cutoff then. The
    general MILP, which only interleaved layouts over several kinds of layer
    or on GPUs of different speeds need (the others have exact methods that
    take milliseconds), runs for the first MILP_REFINED layouts that fit
    and need it; the others keep the even split, and the near ones use the
    exact split methods only (proving that no split of one fits can take
    the MILP its whole time limit). Their pipelines' send/recv and bubble
    are told apart only for the plans kept (with_pp_comm): ranking needs the
    step, not its breakdown."""
    plans, solves, milp_runs, near_fitting = [], [], 0, 0

    def split(candidate: _Scored, milp: bool, cutoff_s: float) -> bool:
        nonlocal milp_runs
        plan, solve, fits = _split_candidate(job, candidate, milp and milp_runs < MILP_REFINED, cutoff_s)
        if solve is not None:
            solves.append(solve)
            milp_runs += solve.method.startswith("milp")
        if plan is not None:
            plans.append(plan)
            kept.offer(candidate.layout, plan.step_time_s)
        return fits

    for candidate in fastest:
        split(candidate, milp=True, cutoff_s=kept.cutoff)
    for candidate in near:
        near_fitting += split(candidate, milp=False, cutoff_s=kept.cutoff)
    for queue, fits in ((rest, True), (others_near, False)):
        for candidate in sorted(queue, key=_Scored.bound_key)[:BRANCHED]:
            if candidate.bound_s > kept.cutoff + 1e-9:
                break
            split(candidate, milp=fits, cutoff_s=kept.cutoff)
    return plans, solves, near_fitting


def _split_candidate(job: Job, candidate: _Scored, milp: bool, cutoff_s: float) -> tuple[Plan | None, Partition | None, bool]:
    """``candidate``'s plan on the better of its even and optimal splits
    (_split_options; ``milp``: whether the general MILP may run) that leave
    the memory headroom, leaving out a split whose step floor is beyond
    ``cutoff_s`` (None when no split is left); the split solve; and whether
    some split leaves the headroom (judged on memory alone: a split is
    simulated only if it may be fast enough)."""
    layout, built, fits = candidate.layout, [], False
    options, solve = _split_options(job, layout, milp)
    shape = shape_of(job, layout)
    for i, (stages, placement) in enumerate(options):
        gpus = stage_gpus(job.cluster, placement, stages)
        leaves = all(stage_peak_bytes(shape, layout, stage, job.framework, gpu) <= job.memory_headroom.usable(gpu.memory_bytes)
                     for stage, gpu in zip(stages, gpus))
        fits = fits or leaves
        if not leaves:
            continue
        if i == 0 and candidate.even_plan:
            built.append(candidate.even_plan)
        elif step_floor_s(job, layout, stages, placement) <= cutoff_s + 1e-9:
            built.append(build_plan(job, layout, list(stages), placement, send_recv=False))
    return (_better(built, solve) if built else None), solve, fits


def _refuse_search_list(job: Job, broken: Counter[str], expectations: dict[str, Counter[str]], layouts: int) -> None:
    """Bad input, not infeasibility: when the rules on one knob refuse
    every layout (whatever each expected of its own dp: ``search: {fsdp:
    [3]}`` on 64 GPUs) and the job's ``search:`` lists that knob, the list
    asks for what this model, framework or cluster never runs (``search:
    {ep: [8]}`` for a dense model, ``{etp: [2]}`` with DeepSpeed). The
    message gives what the rules expected most often. Not when the lists
    run on the fewer nodes the search also tries."""
    if _lists_run_on_fewer_nodes(job):
        return
    for field, count in broken.most_common():
        knob = _KNOB_OF_RULE.get(field, field)
        listed = getattr(job.search, knob) if knob in type(job.search).model_fields else "auto"
        if count == layouts and listed != "auto":
            expected = expectations[field].most_common(1)[0][0]
            raise SpecError(job.source, f"search.{knob}", expected if knob == field else f"values for which {field} is {expected}", listed)


# A rule on a job field that a search knob drives: the global batch must be a
# multiple of micro_batch_size x dp.
_KNOB_OF_RULE = {"global_batch_size": "micro_batch_size"}


def _lists_run_on_fewer_nodes(job: Job) -> bool:
    """Some layout the search lists allow passes the rules on the fewer
    nodes the search also tries (alternatives.idle_node_counts: a mixed
    cluster's faster nodes, an awkward node count's neighbours)."""
    for nodes in idle_node_counts(job.cluster, job.global_batch_size):
        fewer = replace(job, cluster=job.cluster.fastest_nodes(nodes))
        if any(not layout_problems(fewer, layout) for layout in candidate_layouts(fewer)):
            return True
    return False


def _refuse_empty_space(job: Job) -> None:
    """Bad input: the ``search:`` lists combine to no layout at all (no
    tp x cp x pp among them divides the cluster, a vpp listed only beside
    pp 1, ...). "auto" always leaves the all-ones layout, so a listed knob
    is to blame: the first whose list, set back to "auto", leaves a layout
    is named (knobs that qualify others first: vpp before pp, sequence
    parallelism before tp); when no single one does, the listed knobs together."""
    if _lists_run_on_fewer_nodes(job):
        return  # the search tries those nodes (idle_node_counts)
    space, gpus = job.search, job.cluster.num_gpus
    listed = [knob for knob in reversed(type(space).model_fields) if getattr(space, knob) != "auto"]
    expected = f"values that leave a layout for {gpus} GPUs beside the other search lists"
    for knob in listed:
        if next(candidate_layouts(replace(job, search=space.model_copy(update={knob: "auto"}))), None) is not None:
            raise SpecError(job.source, f"search.{knob}", expected + _SPACE_RULES.get(knob, ""), getattr(space, knob))
    raise SpecError(job.source, "search", expected, {knob: getattr(space, knob) for knob in listed})


# What candidate_layouts asks of each degree beyond its own list.
_SPACE_RULES = {
    **dict.fromkeys(("tp", "cp", "pp"), " (tp x cp x pp divides the GPUs)"),
    **dict.fromkeys(("ep", "etp"), " (ep x etp divides a stage's GPUs)"),
    "vpp": " (vpp > 1 needs pp > 1)",
    "sequence_parallel": " (sequence parallel needs tp > 1)",
}


def _what_binds(job: Job, smallest: tuple[_Fullest, Layout] | None, rejected: Counter) -> str:
    if smallest is not None:
        fullest, layout = smallest
        offload = ("; optimizer offload is not searched unless the job lists it (search: {optimizer_offload: [false, true]})"
                   if job.search.optimizer_offload == "auto" else "")
        return (
            f"no layout of {job.model.name} fits on {job.cluster.gpu_summary}: the smallest "
            f"({layout.label()}) still needs {fullest.peak_bytes / GiB:.1f} GiB of a {fullest.capacity_bytes / GiB:.1f} GiB GPU, "
            f"which leaves {fullest.usable_bytes / GiB:.1f} GiB after {job.memory_headroom.describe()}{offload}"
        )
    if not rejected:
        return f"the search lists of {job.source} leave no layout for {job.cluster.num_gpus} GPUs"
    reasons = "; ".join(f"{reason} ({count} layouts)" for reason, count in rejected.most_common(3))
    return f"no layout of {job.model.name} on {job.cluster.num_gpus} GPUs passes the divisibility rules: {reasons}"
