"""The JSON report (``--json`` on stdout, ``plan.json`` under ``--out``).

Its shape is the contract in ARCHITECTURE.md; these pydantic models are its
single definition, and ``plan.schema.json`` beside this file is generated from
them (``python -m loom.planner.output.report`` rewrites it; a test keeps it in sync).

The models also state what the planner guarantees of every report it writes,
so that a report read back (``read_report``, for ``loom explain``) is checked
against the same rules: field constraints (degrees >= 1, every time and byte
finite and >= 0, a capacity > 0), which the JSON Schema carries, and the
relations between fields (world size, stages, layer ranges, placement and
the schedule's shape), which ``plan_problems`` and ``report_problems`` check.
A report that breaks them when written is a bug in loom.
"""

from __future__ import annotations

from collections.abc import Sequence

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic_core import InitErrorDetails, PydanticCustomError

from loom.planner.cost.layers import shape_of, sources
from loom.planner.plan import Plan
from loom.planner.specs.files import read_json, validate
from loom.planner.specs.job import Features, Framework, Precision, job_warnings
from loom.planner.specs.layout import Recompute
from loom.planner.specs.stacks import STACKS
from loom.planner.schedule.simulate import SCHEDULES, ChunkCost, PipelineCosts

SCHEMA_VERSION = "1.8"
# What read_report accepts: 1.1 only added fields with defaults
# (memory.required_headroom_bytes and fits, parallel.recompute_modules and
# recompute_num_layers), and 1.2 too (parallel.fsdp, reshard_after_forward
# and optimizer_offload), 1.3 too (stages[].kernels_s), 1.4
# (model_parameters, model_active_parameters) and 1.5 (placement[].count:
# a run of ranks, 1 in every earlier report; stages[].ranks beside the
# older device_group; plans[].idle_gpus and split_solver;
# search.nearby_global_batch_sizes), 1.6 (their idle_gpus) and 1.7
# (parallel.etp: earlier reports were of plans with etp 1, the search's
# only value, or dropped an evaluated --etp) and 1.8
# (memory.per_stage_capacity_bytes), so 1.0-1.7 reports read as they did.
READ_SCHEMA_VERSIONS = ("1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", SCHEMA_VERSION)
SCHEMA_FILE = Path(__file__).with_name("plan.schema.json")

# Field types: what the planner writes, and so what a report read back must hold.
# JSON (Python's json module) carries NaN and Infinity; the planner writes neither.
Count = Annotated[int, pydantic.Field(ge=1)]  # a parallel degree, a batch size, a number of micro batches
Index = Annotated[int, pydantic.Field(ge=0)]  # a rank, a GPU, a layer or stage index
Amount = Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)]  # seconds, bytes, a rate: finite, >= 0
Finite = Annotated[float, pydantic.Field(allow_inf_nan=False)]  # a fraction that may be < 0 (headroom of a plan that does not fit)

# Parts written as floats add up to their total to within rounding.
SUM_TOLERANCE = 1e-6
# (location in the report, what was expected, what was found): one broken relation between fields.
Invariant = tuple[tuple[str | int, ...], str, object]


class _ReportModel(pydantic.BaseModel):
    """A part of the report: a field loom does not write is refused when
    the report is read back (no field was ever removed, so every schema
    version's reports read)."""

    model_config = pydantic.ConfigDict(extra="forbid")


class Parallel(_ReportModel):
    tp: Count
    pp: Count
    dp: Count
    cp: Count
    ep: Count
    etp: Count = pydantic.Field(default=1, description="expert tensor parallelism: each expert's weights split over etp ranks (schema 1.7)")
    vpp: Count
    micro_batch_size: Count
    global_batch_size: Count
    sequence_parallel: bool
    recompute: Recompute
    recompute_modules: list[str] = pydantic.Field(default_factory=list, description="selective: megatron-core's recompute_modules (empty: core_attn)")
    recompute_num_layers: Index = pydantic.Field(default=0, description="full: 0 every layer, N the first N layers of each model chunk (block)")
    zero_stage: Annotated[int, pydantic.Field(ge=0, le=3)]
    distributed_optimizer: bool
    fsdp: Index = pydantic.Field(default=0, description="sharded data parallelism: weights split over fsdp x cp ranks, replicated "
                                                        "over dp / fsdp (HSDP); 0 off")
    reshard_after_forward: bool = pydantic.Field(default=True, description="sharded weights gathered again for backward")
    optimizer_offload: bool = pydantic.Field(default=False, description="optimizer state and step on the host CPU")

    @property
    def world_size(self) -> int:
        """Ranks of the layout: tp x pp x dp x cp (EP regroups the same ranks)."""
        return self.tp * self.pp * self.dp * self.cp


