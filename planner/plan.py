"""A plan: one layout of one job, with its stages, placement, predicted step
time and per-stage memory — and ``evaluate``, which makes one."""

from __future__ import annotations

from dataclasses import dataclass, replace

from loom.planner.cost.compute import model_flops_per_token
from loom.planner.cost.layers import shape_of
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.rules import layout_problems
from loom.planner.cost.memory import StageMemory, stage_memory
from loom.planner.specs.stages import Placement, Stage, default_placement, default_stages, stage_gpus
from loom.planner.cost.simulated_step import simulated_step, with_send_recv
from loom.planner.schedule.simulate import PipelineCosts, Simulation
from loom.planner.cost.time_model import StepTime, step_parts
from loom.solvers.partition import Partition
from loom.solvers.placement import PlacementSolution


@dataclass(frozen=True)
class Plan:
    job: Job
    layout: Layout
    stages: tuple[Stage, ...]
    placement: Placement
    step: StepTime
    memory: tuple[StageMemory, ...]
    stage_capacity_bytes: tuple[int, ...]  # memory of each stage's GPUs (clusters may mix GPU types)
    schedule: str  # the pipeline schedule simulated: "1f1b" | "interleaved"
    schedule_costs: PipelineCosts  # what was simulated, so ``loom explain`` can draw it
    simulation: Simulation
    placement_solve: PlacementSolution | None = None  # when the placement solver ran (planner/search/placement.py)
    start_step_time_s: float | None = None  # the step time on the placement it started from
    idle_gpus: int = 0  # GPUs of the cluster the plan leaves idle: its slowest nodes, whole (search/alternatives.py)
    split_solve: Partition | None = None  # when a split solver ran for this layout (search/split.py)
    # Whether step.breakdown_s tells the pipeline's exposed send/recv from its
    # bubble (a second simulation: build_plan's send_recv; with_pp_comm).
    pp_comm_told: bool = True

    @property
    def even_stages(self) -> tuple[Stage, ...]:
        """The split this plan's framework runs by default (default_stages)."""
        return tuple(default_stages(self.job.model, self.layout, self.job.framework))

    @property
    def runs_split(self) -> bool:
        """The plan runs the split solver's split (else the even one, which
        fit where the solver's did not, or simulated faster)."""
        return self.split_solve is not None and bool(self.split_solve.chunk_sizes) and tuple(self.stages) != self.even_stages

    @property
    def unused_gpus(self) -> int:
        """GPUs of the whole cluster the plan does not run on: its idle
        nodes, and those a layout evaluated as given does not fill."""
        return self.job.cluster.num_gpus + self.idle_gpus - self.layout.world_size

    @property
    def step_time_s(self) -> float:
        return self.step.step_time_s

    @property
    def tokens_per_s(self) -> float:
        return self.layout.global_batch_size * self.job.seq_length / self.step_time_s

    @property
    def tflops_per_gpu(self) -> float:
        """Model FLOPs (no recompute counted, dropped tokens' experts not)
        per second per GPU, in TFLOP/s."""
        per_token = model_flops_per_token(self.job.model, self.job.seq_length, self.job.features.moe_expert_capacity_factor)
        flops = per_token * self.layout.global_batch_size * self.job.seq_length
        return flops / self.step_time_s / self.layout.world_size / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation against the dense peak of the job's precision,
        averaged over the GPUs the plan uses."""
        cluster, used = self.job.cluster, self.layout.world_size
        nodes = cluster.nodes[: -(-used // cluster.gpus_per_node)]
        peak = sum(node.gpu.peak_flops(self.job.precision) for node in nodes) / len(nodes)
        return self.tflops_per_gpu * 1e12 / peak

    def _headroom(self, stage: int) -> float:
        return 1.0 - self.memory[stage].peak_bytes / self.stage_capacity_bytes[stage]

    @property
    def peak_memory(self) -> StageMemory:
        """The stage with the least headroom (the fullest, relative to its GPU)."""
        return self.memory[min(range(len(self.memory)), key=self._headroom)]

    @property
    def capacity_bytes(self) -> int:
        return self.stage_capacity_bytes[self.peak_memory.stage]

    @property
    def memory_headroom(self) -> float:
        """Fraction of GPU memory left free on the fullest stage."""
        return min(self._headroom(s) for s in range(len(self.memory)))

    @property
    def fits(self) -> bool:
        """Every stage's peak within what its GPUs' allocator can hand out."""
        return self.memory_headroom >= 0.0

    @property
    def leaves_headroom(self) -> bool:
        """Every stage leaves the job's ``memory_headroom`` free: what the
        search recommends."""
        return all(
            memory.peak_bytes <= self.job.memory_headroom.usable(capacity)
            for memory, capacity in zip(self.memory, self.stage_capacity_bytes)
        )


def evaluate(job: Job, layout: Layout, source: str = "layout") -> Plan:
    """Predict step time and memory of one fixed layout (``loom evaluate``)."""
    problems = layout_problems(job, layout)
    if problems:
        raise SpecError.of(source, problems)
    return build_plan(job, layout)


def build_plan(job: Job, layout: Layout, stages: list[Stage] | None = None, placement: Placement | None = None,
               send_recv: bool = True) -> Plan:
    """The plan of a valid layout with the given stages and placement
    (default: the framework's default split, Megatron's rank order on the nodes in order);
    without ``send_recv`` its bubble holds the send/recv time the pipeline
    exposes (simulated_step: one simulation, not two; with_pp_comm tells
    them apart later), the step time the same."""
    stages = stages or default_stages(job.model, layout, job.framework)
    placement = placement or default_placement(job.cluster, layout.world_size)
    gpus = stage_gpus(job.cluster, placement, stages)
    shape = shape_of(job, layout)
    simulated = simulated_step(step_parts(job, layout, stages, gpus, placement), stages, send_recv=send_recv)
    return Plan(
        job=job,
        layout=layout,
        stages=tuple(stages),
        placement=placement,
        step=simulated.step,
        memory=tuple(stage_memory(shape, layout, stage, job.framework, gpu) for stage, gpu in zip(stages, gpus)),
        stage_capacity_bytes=tuple(gpu.memory_bytes for gpu in gpus),
        schedule=simulated.simulation.schedule,
        schedule_costs=simulated.costs,
        simulation=simulated.simulation,
        pp_comm_told=send_recv,
    )


def with_pp_comm(plan: Plan) -> Plan:
    """``plan`` with its pipeline's exposed send/recv told apart from its
    bubble, if build_plan left them together."""
    if plan.pp_comm_told:
        return plan
    return replace(plan, step=with_send_recv(plan.step, plan.schedule_costs, plan.simulation), pp_comm_told=True)
