"""A plan: one layout of one job, with its stages, placement, predicted step
time and per-stage memory — and ``evaluate``, which makes one."""

from __future__ import annotations

from dataclasses import dataclass

from loom.planner.compute import Shape, model_flops_per_token
from loom.planner.errors import SpecError
from loom.planner.job import Job
from loom.planner.layout import Layout
from loom.planner.memory import StageMemory, stage_memory
from loom.planner.stages import Placement, Stage, default_placement, stage_gpus, uniform_stages
from loom.planner.schedule import simulated_step
from loom.planner.simulate import PipelineCosts, Simulation
from loom.planner.time_model import StepTime, step_parts
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
    placement_solve: PlacementSolution | None = None  # when the placement solver ran (planner/placement.py)
    start_step_time_s: float | None = None  # the step time on the placement it started from

    @property
    def step_time_s(self) -> float:
        return self.step.step_time_s

    @property
    def tokens_per_s(self) -> float:
        return self.layout.global_batch_size * self.job.seq_length / self.step_time_s

    @property
    def tflops_per_gpu(self) -> float:
        """Model FLOPs (no recompute counted) per second per GPU, in TFLOP/s."""
        flops = model_flops_per_token(self.job.model, self.job.seq_length) * self.layout.global_batch_size * self.job.seq_length
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
        return self.memory_headroom >= 0.0


def layout_problems(job: Job, layout: Layout) -> list[tuple[str, str, object]]:
    """Why ``layout`` cannot run ``job``: (field, expected, got) per problem."""
    model, problems = job.model, []

    def need(ok: bool, field: str, expected: str, got: object) -> None:
        if not ok:
            problems.append((field, expected, got))

    need(layout.world_size <= job.cluster.num_gpus, "tp*pp*dp*cp", f"at most the cluster's {job.cluster.num_gpus} GPUs", layout.world_size)
    if model.moe is None:
        need(layout.ep == 1 and layout.etp == 1, "ep", "1 (expert parallelism needs an MoE model)", layout.ep)
    else:
        need(model.moe.num_experts % layout.ep == 0, "ep", f"a divisor of {model.moe.num_experts} experts", layout.ep)
        need(model.moe.expert_ffn_hidden_size % layout.etp == 0, "etp", f"a divisor of the expert width {model.moe.expert_ffn_hidden_size}", layout.etp)
        stage_ranks = layout.tp * layout.cp * layout.dp
        need(stage_ranks % (layout.ep * layout.etp) == 0, "ep", f"ep x etp dividing a stage's tp x cp x dp = {stage_ranks} ranks", layout.ep * layout.etp)
        need(layout.tp == 1 or layout.sequence_parallel, "sequence_parallel", "on with tp > 1 for MoE (Megatron requires it)", layout.sequence_parallel)
    need(model.num_attention_heads % layout.tp == 0, "tp", f"a divisor of {model.num_attention_heads} attention heads", layout.tp)
    need(model.num_query_groups % layout.tp == 0, "tp", f"a divisor of {model.num_query_groups} key/value heads", layout.tp)
    chunks = layout.pp * layout.vpp
    if job.framework == "megatron":  # uneven splits via --pipeline-model-parallel-layout
        need(chunks <= model.num_layers, "pp*vpp", f"at most {model.num_layers} layers (one per model chunk)", chunks)
    else:  # DeepSpeed's PipelineModule balances layer counts: an even split only
        need(model.num_layers % chunks == 0, "pp*vpp", f"a divisor of {model.num_layers} layers", chunks)
    per_step = layout.micro_batch_size * layout.dp
    need(layout.global_batch_size % per_step == 0, "global_batch_size", f"a multiple of micro batch x dp = {per_step}", layout.global_batch_size)
    need(job.seq_length % (2 * layout.cp) == 0, "cp", f"2*cp dividing the sequence length {job.seq_length}", layout.cp)
    need(not layout.sequence_parallel or layout.tp > 1, "sequence_parallel", "only with tp > 1", layout.sequence_parallel)
    need(layout.vpp == 1 or layout.pp > 1, "vpp", "1 unless pp > 1", layout.vpp)
    need(layout.cp == 1 or job.features.flash_attention, "cp", "1 without flash attention (Megatron's CP needs it)", layout.cp)
    if layout.vpp > 1 and layout.global_batch_size % per_step == 0:
        need(layout.num_microbatches % layout.pp == 0, "vpp", f"interleaving needs micro batches ({layout.num_microbatches}) divisible by pp", layout.vpp)
    if job.framework == "megatron":
        need(layout.zero_stage == 0, "zero_stage", "0 with Megatron (use distributed_optimizer)", layout.zero_stage)
    else:
        need(layout.tp == 1 and layout.cp == 1, "tp", "1 with DeepSpeed (ZeRO data parallel + optional pipeline)", layout.tp)
        need(not layout.distributed_optimizer, "distributed_optimizer", "false with DeepSpeed (use zero_stage)", True)
        need(layout.recompute != "selective", "recompute", "none or full with DeepSpeed", layout.recompute)
        need(layout.pp == 1 or layout.zero_stage <= 1, "zero_stage", "0 or 1 with a DeepSpeed pipeline", layout.zero_stage)
        need(layout.vpp == 1, "vpp", "1 with DeepSpeed (PipelineModule has no interleaved schedule)", layout.vpp)
        need(model.moe is None or layout.zero_stage <= 2, "zero_stage", "at most 2 for DeepSpeed MoE (ZeRO-3 does not shard experts)", layout.zero_stage)
    return problems


def evaluate(job: Job, layout: Layout, source: str = "layout") -> Plan:
    """Predict step time and memory of one fixed layout (``loom evaluate``)."""
    problems = layout_problems(job, layout)
    if problems:
        raise SpecError(source, *problems[0])
    return build_plan(job, layout)


def build_plan(job: Job, layout: Layout, stages: list[Stage] | None = None, placement: Placement | None = None) -> Plan:
    """The plan of a valid layout with the given stages and placement
    (default: the even split, Megatron's rank order on the nodes in order)."""
    stages = stages or uniform_stages(job.model, layout)
    placement = placement or default_placement(job.cluster, layout.world_size)
    gpus = stage_gpus(job.cluster, placement, stages)
    shape = Shape.for_job(job, layout)
    simulated = simulated_step(step_parts(job, layout, stages, gpus, placement), stages)
    in_flight = simulated.simulation.peak_in_flight
    return Plan(
        job=job,
        layout=layout,
        stages=tuple(stages),
        placement=placement,
        step=simulated.step,
        memory=tuple(stage_memory(shape, layout, stage, job.framework, in_flight[stage.index]) for stage in stages),
        stage_capacity_bytes=tuple(gpu.memory_bytes for gpu in gpus),
        schedule=simulated.simulation.schedule,
        schedule_costs=simulated.costs,
        simulation=simulated.simulation,
    )