class StageReport(_ReportModel):
    index: Index
    layers: Index = pydantic.Field(description="decoder layers (0: a stage of only the embedding or the LM head)")
    layer_ranges: list[tuple[Index, Index]] = pydantic.Field(description="[first, last) decoder layers of each model chunk")
    embedding: bool
    head: bool
    ranks: tuple[Index, Index] | None = pydantic.Field(default=None, description="[first, end) global ranks of the stage (schema 1.5)")
    device_group: list[Index] | None = pydantic.Field(default=None, description="global ranks of the stage, each (schema 1.0-1.4)")
    kernels_s: dict[Literal["gemm", "attention", "elementwise"], Amount] = pydantic.Field(
        default_factory=dict, description="one GPU of the stage, the whole step: its compute kernels' seconds by kind "
        "(forward, backward and recompute; what a profiler trace measures, loom compare)")

    @property
    def global_ranks(self) -> Sequence[int]:
        """The stage's global ranks, as either schema writes them."""
        return range(*self.ranks) if self.ranks is not None else self.device_group or []


class GPUSlot(_ReportModel):
    """Ranks rank .. rank + count - 1 on GPUs gpu .. gpu + count - 1 of one
    host: a placement is written as such runs, one per host under Megatron's
    order, so that 65,536 ranks take a few thousand entries."""

    rank: Index
    host: str = pydantic.Field(min_length=1)
    gpu: Index
    count: Count = pydantic.Field(default=1, description="consecutive ranks on consecutive GPUs of the host from (rank, gpu)")


def placement_runs(gpus: tuple[tuple[str, int], ...]) -> list[GPUSlot]:
    """``gpus[rank] = (host, GPU)`` as runs of consecutive ranks on
    consecutive GPUs of one host, in rank order."""
    runs: list[GPUSlot] = []
    for rank, (host, gpu) in enumerate(gpus):
        last = runs[-1] if runs else None
        if last is not None and last.host == host and last.gpu + last.count == gpu:
            last.count += 1
        else:
            runs.append(GPUSlot(rank=rank, host=host, gpu=gpu))
    return runs


class PlacementReport(_ReportModel):
    """What the rank placement solver did (planner/search/placement.py); absent on uniform clusters."""

    method: str = pydantic.Field(description="exact (one CP-SAT model) or decomposed (nodes, then GPUs)")
    status: str = pydantic.Field(description="optimal (proven), feasible (gap to the bound) or start kept (the time model found the solver's placement slower)")
    communication_s: Amount = pydantic.Field(description="the solver's objective on this placement")
    start_communication_s: Amount = pydantic.Field(description="on Megatron's default order")
    bound_s: Amount = pydantic.Field(description="no placement communicates less")
    gap: float
    start_step_time_s: Amount = pydantic.Field(description="predicted step time on the default order")


class SplitReport(_ReportModel):
    """What the pipeline split solver did for this plan's layout (solvers/partition.py); absent when none ran."""

    method: str = pydantic.Field(description="bottleneck, typed, interleaved (exact, milliseconds) or milp-highs / milp-cbc")
    status: str = pydantic.Field(description="optimal (proven), time_limit (its best split and bound when the limit struck) or infeasible")
    used: bool = pydantic.Field(description="the plan runs the solver's split (else the even split, which fits or simulates faster)")
    objective_s: Amount | None = pydantic.Field(description="the split's closed-form step time; null when no split was found")
    bound_s: Finite | None = pydantic.Field(description="no split makes the closed-form step shorter; null when none is known")
    gap: Finite | None = pydantic.Field(description="(objective - bound) / objective; null when no split was found")


class Predicted(_ReportModel):
    step_time_s: Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
    tokens_per_s: Amount
    tflops_per_gpu: Amount
    mfu: Amount
    breakdown_s: dict[str, Amount]


