"""The JSON report (``--json`` on stdout, ``plan.json`` under ``--out``).

Its shape is the contract in ARCHITECTURE.md; these pydantic models are its
single definition, and ``plan.schema.json`` beside this file is generated from
them (``python -m loom.planner.output.report`` rewrites it; a test keeps it in sync).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import pydantic

from loom.planner.cost.layers import shape_of, sources
from loom.planner.plan import Plan
from loom.planner.specs.job import job_warnings
from loom.planner.schedule.simulate import ChunkCost, PipelineCosts

SCHEMA_VERSION = "1.1"
SCHEMA_FILE = Path(__file__).with_name("plan.schema.json")


class Parallel(pydantic.BaseModel):
    tp: int
    pp: int
    dp: int
    cp: int
    ep: int
    vpp: int
    micro_batch_size: int
    global_batch_size: int
    sequence_parallel: bool
    recompute: str
    recompute_modules: list[str] = pydantic.Field(default_factory=list, description="selective: megatron-core's recompute_modules (empty: core_attn)")
    recompute_num_layers: int = pydantic.Field(default=0, description="full: 0 every layer, N the first N layers of each model chunk (block)")
    zero_stage: int
    distributed_optimizer: bool


class StageReport(pydantic.BaseModel):
    index: int
    layers: int
    layer_ranges: list[tuple[int, int]] = pydantic.Field(description="[first, last) decoder layers of each model chunk")
    embedding: bool
    head: bool
    device_group: list[int] = pydantic.Field(description="global ranks of the stage")


class GPUSlot(pydantic.BaseModel):
    rank: int
    host: str
    gpu: int


class PlacementReport(pydantic.BaseModel):
    """What the rank placement solver did (planner/search/placement.py); absent on uniform clusters."""

    method: str = pydantic.Field(description="exact (one CP-SAT model) or decomposed (nodes, then GPUs)")
    status: str = pydantic.Field(description="optimal (proven), feasible (gap to the bound) or start kept (the time model found the solver's placement slower)")
    communication_s: float = pydantic.Field(description="the solver's objective on this placement")
    start_communication_s: float = pydantic.Field(description="on Megatron's default order")
    bound_s: float = pydantic.Field(description="no placement communicates less")
    gap: float
    start_step_time_s: float = pydantic.Field(description="predicted step time on the default order")


class Predicted(pydantic.BaseModel):
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float
    breakdown_s: dict[str, float]


class Memory(pydantic.BaseModel):
    peak_bytes_per_gpu: float = pydantic.Field(description="the peak of the stage with the least headroom (relative to its GPU)")
    capacity_bytes: int = pydantic.Field(description="what PyTorch's allocator can hand out on the peak stage's GPU (torch total_memory)")
    headroom: float = pydantic.Field(description="fraction of capacity left free on the fullest stage")
    required_headroom_bytes: float = pydantic.Field(default=0.0, description="what the job's memory_headroom asks to leave free on that GPU")
    fits: bool = pydantic.Field(default=True, description="every stage's peak within its GPU's capacity")
    peak_stage: int
    breakdown_bytes: dict[str, float] = pydantic.Field(description="of the peak stage")
    per_stage_peak_bytes: list[float]


class SearchInfo(pydantic.BaseModel):
    candidates: int = pydantic.Field(description="layouts enumerated")
    feasible: int = pydantic.Field(description="layouts that fit in memory")
    wall_time_s: float | None = pydantic.Field(description="null in plan.json, so the same inputs give the same files")
    solver: str
    status: str
    gap: float


class ChunkCostReport(pydantic.BaseModel):
    forward_s: float
    backward_s: float
    weight_grad_s: float
    activation_bytes: float


class ScheduleReport(pydantic.BaseModel):
    """The simulated pipeline schedule and its inputs (``loom explain`` re-simulates them)."""

    name: str
    microbatches: int
    p2p_s: float
    dp_overlap: bool
    dp_reduce_s: list[float]
    optimizer_s: list[float]
    stages: list[list[ChunkCostReport]] = pydantic.Field(description="per stage, its chunks in virtual-stage order")
    peak_in_flight: list[int]
    bubble_fraction: float

    def costs(self) -> PipelineCosts:
        return PipelineCosts(
            stages=tuple(tuple(ChunkCost(**chunk.model_dump()) for chunk in stage) for stage in self.stages),
            microbatches=self.microbatches,
            p2p_s=self.p2p_s,
            dp_reduce_s=tuple(self.dp_reduce_s),
            dp_overlap=self.dp_overlap,
            optimizer_s=tuple(self.optimizer_s),
        )


class PlanReport(pydantic.BaseModel):
    label: str
    parallel: Parallel
    stages: list[StageReport]
    placement: list[GPUSlot]
    placement_solver: PlacementReport | None = None
    predicted: Predicted
    memory: Memory
    schedule: ScheduleReport
    sources: dict[str, Literal["measured", "interpolated", "estimated"]] = pydantic.Field(
        default_factory=dict, description="per layer kind: time and activations measured (--profile), interpolated between measured shapes, or estimated; "
        "gemm_efficiency; links (a links_profile or nccl_tests profile in the cluster file)")


class Report(pydantic.BaseModel):
    schema_version: str
    model: str
    cluster: str
    gpus: int
    framework: str
    precision: str
    seq_length: int
    plans: list[PlanReport]
    search: SearchInfo
    profiles: list[str] = pydantic.Field(default_factory=list, description="the --profile files the plans used")
    warnings: list[str] = pydantic.Field(default_factory=list, description="what is legal in the job but probably not meant")
    stack: str = pydantic.Field(default="megatron-lm", description="the stack whose feature presets the job started from")
    features: dict[str, object] = pydantic.Field(default_factory=dict, description="the features the plans assumed, presets resolved")


def plan_report(plan: Plan) -> PlanReport:
    peak = plan.peak_memory
    return PlanReport(
        label=plan.layout.label(),
        parallel=Parallel(**plan.layout.as_dict()),
        stages=[
            StageReport(
                index=stage.index,
                layers=stage.num_layers,
                layer_ranges=[(c.first_layer, c.first_layer + c.num_layers) for c in stage.chunks],
                embedding=stage.embedding,
                head=stage.head,
                device_group=list(stage.ranks),
            )
            for stage in plan.stages
        ],
        placement=[GPUSlot(rank=r, host=host, gpu=gpu) for r, (host, gpu) in enumerate(plan.placement.gpus)],
        placement_solver=_placement_report(plan),
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
        ),
        schedule=_schedule_report(plan),
        sources={**sources(shape_of(plan.job, plan.layout), plan.job.cluster.slowest.gpu, plan.layout.recompute),
                 "links": "measured" if plan.job.cluster.fabric.measured else "estimated"},
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
        cluster=job.cluster.name,
        gpus=job.cluster.num_gpus,
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
    return report.model_dump_json(indent=2) + "\n"


def json_schema() -> str:
    return json.dumps(Report.model_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(json_schema())
