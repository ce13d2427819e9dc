"""Placing a plan's ranks on the cluster's GPUs, by measured or modelled links.

The solver (solvers/placement.py) sees plain numbers: the pair bandwidths of
the cluster graph (planner/specs/topology.py), Megatron's groups and how many bytes
each GPU moves over each kind of group in a step. Those volumes come from the
time model itself: a kind's communication time before overlap, on the link it
has now, times that link's bandwidth (latency counts as bytes at that speed). The re-placed plan
is then priced again by the whole time model, so what the table reports as
saved is step time, not the solver's proxy.

Ranks stay in blocks of ``gpus_per_node`` consecutive ranks per host, so one
torchrun per node (host order + ``CUDA_VISIBLE_DEVICES``) realises every
placement loom proposes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from loom.planner.plan import Plan, build_plan
from loom.planner.specs.stages import Placement, stage_gpus
from loom.planner.cost.network import Links
from loom.planner.cost.time_model import step_parts
from loom.planner.specs.layout import neighbour_pairs, rank_groups
from loom.solvers.placement import GroupKind, PlacementProblem, solve

# Per plan; CP-SAT's deterministic time, roughly seconds on one core.
PLACEMENT_TIME_LIMIT_S = 10.0


def placement_problem(plan: Plan) -> PlacementProblem:
    job, layout, placement = plan.job, plan.layout, plan.placement
    topology = job.cluster.topology
    parts = step_parts(job, layout, list(plan.stages), stage_gpus(job.cluster, placement, list(plan.stages)), placement)
    links = Links.of(job, layout, placement)
    m = layout.num_microbatches
    busy_s = {
        "tp": (m * max(sum(c.tp_busy_s for c in chunks) for chunks in parts.chunks), links.tp),
        "cp": (m * max(sum(c.cp_busy_s for c in chunks) for chunks in parts.chunks), links.cp),
        "dp-cp": (max(d.reduce_s + d.gather_s for d in parts.dp), links.dp),
        # Every micro batch crosses every boundary forward and backward, once per virtual stage.
        "pp": (2 * m * layout.vpp * parts.p2p_one_s, links.pp),
        "embedding": (parts.embedding_sync_s, links.embedding),
        # MoE token all-to-alls. The solver prices every kind as a ring (k times
        # the slowest pair across nodes); an all-to-all gets no k-fold channels,
        # so this term is smaller than the time model's, but it falls and rises
        # with the same links.
        "ep": (m * max(sum(c.ep_comm_s for c in chunks) for chunks in parts.chunks), links.ep),
    }
    groups = rank_groups(layout)
    groups["pp"] = neighbour_pairs(groups["pp"])
    kinds = tuple(
        GroupKind(name, seconds * link.bandwidth_GBps, groups[name])
        for name, (seconds, link) in busy_s.items()
        if seconds > 0 and math.isfinite(link.bandwidth_GBps)
    )
    gpu_types = sorted({node.gpu.kind for node in job.cluster.nodes})
    return PlacementProblem(
        bandwidth_GBps=topology.bandwidth_GBps,
        host_of_slot=topology.host_of_slot,
        kinds=kinds,
        block_size=job.cluster.gpus_per_node,
        start=topology.slots(placement.gpus),
        host_type=np.array([gpu_types.index(node.gpu.kind) for node in job.cluster.nodes]),
        # DeepSpeed's runner starts a host's ranks on its GPUs in ascending
        # order; other orders need the gpu_order.py wrapper, so whole nodes move only.
        reorder_gpus=job.framework != "deepspeed",
    )


def can_place(plan: Plan) -> bool:
    """Placement matters only where links differ, and loom moves whole nodes."""
    cluster = plan.job.cluster
    return not cluster.uniform and plan.layout.world_size % cluster.gpus_per_node == 0


def place(plan: Plan, time_limit_s: float = PLACEMENT_TIME_LIMIT_S) -> Plan:
    """``plan`` on the placement the solver finds, priced again, with the
    solve attached (``plan.placement_solve``). Kept as it was when the whole
    time model finds the new placement slower."""
    if not can_place(plan):
        return plan
    solution = solve(placement_problem(plan), time_limit_s)
    topology = plan.job.cluster.topology
    placement = Placement(gpus=tuple(topology.gpus[slot] for slot in solution.slot_of_rank))
    placed = build_plan(plan.job, plan.layout, list(plan.stages), placement, plan.pp_comm_told)
    if placed.step_time_s > plan.step_time_s:
        # Less communication, yet a slower step (what overlap hides differs
        # from the solver's volumes): keep the start and say so.
        placed = plan
        solution = dataclasses.replace(solution, slot_of_rank=placement_problem(plan).start, communication_s=solution.start_s, status="start kept")
    return dataclasses.replace(placed, placement_solve=solution, start_step_time_s=plan.step_time_s, split_solve=plan.split_solve,
                               idle_gpus=plan.idle_gpus)