class Memory(_ReportModel):
    peak_bytes_per_gpu: Amount = pydantic.Field(description="the peak of the stage with the least headroom (relative to its GPU)")
    capacity_bytes: Annotated[int, pydantic.Field(gt=0)] = pydantic.Field(
        description="what PyTorch's allocator can hand out on the peak stage's GPU (torch total_memory)")
    headroom: Finite = pydantic.Field(description="fraction of capacity left free on the fullest stage")
    required_headroom_bytes: Amount = pydantic.Field(default=0.0, description="what the job's memory_headroom asks to leave free on that GPU")
    fits: bool = pydantic.Field(default=True, description="every stage's peak within its GPU's capacity")
    peak_stage: Index
    breakdown_bytes: dict[str, Amount] = pydantic.Field(description="of the peak stage")
    per_stage_peak_bytes: list[Amount]
    per_stage_capacity_bytes: list[Annotated[int, pydantic.Field(gt=0)]] | None = pydantic.Field(
        default=None, description="what PyTorch's allocator can hand out on each stage's GPU (schema 1.8; before, capacity_bytes for all)")

    def stage_capacity_bytes(self, stage: int) -> int:
        """Stage ``stage``'s GPU capacity (a report before 1.8: the peak stage's, for every stage)."""
        return self.per_stage_capacity_bytes[stage] if self.per_stage_capacity_bytes else self.capacity_bytes


class NearbyBatchReport(_ReportModel):
    global_batch_size: Count
    label: str = pydantic.Field(description="its best plan's layout")
    tokens_per_s: Amount
    gain: Finite = pydantic.Field(description="tokens per second over this report's best plan's, less 1")
    idle_gpus: Index = pydantic.Field(0, description="GPUs its best plan leaves idle (schema 1.6)")


class SearchInfo(_ReportModel):
    candidates: Index = pydantic.Field(description="layouts enumerated")
    feasible: Index = pydantic.Field(description="layouts that fit in memory")
    wall_time_s: Amount | None = pydantic.Field(
        description="null, so the same inputs give the same report (loom plan prints the search's wall time on stderr)")
    solver: str
    status: str
    gap: float
    nearby_global_batch_sizes: list[NearbyBatchReport] = pydantic.Field(
        default_factory=list, description="nearby global batch sizes whose best plan trains faster (schema 1.5)")


class ChunkCostReport(_ReportModel):
    forward_s: Amount
    backward_s: Amount
    weight_grad_s: Amount
    activation_bytes: Amount


class ScheduleReport(_ReportModel):
    """The simulated pipeline schedule and its inputs (``loom explain`` re-simulates them)."""

    name: Literal[SCHEDULES]
    microbatches: Count
    p2p_s: Amount
    dp_overlap: bool
    dp_reduce_s: list[Amount]
    optimizer_s: list[Amount]
    stages: list[list[ChunkCostReport]] = pydantic.Field(description="per stage, its chunks in virtual-stage order")
    peak_in_flight: list[Index]
    bubble_fraction: Finite

    def costs(self) -> PipelineCosts:
        """The simulator's inputs (seconds, bytes), as the plan was simulated."""
        return PipelineCosts(
            stages=tuple(tuple(ChunkCost(**chunk.model_dump()) for chunk in stage) for stage in self.stages),
            microbatches=self.microbatches,
            p2p_s=self.p2p_s,
            dp_reduce_s=tuple(self.dp_reduce_s),
            dp_overlap=self.dp_overlap,
            optimizer_s=tuple(self.optimizer_s),
        )


class PlanReport(_ReportModel):
    label: str
    parallel: Parallel
    moe_token_dispatcher: Literal["alltoall", "allgather", "deepep", "hybridep"] | None = pydantic.Field(
        default=None, description="MoE: the token dispatcher this plan runs (a search may try several); null for a dense model")
    stages: list[StageReport]
    placement: list[GPUSlot]
    placement_solver: PlacementReport | None = None
    idle_gpus: Index = pydantic.Field(default=0, description="GPUs of the cluster the plan leaves unused: whole nodes the search left idle, "
                                      "or what a fixed layout does not fill (schema 1.5)")
    split_solver: SplitReport | None = pydantic.Field(default=None, description="the pipeline split's solve (schema 1.5)")
    predicted: Predicted
    memory: Memory
    schedule: ScheduleReport
    sources: dict[str, Literal["measured", "interpolated", "estimated"]] = pydantic.Field(
        default_factory=dict, description="per layer kind: time and activations measured (--profile), interpolated between measured shapes, or estimated; "
        "gemm_efficiency; links (a links_profile or nccl_tests profile in the cluster file)")

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> PlanReport:
        _raise_broken("PlanReport", plan_problems(self))
        return self


