"""The pipeline split as an integer program: from a layout to the plain
numbers of ``loom.solvers.partition`` and back to stages and a placement.

The layer list is the model in order: the embedding, each decoder layer, the
LM head with its loss. Each entry carries what it costs on one micro batch
(forward, backward with recompute, exposed TP/CP communication — priced by the
time model) and what it puts in memory (weights, gradients and optimizer
state; activations per micro batch in flight — from the memory model). A
chunk may hold the embedding or the head alone: Megatron's pipeline layout
expresses that (``E|tttt|...``).

On a cluster that mixes GPU types, the device groups (blocks of tp*cp*dp
consecutive GPUs in node order) differ in speed and memory, and the solver
also chooses which group runs which pipeline position.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.planner.cost.activations import head_transient
from loom.planner.cost.layers import embedding_activation_bytes, head_activation_bytes, layer_activation_bytes, shape_of
from loom.planner.specs.job import Job
from loom.planner.specs.layout import DEFAULT_RECOMPUTE_MODULES, Layout
from loom.planner.cost.memory import ALLOCATOR_SLACK_FRACTION, StateBytes, in_flight_chunks, model_state_bytes, runtime_bytes, stage_params
from loom.planner.specs.stages import Chunk, Placement, Stage, default_placement, split_stages, stage_block_placement
from loom.planner.cost.network import Links
from loom.planner.cost.time_model import chunk_time
from loom.profiles.catalogue import GPU
from loom.solvers.partition import Layer, Partition, PartitionProblem, StageDevice, auto_method, solve_partition


@dataclass(frozen=True)
class Split:
    stages: list[Stage]  # empty when the solver found no split (solution says why)
    placement: Placement
    solution: Partition


def _piece_state_bytes(job: Job, layout: Layout, chunk: Chunk, gpu: GPU) -> float:
    """Weights, fp8 copies, gradients and optimizer state of one piece (a
    one-layer, embedding-only or head-only chunk) on one GPU."""
    piece = Stage(index=0, chunks=(chunk,), ranks=range(1))
    state = StateBytes.of(job.framework, job.precision, job.features, gpu, layout.distributed_optimizer, layout.zero_stage, layout.fsdp)
    return sum(model_state_bytes(stage_params(job.model, layout, piece), layout, state).values())


def _device_groups(job: Job, layout: Layout) -> list[GPU]:
    """The GPU type of each block of tp*cp*dp consecutive GPUs (in node order)."""
    n, per_node = layout.tp * layout.cp * layout.dp, job.cluster.gpus_per_node
    nodes = job.cluster.nodes
    return [
        job.cluster.slowest_gpu({nodes[gpu // per_node].host for gpu in range(g * n, (g + 1) * n)})
        for g in range(layout.pp)
    ]


def partition_problem(job: Job, layout: Layout) -> PartitionProblem:
    """The split of ``layout`` as plain numbers for the solver."""
    model = job.model
    shape = shape_of(job, layout)
    groups = _device_groups(job, layout)
    reference = groups[0]
    links = Links.of(job, layout)

    def layer(chunk: Chunk, activation_bytes: float) -> Layer:
        cost = chunk_time(shape, layout, chunk, reference, links, job)
        return Layer(
            forward_s=cost.forward_s,
            backward_s=cost.backward_s,
            state_bytes=_piece_state_bytes(job, layout, chunk, reference),
            activation_bytes=activation_bytes * (1 + ALLOCATOR_SLACK_FRACTION),
        )

    # Each kind of decoder layer priced once (DeepSeek-V3 keeps its first
    # layers dense; a hybrid model mixes Mamba, attention and MLP layers).
    modules = layout.selective_modules or DEFAULT_RECOMPUTE_MODULES
    kind_of = [model.layer_kind(i) for i in range(model.num_layers)]
    kinds = {kind: layer(Chunk(kind_of.index(kind), 1), layer_activation_bytes(shape, layout.recompute, kind, modules))
             for kind in model.layer_kinds}
    decoders = [kinds[kind] for kind in kind_of]
    # A vision tower runs with the text embedding on the first chunk
    # (Megatron's LLaVA builds its encoder on pipeline rank 0): one entry.
    vision = model.vision
    embedding_activations = embedding_activation_bytes(shape)
    if vision:
        encoder = shape.vision()
        embedding_activations += encoder.model.num_layers * layer_activation_bytes(encoder, layout.recompute)
    embedding = layer(Chunk(0, 0, embedding=True, vision=vision is not None), embedding_activations)
    # The LM head's activations and the loss's logits are held once, while
    # the head chunk's forward and backward run back to back: a fixed cost of
    # the last stage, not one per micro batch in flight. When the solver also
    # moves stages between device groups the last stage's device is not known
    # in advance; then it is counted per micro batch in flight (conservative).
    groups_move = len({gpu.kind for gpu in groups}) > 1 and (layout.tp * layout.cp * layout.dp) % job.cluster.gpus_per_node == 0
    head_bytes = head_activation_bytes(shape) + head_transient(shape)
    head = layer(Chunk(0, 0, head=True), head_bytes if groups_move else 0.0)

    fixed = sum(runtime_bytes(shape, layout, reference, job.framework, 0.0).values())
    if layout.recompute == "full":
        fixed += max(layer_activation_bytes(shape, "none", kind) for kind in model.layer_kinds) * (1 + ALLOCATOR_SLACK_FRACTION)
    reference_layer_s = decoders[0].work_s
    devices = []
    for g, gpu in enumerate(groups):
        last = g == layout.pp - 1 and not groups_move
        devices.append(StageDevice(
            speed=chunk_time(shape, layout, Chunk(0, 1), gpu, links, job).total_s / reference_layer_s,
            capacity_bytes=job.memory_headroom.usable(gpu.memory_bytes),
            fixed_bytes=fixed + (head_bytes * (1 + ALLOCATOR_SLACK_FRACTION) if last else 0.0),
        ))
    return PartitionProblem(
        layers=(embedding, *decoders, head),
        pp=layout.pp,
        vpp=layout.vpp,
        microbatches=layout.num_microbatches,
        in_flight=tuple(in_flight_chunks(layout, s) for s in range(layout.pp)),
        devices=tuple(devices),
        # Moving a stage to another device group moves whole nodes when a
        # group fills whole nodes: the launch files' node order realises it.
        # Smaller groups stay in Megatron's order.
        assign_devices=groups_move,
    )


def solve_split(job: Job, layout: Layout, time_limit_s: float, milp: bool = True) -> Split | None:
    """The optimal split of ``layout`` and the solve behind it (no stages
    when no split fits in memory or none was found within the time limit);
    None when only the general MILP applies and ``milp`` is False."""
    problem = partition_problem(job, layout)
    if not milp and auto_method(problem) == "milp":
        return None
    solution = solve_partition(problem, time_limit_s=time_limit_s)
    if not solution.chunk_sizes:  # infeasible, or no split found in the time
        return Split(stages=[], placement=default_placement(job.cluster, layout.world_size), solution=solution)
    # Entries of the layer list are [embedding, decoder..., head]: the first
    # and last chunks each hold one entry that is not a decoder layer.
    decoder_sizes = list(solution.chunk_sizes)
    decoder_sizes[0] -= 1
    decoder_sizes[-1] -= 1
    stages = split_stages(layout, tuple(decoder_sizes), vision=job.model.vision is not None)
    placement = (
        stage_block_placement(job.cluster, layout.world_size, tuple(solution.stage_device))
        if list(solution.stage_device) != list(range(layout.pp))
        else default_placement(job.cluster, layout.world_size)
    )
    return Split(stages=stages, placement=placement, solution=solution)
