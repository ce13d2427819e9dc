"""A step put together by simulating the pipeline schedule Megatron runs
(``planner/schedule/simulate.py``), from the same priced parts as the closed form.

The closed form is exact only for equal stages with free communication; the
simulator follows each stage's op order, the send/recv latency on every
dependency, and the gradient reduce overlapping the last backward. The search
prunes with the closed form and ranks its best candidates with this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loom.planner.cost.layers import shape_of
from loom.planner.cost.memory import chunk_activation_bytes
from loom.planner.schedule.simulate import ChunkCost, PipelineCosts, Simulation, megatron_schedule, pipeline_floor_s, simulate_long
from loom.planner.specs.stages import Stage
from loom.planner.cost.time_model import StepParts, StepTime, closed_form_step, hideable_s, pipeline_term_s, reduce_overlaps_backward


def pipeline_costs(parts: StepParts, stages: list[Stage]) -> PipelineCosts:
    """The simulator's inputs: per chunk forward, backward (with its share of
    sharded data parallelism's per-micro-batch communication), weight gradient and activations."""
    job, layout = parts.job, parts.layout
    shape = shape_of(job, layout)
    return PipelineCosts(
        stages=tuple(
            tuple(
                ChunkCost(
                    forward_s=cost.forward_s,
                    backward_s=cost.backward_s + (zero.microbatch_s + zero.contention_microbatch_s + offload_s) / len(stage.chunks),
                    weight_grad_s=cost.weight_grad_s,
                    activation_bytes=chunk_activation_bytes(shape, layout, chunk),
                )
                for chunk, cost in zip(stage.chunks, costs)
            )
            for stage, costs, zero, offload_s in zip(stages, parts.chunks, parts.sharded, parts.offload_s)
        ),
        microbatches=layout.num_microbatches,
        p2p_s=parts.p2p_one_s,
        dp_reduce_s=tuple(d.reduce_s for d in parts.dp),
        dp_overlap=reduce_overlaps_backward(job, layout),
        optimizer_s=tuple(parts.optimizer_s),
    )


def step_floor_s(parts: StepParts, stages: list[Stage]) -> float:
    """Seconds simulated_step cannot come out below for these parts and
    stages (under Megatron's schedules), at a part of simulating them: the
    closed form with its pipeline term replaced by pipeline_floor_s, less
    what the simulation may hide behind other stages' work (hideable_s),
    plus the least optimizer step of any stage (the last stage to finish
    its pipeline work steps after it)."""
    timing, costs = closed_form_step(parts), pipeline_costs(parts, stages)
    stage_s = [sum(chunk.forward_s + chunk.backward_s for chunk in chunks) for chunks in costs.stages]
    first_chunk_s = [chunks[0].forward_s + chunks[0].backward_s for chunks in costs.stages]
    floor_s = pipeline_floor_s(stage_s, first_chunk_s, costs.microbatches)
    closed_s = pipeline_term_s(parts.tau_s, parts.layout)
    return timing.step_time_s - hideable_s(timing) + min(parts.optimizer_s) - max(0.0, closed_s - floor_s)


def send_recv_exposed_s(costs: PipelineCosts, simulation: Simulation) -> float:
    """What send/recv add to the simulated pipeline: the schedule simulated
    again with free transfers is that much shorter."""
    if costs.p2p_s <= 0 or len(costs.stages) == 1:
        return 0.0
    return max(0.0, simulation.pipeline_time_s - simulate_long(replace(costs, p2p_s=0.0), simulation.schedule).pipeline_time_s)


def with_send_recv(step: StepTime, costs: PipelineCosts, simulation: Simulation) -> StepTime:
    """``step``, simulated with ``send_recv`` False, with the send/recv time
    its pipeline exposes moved from ``pipeline_bubble`` to ``pp_comm``, as
    simulated_step puts it (StepParts.breakdown_s); the step time is the same."""
    breakdown = dict(step.breakdown_s)
    moved = min(send_recv_exposed_s(costs, simulation), breakdown["pipeline_bubble"])
    breakdown["pp_comm"], breakdown["pipeline_bubble"] = moved, breakdown["pipeline_bubble"] - moved
    return replace(step, breakdown_s=breakdown)


@dataclass(frozen=True)
class SimulatedStep:
    step: StepTime
    simulation: Simulation
    costs: PipelineCosts


def simulated_step(parts: StepParts, stages: list[Stage], schedule: str | None = None, send_recv: bool = True) -> SimulatedStep:
    """The step by simulation: the pipeline, the exposed reduce and the
    optimizer from the simulated schedule; the parameter gather and the
    embedding sync, which follow it, added. The send/recv time the pipeline
    exposes (``pp_comm``) is told apart from its bubble by a second
    simulation (send_recv_exposed_s), unless ``send_recv`` is False: then
    the bubble holds it, and the step time is the same."""
    costs = pipeline_costs(parts, stages)
    name = schedule or megatron_schedule(parts.layout.vpp)
    simulation = simulate_long(costs, name)  # explain simulates the plan's costs again to draw it
    after_pipeline = simulation.step_time_s - simulation.pipeline_time_s
    # What rounding leaves of a reduce that ends within the optimizer is none.
    reduce_s = after_pipeline - max(parts.optimizer_s)
    breakdown = parts.breakdown_s(simulation.pipeline_time_s, reduce_s if reduce_s > 1e-12 * simulation.step_time_s else 0.0,
                                  send_recv_exposed_s(costs, simulation) if send_recv else 0.0)
    # The optimizer of the last stage to finish may overlap others' reduces:
    # keep the breakdown summing to the simulated step.
    breakdown["optimizer"] = min(breakdown["optimizer"], after_pipeline)
    step = StepTime(step_time_s=sum(breakdown.values()), breakdown_s=breakdown, stage_microbatch_s=tuple(parts.tau_s),
                    stage_kernels=parts.stage_kernels, stage_tp_busy_s=parts.stage_tp_busy_s)
    return SimulatedStep(step=step, simulation=simulation, costs=costs)