class Report(_ReportModel):
    schema_version: Literal[READ_SCHEMA_VERSIONS] = pydantic.Field(description=f"loom writes {SCHEMA_VERSION}")
    model: str
    model_parameters: Count | None = pydantic.Field(default=None, description="the model's weights, every expert and both embeddings "
                                                   "(an untied output layer counted once more)")
    model_active_parameters: Count | None = pydantic.Field(
        default=None, description="the weights one token multiplies: model_parameters less the routed experts it is not sent to "
                                  "(the input embedding counted, as Qwen's and Phi's cards do)")
    cluster: str
    gpus: Count
    framework: Framework
    precision: Precision
    seq_length: Count
    plans: list[PlanReport] = pydantic.Field(json_schema_extra={"minItems": 1}, description="best first; at least one")
    search: SearchInfo
    profiles: list[str] = pydantic.Field(default_factory=list, description="the --profile files the plans used")
    warnings: list[str] = pydantic.Field(default_factory=list, description="what is legal in the job but probably not meant")
    stack: str = pydantic.Field(default="megatron-lm", description="the stack whose feature presets the job started from")
    features: dict[str, object] = pydantic.Field(default_factory=dict, description="the features the plans assumed, presets resolved")

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Report:
        _raise_broken("Report", report_problems(self))
        return self


def plan_problems(plan: PlanReport) -> list[Invariant]:
    """The relations between one plan's fields that the planner guarantees
    (specs/rules.py, specs/stages.py, Megatron's rank order), broken:
    ``(location, expected, found)`` each, locations relative to the plan.
    Later checks that need an earlier one to hold are skipped when it does not."""
    p, problems = plan.parallel, []
    stage_ranks = p.tp * p.cp * p.dp

    def need(ok: bool, loc: tuple, expected: str, got: object) -> bool:
        if not ok:
            problems.append((loc, expected, got))
        return ok

    need(stage_ranks % p.ep == 0, ("parallel", "ep"), f"a divisor of a stage's tp x cp x dp = {stage_ranks} ranks", p.ep)
    labelled = re.search(r"\bETP(\d+)\b", plan.label)
    need(int(labelled.group(1)) == p.etp if labelled else p.etp == 1, ("parallel", "etp"),
         f"{labelled.group(1) if labelled else 1}, as the label says (reports before schema 1.7 dropped etp: write the plan again)", p.etp)
    need(p.vpp == 1 or p.pp > 1, ("parallel", "vpp"), "1 unless pp > 1", p.vpp)
    need(p.fsdp == 0 or p.dp % p.fsdp == 0, ("parallel", "fsdp"), f"0 or a divisor of dp = {p.dp}", p.fsdp)
    per_step = p.micro_batch_size * p.dp
    if need(p.global_batch_size % per_step == 0, ("parallel", "global_batch_size"), f"a multiple of micro_batch_size x dp = {per_step}",
            p.global_batch_size):
        microbatches = p.global_batch_size // per_step
        need(plan.schedule.microbatches == microbatches, ("schedule", "microbatches"),
             f"global_batch_size / (micro_batch_size x dp) = {microbatches}", plan.schedule.microbatches)
    if need(len(plan.stages) == p.pp, ("stages",), f"{p.pp} stages (parallel.pp)", len(plan.stages)):
        _stage_problems(plan.stages, p, need)
    _placement_problems(plan.placement, p.world_size, need)
    schedule = plan.schedule
    if need(len(schedule.stages) == p.pp, ("schedule", "stages"), f"{p.pp} stages (parallel.pp)", len(schedule.stages)):
        for s, chunks in enumerate(schedule.stages):
            if need(len(chunks) == p.vpp, ("schedule", "stages", s), f"{p.vpp} chunks (parallel.vpp)", len(chunks)):
                for v, chunk in enumerate(chunks):
                    need(chunk.weight_grad_s <= chunk.backward_s, ("schedule", "stages", s, v, "weight_grad_s"),
                         f"at most backward_s = {chunk.backward_s} (it is a part of it)", chunk.weight_grad_s)
    for name in ("dp_reduce_s", "optimizer_s"):
        found = len(getattr(schedule, name))
        need(found in (0, p.pp), ("schedule", name), f"one entry per stage ({p.pp}) or none", found)
    need(len(schedule.peak_in_flight) == p.pp, ("schedule", "peak_in_flight"), f"one entry per stage ({p.pp})", len(schedule.peak_in_flight))
    need(any(c.forward_s + c.backward_s > 0 for chunks in schedule.stages for c in chunks), ("schedule", "stages"),
         "some chunk with compute time > 0", 0.0)
    predicted, memory = plan.predicted, plan.memory
    parts_s = sum(predicted.breakdown_s.values())
    need(math.isclose(parts_s, predicted.step_time_s, rel_tol=SUM_TOLERANCE), ("predicted", "step_time_s"),
         f"the sum of breakdown_s, {parts_s:.6g} s", predicted.step_time_s)
    need(predicted.mfu <= 1, ("predicted", "mfu"), "at most 1 (a fraction of peak)", predicted.mfu)
    parts_bytes = sum(memory.breakdown_bytes.values())
    need(math.isclose(parts_bytes, memory.peak_bytes_per_gpu, rel_tol=SUM_TOLERANCE), ("memory", "peak_bytes_per_gpu"),
         f"the sum of breakdown_bytes, {parts_bytes:.6g}", memory.peak_bytes_per_gpu)
    need(not memory.fits or memory.peak_bytes_per_gpu <= memory.capacity_bytes, ("memory", "fits"),
         f"false: peak_bytes_per_gpu is beyond capacity_bytes = {memory.capacity_bytes}", memory.fits)
    if need(len(memory.per_stage_peak_bytes) == p.pp, ("memory", "per_stage_peak_bytes"), f"one entry per stage ({p.pp})",
            len(memory.per_stage_peak_bytes)) and need(memory.peak_stage < p.pp, ("memory", "peak_stage"), f"a stage index below pp = {p.pp}",
                                                         memory.peak_stage):
        stage_peak = memory.per_stage_peak_bytes[memory.peak_stage]
        need(math.isclose(stage_peak, memory.peak_bytes_per_gpu, rel_tol=SUM_TOLERANCE), ("memory", "peak_bytes_per_gpu"),
             f"per_stage_peak_bytes[peak_stage], {stage_peak:.6g}", memory.peak_bytes_per_gpu)
        capacities = memory.per_stage_capacity_bytes
        if capacities is not None and need(len(capacities) == p.pp, ("memory", "per_stage_capacity_bytes"), f"one entry per stage ({p.pp})",
                                           len(capacities)):
            need(capacities[memory.peak_stage] == memory.capacity_bytes, ("memory", "capacity_bytes"),
                 f"per_stage_capacity_bytes[peak_stage], {capacities[memory.peak_stage]}", memory.capacity_bytes)
            beyond = [s for s, (peak, capacity) in enumerate(zip(memory.per_stage_peak_bytes, capacities)) if peak > capacity]
            need(not memory.fits or not beyond, ("memory", "fits"), f"false: stage {beyond[0] if beyond else 0}'s peak is beyond its "
                 "per_stage_capacity_bytes", memory.fits)
    return problems


def _stage_problems(stages: list[StageReport], p: Parallel, need) -> None:
    """Stage s is stage s, owns global ranks [s*n, (s+1)*n) (n = tp*cp*dp,
    Megatron's rank order), runs vpp model chunks whose layer ranges, taken
    in model-chunk order (chunk v*pp + s), tile the decoder layers from 0,
    and counts their layers."""
    n = p.tp * p.cp * p.dp
    shaped = True
    for s, stage in enumerate(stages):
        need(stage.index == s, ("stages", s, "index"), f"{s} (stages in pipeline order)", stage.index)
        expected = f"global ranks {s * n} to {(s + 1) * n - 1} (stage s of tp x cp x dp = {n} ranks)"
        need(stage.ranks is not None or stage.device_group is not None, ("stages", s, "ranks"), expected, None)
        if stage.ranks is not None:
            need(tuple(stage.ranks) == (s * n, (s + 1) * n), ("stages", s, "ranks"), expected, list(stage.ranks))
        if stage.device_group is not None:
            need(stage.device_group == list(range(s * n, (s + 1) * n)), ("stages", s, "device_group"), expected, stage.device_group)
        shaped &= need(len(stage.layer_ranges) == p.vpp, ("stages", s, "layer_ranges"), f"{p.vpp} model chunks (parallel.vpp)",
                       len(stage.layer_ranges))
        counted = sum(last - first for first, last in stage.layer_ranges)
        need(stage.layers == counted, ("stages", s, "layers"), f"the {counted} layers of its layer_ranges", stage.layers)
    if not shaped:
        return
    next_layer = 0
    for c in range(p.pp * p.vpp):
        s, v = c % p.pp, c // p.pp
        first, last = stages[s].layer_ranges[v]
        where = f"where model chunk {c - 1} ends" if c else "at layer 0"
        if not need(first == next_layer and last >= first, ("stages", s, "layer_ranges", v),
                    f"[{next_layer}, last) with last >= {next_layer}: model chunk {c} starts {where}", [first, last]):
            return
        next_layer = last
    need(next_layer >= 1, ("stages",), "at least one decoder layer", next_layer)


def _placement_problems(placement: list[GPUSlot], world_size: int, need) -> None:
    """Runs that give every rank one slot, in rank order, each on a GPU of its own."""
    slots = sum(run.count for run in placement)
    if not need(slots == world_size, ("placement",), f"{world_size} slots, one per rank (tp x pp x dp x cp)", slots):
        return
    owner: dict[tuple[str, int], int] = {}
    rank = 0
    for i, run in enumerate(placement):
        if not need(run.rank == rank, ("placement", i, "rank"), f"{rank} (runs in rank order)", run.rank):
            return
        for k in range(run.count):
            other = owner.setdefault((run.host, run.gpu + k), rank + k)
            if not need(other == rank + k, ("placement", i), f"a GPU of its own (rank {other} runs on {run.host} GPU {run.gpu + k})", run.gpu):
                return
        rank += run.count


def report_problems(report: Report) -> list[Invariant]:
    """What relates the plans to the report: there is one at least, each
    fits the cluster's GPUs, and all split the same model (the same number of
    decoder layers); the stack and the features are ones loom names."""
    problems, layers = [], [sum(stage.layers for stage in plan.stages) for plan in report.plans]
    if report.stack not in STACKS:
        problems.append((("stack",), f"one of {', '.join(STACKS)}", report.stack))
    unknown = [name for name in report.features if name not in Features.model_fields]
    problems += [(("features", name), f"a feature loom names ({', '.join(Features.model_fields)})", name) for name in unknown]
    if not unknown:
        try:
            Features.model_validate(report.features)
        except pydantic.ValidationError as error:
            problems += [(("features", *detail["loc"]), detail["msg"], detail.get("input")) for detail in error.errors()]
    if not report.plans:
        problems.append((("plans",), "at least one plan", []))
    for i, plan in enumerate(report.plans):
        if plan.parallel.world_size > report.gpus:
            problems.append((("plans", i, "parallel"), f"tp x pp x dp x cp at most the cluster's {report.gpus} GPUs", plan.parallel.world_size))
        if layers[i] != layers[0]:
            problems.append((("plans", i, "stages"), f"{layers[0]} decoder layers in all, as plans.0 has (one model)", layers[i]))
    return problems


def _raise_broken(title: str, problems: list[Invariant]) -> None:
    """Broken invariants as one pydantic ValidationError: pydantic prefixes
    each location with where the model sits in the report, and reports them
    beside the field errors of other models."""
    if problems:
        raise pydantic.ValidationError.from_exception_data(title, [
            InitErrorDetails(type=PydanticCustomError("invariant", "{expected}", {"expected": expected}), loc=loc, input=got)
            for loc, expected, got in problems
        ])


def read_report(path: Path) -> Report:
    """The report in ``path`` (a plan.json, or ``--json`` output), checked
    against the schema and the planner's invariants. Raises SpecError naming
    ``path`` and every wrong field (its dotted location, e.g.
    ``plans.0.parallel.tp``) with what was expected: a missing or unreadable
    file, bad JSON, an unknown schema_version, a value of the wrong type
    (no coercion: "32" is not 32), a field out of range (NaN, infinity,
    negative), fields that contradict each other."""
    return validate(Report, read_json(path, "plan.json"), str(path), strict=True)


def _kernels_s(plan: Plan, stage: int) -> dict[str, float]:
    """A stage's compute kernels by kind over the step (empty where the step was not simulated)."""
    if stage >= len(plan.step.stage_kernels):
        return {}
    kernels = plan.step.stage_kernels[stage]
    return {"gemm": kernels.gemm_s, "attention": kernels.attention_s, "elementwise": kernels.elementwise_s}


def plan_report(plan: Plan) -> PlanReport:
    peak = plan.peak_memory
    return PlanReport(
        label=plan.layout.label(),
        parallel=Parallel(**plan.layout.as_dict()),
        moe_token_dispatcher=plan.job.features.moe_token_dispatcher if plan.job.model.moe is not None else None,
        stages=[
            StageReport(
                index=stage.index,
                layers=stage.num_layers,
                layer_ranges=[(c.first_layer, c.first_layer + c.num_layers) for c in stage.chunks],
                embedding=stage.embedding,
                head=stage.head,
                ranks=(stage.ranks.start, stage.ranks.stop),
                kernels_s=_kernels_s(plan, stage.index),
            )
            for stage in plan.stages
        ],
        placement=placement_runs(plan.placement.gpus),
        placement_solver=_placement_report(plan),
        idle_gpus=plan.unused_gpus,
        split_solver=_split_report(plan),
        predicted=Predicted(
            step_time_s=plan.step_time_s,
            tokens_per_s=plan.tokens_per_s,
            tflops_per_gpu=plan.tflops_per_gpu,
            mfu=plan.mfu,
            breakdown_s=plan.step.breakdown_s,
        ),
        memory=Memory(
            peak_bytes_per_gpu=peak.peak_bytes,
            capacity_bytes=plan.capacity_bytes,
            headroom=plan.memory_headroom,
            required_headroom_bytes=plan.job.memory_headroom.of(plan.capacity_bytes),
            fits=plan.fits,
            peak_stage=peak.stage,
            breakdown_bytes=peak.breakdown_bytes,
            per_stage_peak_bytes=[stage.peak_bytes for stage in plan.memory],
            per_stage_capacity_bytes=list(plan.stage_capacity_bytes),
        ),
        schedule=_schedule_report(plan),
        sources={**sources(shape_of(plan.job, plan.layout), plan.job.cluster.slowest.gpu, plan.layout.recompute),
                 "links": "measured" if plan.job.cluster.fabric.measured else "estimated"},
    )


def _split_report(plan: Plan) -> SplitReport | None:
    solve = plan.split_solve
    if solve is None:
        return None
    found = bool(solve.chunk_sizes)
    return SplitReport(
        method=solve.method, status=solve.status, used=plan.runs_split,
        objective_s=solve.objective_s if found else None, bound_s=solve.bound_s if math.isfinite(solve.bound_s) else None,
        gap=solve.gap if found else None,
    )


def _placement_report(plan: Plan) -> PlacementReport | None:
    solve = plan.placement_solve
    if solve is None:
        return None
    return PlacementReport(
        method=solve.method, status=solve.status, communication_s=solve.communication_s, start_communication_s=solve.start_s,
        bound_s=solve.bound_s, gap=solve.gap, start_step_time_s=plan.start_step_time_s,
    )


def _schedule_report(plan: Plan) -> ScheduleReport:
    costs = plan.schedule_costs
    return ScheduleReport(
        name=plan.schedule,
        microbatches=costs.microbatches,
        p2p_s=costs.p2p_s,
        dp_overlap=costs.dp_overlap,
        dp_reduce_s=list(costs.dp_reduce_s),
        optimizer_s=list(costs.optimizer_s),
        stages=[[ChunkCostReport(**dataclasses.asdict(chunk)) for chunk in stage] for stage in costs.stages],
        peak_in_flight=list(plan.simulation.peak_in_flight),
        bubble_fraction=plan.simulation.bubble_fraction(),
    )


def build_report(plans: list[Plan], search: SearchInfo) -> Report:
    job = plans[0].job
    return Report(
        schema_version=SCHEMA_VERSION,
        model=job.model.name,
        model_parameters=job.model.total_params(),
        model_active_parameters=job.model.active_params(input_embedding=True),
        cluster=job.cluster.name,
        gpus=job.cluster.num_gpus + plans[0].idle_gpus,
        framework=job.framework,
        precision=job.precision,
        seq_length=job.seq_length,
        plans=[plan_report(plan) for plan in plans],
        search=search,
        profiles=list(job.profiles),
        warnings=job_warnings(job),
        stack=job.stack,
        features=job.features.model_dump(),
    )


def report_json(report: Report) -> str:
    """The report as loom writes it: stages name their ranks as a range."""
    return report.model_dump_json(indent=2, exclude={"plans": {"__all__": {"stages": {"__all__": {"device_group"}}}}}) + "\n"


def json_schema() -> str:
    return json.dumps(Report.model_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(json_schema())
