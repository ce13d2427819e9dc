"""Sharded data parallelism: the collectives it adds to every micro batch,
what the neighbouring layers' compute hides of them, and the unsharded
layers it holds in memory.

Every framework shards by *units* of consecutive weights, gathered before a
unit runs and freed after: torchtitan calls ``fully_shard`` on each
transformer block, the embedding and the final norm + output
(torchtitan models/llama3/infra/parallelize.py apply_fsdp); Megatron-FSDP's
unit is megatron-core's ``TransformerLayer`` (mcore_fsdp_adapter.py
fsdp_unit_modules); DeepSpeed ZeRO-3 fetches each submodule's parameters
with a prefetch window of ``stage3_prefetch_bucket_size`` elements
(runtime/zero/partitioned_param_coordinator.py). So a stage has one unit per
layer, plus one for the embedding and one for the head.

Per unit and micro batch (FSDP2 ``_fsdp_param_group.py`` /
``_fsdp_collectives.py``, torch 2.13):

- forward: an all-gather of the unit's weights in the gather dtype over the
  shard group (fsdp x CP ranks), issued one unit ahead (implicit prefetch on
  its own stream) so it hides behind the previous unit's forward;
- backward: the all-gather again when the unit was resharded after forward,
  then a reduce-scatter of its gradients in the reduce dtype, and under
  HSDP an all-reduce of the gradient shard over the replicas (FSDP2 runs it
  on its own stream: "collectives use different network resources" when the
  shards are in a node and the replicas across nodes), hidden behind the
  next unit's backward.

The first unit's gather of each pass and the last reduce have nothing to
hide behind; a unit whose collectives take longer than its neighbour's
compute exposes the difference (the communication stream runs the units in
order). Ring collectives pay one latency per rank (collectives.py): at
hundreds of ranks that is milliseconds per unit, which is what makes ZeRO-3
slow at large DP with small micro batches (Wang et al. 2023, ZeRO++, sec. 1:
"high communication volume from gathering weights in forward pass, backward
pass, and averaging gradients").

Under a pipeline, torchtitan keeps the weights gathered from the first
micro batch's forward to the last one's backward and accumulates unsharded
gradients (torch.distributed.pipelining stage.py sets
``set_reshard_after_backward(False)`` and ``set_requires_gradient_sync(False)``
for all but the last backward; torchtitan's default
``fsdp_reshard_after_forward`` is off with PP): its collectives run once per
step, the gathers behind the first micro batch's forward and every reduce
after the last one's backward, exposed (reduced_after_backward_s), and the
stage holds its whole unsharded weights and an fp32 gradient
accumulator (FSDP2 ``FSDPParam.to_accumulated_grad_if_needed`` upcasts to
the reduce dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.planner.cost import contention
from loom.planner.cost.collectives import LOCAL, Link, all_gather_s, all_reduce_s, reduce_scatter_s
from loom.planner.specs.job import Features
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import ModelSpec
from loom.profiles.catalogue import GPU

# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py, 0.19):
# stage3_max_live_parameters bounds the gathered parameters resident at once,
# and stage3.py allocates one reduce bucket of reduce_bucket_size elements
# per gradient dtype (IPGBucketZ3.buffer).
ZERO3_MAX_LIVE_PARAMS = 1_000_000_000
ZERO_REDUCE_BUCKET_PARAMS = 500_000_000  # reduce_bucket_size's default, every stage
# ... and the optimizer steps over sub groups of at most sub_group_size elements.
ZERO3_SUB_GROUP_PARAMS = 1_000_000_000
# The FSDP units a unit's collectives overlap with: the one running while the
# next is gathered (FSDP2's implicit prefetch holds the current and the next
# unit's all-gather outputs; _fsdp_param_group.py wait_for_unshard).
UNITS_IN_FLIGHT = 2


@dataclass(frozen=True)
class Units:
    """One stage's FSDP units as one rank sees them before sharding: ``count``
    units of ``params`` weights each (``expert_params`` of them routed
    experts, sharded over expert data parallel), gathered at
    ``gather_bytes`` and reduced at ``reduce_bytes`` per weight."""

    count: int
    params: float
    expert_params: float
    gather_bytes: float
    reduce_bytes: float
    # The shares of a unit's weights fetched one after another, each hiding
    # behind the compute of the one before (deepspeed_pieces); one for FSDP.
    pieces: tuple[float, ...] = (1.0,)
    # The largest unit's weights (the embedding or the output layer at a
    # large vocabulary): what bounds the buffers; 0 means ``params``.
    largest: float = 0.0
    # Bytes of one unit's shard copied from the host before its gather and
    # of its gradient shard copied back after its reduce (torchtitan's CPU
    # offload; offload.py), 0 without.
    host_copy_bytes: float = 0.0


@dataclass(frozen=True)
class ShardingLinks:
    """Where the collectives run: the shard group (under ZeRO-2, the DP x CP
    group the gradients are split over), the HSDP replicas, expert DP."""

    shard: Link
    replicate: Link
    expert_dp: Link
    host: Link = LOCAL  # the GPU's PCIe link (offload.pcie_link)


def deepspeed_pieces(model: ModelSpec) -> tuple[float, ...]:
    """DeepSpeed ZeRO-3 fetches each submodule's parameters as the module
    runs and prefetches at most ``stage3_prefetch_bucket_size`` (5e7)
    elements ahead, at least the next parameter (runtime/zero/
    partitioned_param_coordinator.py fetch_sub_module): a layer's weight
    matrices come one by one, each behind the previous one's compute (GEMM
    time in proportion to its weights; norms stay whole under
    stage3_param_persistence_threshold). A Hugging Face decoder layer:
    q, k, v and o projections, then gate and up (or one up) and down."""
    h = model.hidden_size
    attention = [model.q_size * h, model.kv_size * h, model.kv_size * h, model.q_size * h]
    mlp = [model.ffn_hidden_size * h] * (3 if model.gated_mlp else 2)
    total = sum(attention) + sum(mlp)
    return tuple(size / total for size in attention + mlp)


def units_of(stage_layers: int, embedding: bool, head: bool) -> int:
    """One unit per decoder layer, plus the embedding and the head."""
    return max(1, stage_layers + embedding + head)


def reduces_every_microbatch(framework: str, layout: Layout) -> bool:
    """Gradients are reduced in every micro batch's backward, not once per
    step: sharded gradients (ZeRO-2, FSDP) and torchtitan's DDP, which runs
    no no_sync across its micro batches (train.py)."""
    return bool(layout.fsdp) or layout.grad_shards > 1 or (framework == "torchtitan" and layout.dp * layout.cp > 1)


def held_across_microbatches(framework: str, layout: Layout) -> bool:
    """Weights stay gathered for the whole step: torchtitan's pipeline
    without resharding after forward (module docstring)."""
    return framework == "torchtitan" and layout.pp > 1 and not layout.reshard_after_forward


Part = list[tuple[float, Link]]  # a collective's pieces: (seconds, the link each runs on)


def _unit_parts(layout: Layout, units: Units, links: ShardingLinks, share: float) -> tuple[Part, Part, Part]:
    """The all-gather, reduce-scatter and HSDP all-reduce of ``share`` of one
    unit's weights, each as (seconds, link) pieces: dense weights over the
    shard group, routed experts over expert data parallel, an offloaded
    shard's host copies over PCIe."""
    dense, experts = share * (units.params - units.expert_params), share * units.expert_params
    expert_shards, shards = max(1, layout.expert_shards), layout.grad_shards
    gather = [(all_gather_s(dense * units.gather_bytes, layout.param_shards, links.shard), links.shard)]
    reduce = [(reduce_scatter_s(dense * units.reduce_bytes, shards, links.shard), links.shard)]
    if experts:
        gather.append((all_gather_s(experts * units.gather_bytes, expert_shards, links.expert_dp), links.expert_dp))
        reduce.append((reduce_scatter_s(experts * units.reduce_bytes, expert_shards, links.expert_dp), links.expert_dp))
    if units.host_copy_bytes:  # the shard comes from the host first, its gradient goes back after
        gather.append((links.host.seconds(share * units.host_copy_bytes), links.host))
        reduce.append((links.host.seconds(share * units.host_copy_bytes), links.host))
    replicas: Part = []
    if layout.fsdp:  # each replica's shards, dense and expert, all-reduced across the replicas
        gradient_shard = dense * units.reduce_bytes / shards + experts * units.reduce_bytes / expert_shards
        replicas.append((all_reduce_s(gradient_shard, layout.dp_replicate, links.replicate), links.replicate))
    return gather, reduce, replicas


def _seconds(part: Part) -> float:
    return sum(seconds for seconds, _ in part)


def _held_s(part: Part, gpu: GPU) -> float:
    """SM-seconds (in whole GPUs) a collective's NCCL kernels hold (contention.py)."""
    return sum(seconds * contention.sm_share(link, gpu) for seconds, link in part)


def unit_collectives_s(layout: Layout, units: Units, links: ShardingLinks, share: float = 1.0) -> tuple[float, float, float]:
    """The all-gather, reduce-scatter and HSDP all-reduce of ``share`` of
    one unit's weights, in seconds."""
    gather, reduce, replicas = _unit_parts(layout, units, links, share)
    return _seconds(gather), _seconds(reduce), _seconds(replicas)


@dataclass(frozen=True)
class Comm:
    """Collectives in one window: ``seconds`` on the wall, ``held_s`` the
    SM-seconds their kernels hold meanwhile (in whole GPUs)."""

    seconds: float
    held_s: float


@dataclass(frozen=True)
class ShardingTime:
    """One stage's ZeRO-2 / ZeRO-3 / FSDP time: exposed per micro batch and
    once per step, and what its hidden collectives cost the compute beside
    them (contention.py), per micro batch and once per step."""

    microbatch_s: float = 0.0
    step_s: float = 0.0
    contention_microbatch_s: float = 0.0
    contention_step_s: float = 0.0
    # Once per step after the stage's last backward (torchtitan's pipeline
    # reduce): hidden by as much of the later-finishing stages' cool-down.
    after_backward_s: float = 0.0


def _unit_reduce(framework: str, layout: Layout, units: Units, links: ShardingLinks, gpu: GPU) -> Comm:
    """Without FSDP, one unit's gradient reduce in each micro batch: ZeRO-2's
    reduce-scatter, torchtitan's DDP all-reduce (bucketed behind backward),
    else none."""
    if layout.grad_shards > 1:
        reduce = _unit_parts(layout, units, links, 1.0)[1]
    elif reduces_every_microbatch(framework, layout):
        reduce = [(all_reduce_s(units.params * units.reduce_bytes, layout.dp * layout.cp, links.shard), links.shard)]
    else:
        return Comm(0.0, 0.0)
    return Comm(_seconds(reduce), _held_s(reduce, gpu))


@dataclass(frozen=True)
class Overlap:
    """Which sharding collectives run on their own stream, behind compute;
    the others run in turn with it (exposed whole)."""

    gather: bool = True
    reduce: bool = True

    @classmethod
    def of(cls, framework: str, features: Features, layout: Layout) -> Overlap:
        """As each framework runs them: torchtitan's FSDP2 and DDP always
        overlap; DeepSpeed always prefetches ZeRO-3's gathers and overlaps
        the reduce with ``overlap_comm`` (loom writes overlap_grad_reduce
        there); Megatron-FSDP overlaps the reduce with
        --overlap-grad-reduce and the gathers with --overlap-param-gather
        too, which loom writes only beside it and the distributed optimizer
        (output/megatron.py _overlap_args)."""
        if framework == "torchtitan":
            return cls()
        if framework == "deepspeed":
            return cls(gather=True, reduce=features.overlap_grad_reduce)
        return cls(gather=features.overlap_grad_reduce and features.overlap_param_gather and layout.distributed_optimizer,
                   reduce=features.overlap_grad_reduce)


def _unit_comms(layout: Layout, units: Units, links: ShardingLinks, gpu: GPU, overlap: Overlap) -> tuple[list[Comm], list[Comm], float]:
    """Per piece of a unit, in forward order: the collectives hidden behind
    the forward (the gather) and behind the backward (the gather again when
    resharded, the reduce-scatter, and the HSDP all-reduce beside it on
    another fabric); and the seconds of those ``overlap`` runs in turn with
    compute."""
    forward_comm, backward_comm, in_turn = [], [], 0.0
    for share in units.pieces:
        gather, reduce, replicas = _unit_parts(layout, units, links, share)
        regather = gather if layout.reshard_after_forward else []
        gathers = (gather, regather) if overlap.gather else ([], [])
        reduces = (reduce, replicas) if overlap.reduce else ([], [])
        in_turn += _seconds(gather + regather) * (not overlap.gather) + _seconds(reduce + replicas) * (not overlap.reduce)
        forward_comm.append(Comm(_seconds(gathers[0]), _held_s(gathers[0], gpu)))
        shard_side, replica_side = gathers[1] + reduces[0], reduces[1]
        held = _held_s(shard_side + replica_side, gpu)
        if links.replicate.kind == links.shard.kind:
            backward_comm.append(Comm(_seconds(shard_side + replica_side), held))
        else:  # different fabrics: the replicas' all-reduce runs beside the shard group's
            backward_comm.append(Comm(max(_seconds(shard_side), _seconds(replica_side)), held))
    return forward_comm, backward_comm, in_turn


def microbatch_s(layout: Layout, units: Units, links: ShardingLinks, gpu: GPU, forward_s: float, backward_s: float,
                 overlap: Overlap = Overlap()) -> tuple[float, float]:
    """(exposed, contention) seconds of the sharding collectives of one
    micro batch on a stage whose units compute ``forward_s`` and
    ``backward_s`` (recompute included) in all: each pass's first
    collective plus, per later piece of a unit, what its collectives take
    beyond the compute of the piece before (module docstring; the backward
    runs the pieces in reverse), and every collective ``overlap`` does not
    overlap; and what the hidden ones cost that compute."""
    forward_comm, backward_comm, in_turn = _unit_comms(layout, units, links, gpu, overlap)
    forward = _pass_s(forward_comm, [forward_s / units.count * share for share in units.pieces], units.count)
    backward = _pass_s(backward_comm[::-1], [backward_s / units.count * share for share in units.pieces[::-1]], units.count)
    return forward[0] + backward[0] + units.count * in_turn, forward[1] + backward[1]


def reduced_after_backward_s(layout: Layout, units: Units, links: ShardingLinks) -> float:
    """Seconds of a torchtitan pipeline stage's gradient reduction, all of
    it after its last micro batch's backward: torch.distributed.pipelining
    calls FSDP's ``post_backward`` for every unit only then (stage.py
    ``perform_reduce_grad``, before that ``backward_maybe_with_nosync``'s
    ``run_post_backward``, torch 2.5-2.13), so no compute is left to hide
    the reduce-scatters; the HSDP all-reduce of each unit's shard follows
    its reduce-scatter on its own stream, so on another fabric the two
    overlap as a two-machine flow (the longer per unit, the shorter once)."""
    scatter = replicas = 0.0
    for share in units.pieces:
        _, reduce, replica = _unit_parts(layout, units, links, share)
        scatter, replicas = scatter + _seconds(reduce), replicas + _seconds(replica)
    if links.replicate.kind == links.shard.kind:
        return units.count * (scatter + replicas)
    return units.count * max(scatter, replicas) + min(scatter, replicas)


def _pass_s(comm: list[Comm], compute: list[float], count: int) -> tuple[float, float]:
    """(exposed, contention) seconds of one pass over ``count`` units of
    pieces with collectives ``comm`` and compute ``compute`` (in running
    order): the first collective has nothing to hide behind; each later one
    hides behind the piece before (the previous unit's last piece for a
    unit's first), exposes what outlasts it and slows it by the SMs it
    holds meanwhile, less that slack (contention.slowdown_s)."""

    def behind(c: Comm, compute_s: float) -> tuple[float, float]:
        slack = max(0.0, c.seconds - compute_s)
        return slack, contention.slowdown_s(c.seconds, c.held_s, min(c.seconds, compute_s), slack)

    within = [behind(comm[j], compute[j - 1]) for j in range(1, len(comm))]
    across = behind(comm[0], compute[-1])
    exposed = comm[0].seconds + sum(e for e, _ in within) + (count - 1) * (across[0] + sum(e for e, _ in within))
    slowed = sum(c for _, c in within) + (count - 1) * (across[1] + sum(c for _, c in within))
    return exposed, slowed


def time_s(framework: str, layout: Layout, units: Units, links: ShardingLinks, gpu: GPU, forward_s: float, backward_s: float,
           overlap: Overlap = Overlap()) -> ShardingTime:
    """Sharded data parallelism's time on one stage (ShardingTime); none
    without it. ZeRO-2 reduce-scatters every micro batch's gradients and
    gathers nothing (Rajbhandari et al. 2020, sec. 5.2); torchtitan's DDP
    all-reduces them every micro batch; torchtitan's pipeline gathers once
    per step behind the first micro batch's forward and reduces after the
    last one's backward (held_across_microbatches)."""
    if not layout.fsdp:
        reduce = _unit_reduce(framework, layout, units, links, gpu)
        if not overlap.reduce:
            return ShardingTime(microbatch_s=units.count * reduce.seconds)
        exposed, slowed = _pass_s([reduce], [backward_s / units.count], units.count)
        return ShardingTime(microbatch_s=exposed, contention_microbatch_s=slowed)
    if held_across_microbatches(framework, layout):
        forward_comm = _unit_comms(layout, units, links, gpu, overlap)[0]
        gathered, slowed = _pass_s(forward_comm, [forward_s / units.count * share for share in units.pieces], units.count)
        return ShardingTime(step_s=gathered, after_backward_s=reduced_after_backward_s(layout, units, links), contention_step_s=slowed)
    exposed, slowed = microbatch_s(layout, units, links, gpu, forward_s, backward_s, overlap)
    return ShardingTime(microbatch_s=exposed, contention_microbatch_s=slowed)


def fsdp2_copy_bytes(layout: Layout, units: Units, compute_grad_bytes: float) -> float:
    """HBM bytes FSDP2 moves on the compute stream for one stage each time
    it gathers and reduces its units (torch 2.6-2.13 fsdp/_fully_shard/
    _fsdp_collectives.py): after every all-gather,
    foreach_all_gather_copy_out's split_with_sizes_copy reads the gathered
    buffer and writes the unsharded parameters (from wait_for_unshard, on
    the current stream); before every reduce-scatter,
    foreach_reduce_scatter_copy_in's chunk_cat reads the unsharded
    gradients (``compute_grad_bytes`` each) and writes the reduce-scatter
    input in the reduce dtype, on the current stream too (the reduce-scatter
    stream waits for it). A unit resharded after forward is gathered twice
    (torchtitan's pipelines keep it: layout rules)."""
    gathers = 1 + layout.reshard_after_forward
    return units.count * units.params * (gathers * 2 * units.gather_bytes + compute_grad_bytes + units.reduce_bytes)


def fsdp2_accumulation_bytes(layout: Layout, units: Units, compute_grad_bytes: float) -> float:
    """HBM bytes FSDP2 moves on the compute stream for one stage when a
    torchtitan pipeline accumulates unsharded gradients (held_across_
    microbatches): after the first micro batch's backward each unit's
    gradient is cast to the fp32 accumulator (to_accumulated_grad_if_needed:
    read ``compute_grad_bytes``, write 4), after each later one added to it
    (accumulate_unsharded_grad_if_needed: read both, write 4) (torch
    2.6-2.13 fsdp/_fully_shard/_fsdp_param.py, called from
    _fsdp_param_group.py post_backward). None when the gradients are fp32
    already (the reduce dtype): autograd accumulates them in place, as in
    every framework."""
    if compute_grad_bytes >= 4:
        return 0.0
    params = units.count * units.params
    first = compute_grad_bytes + 4
    later = compute_grad_bytes + 4 + 4
    return params * (first + (layout.num_microbatches - 1) * later)


def zero_bucket_bytes(overlap_comm: bool, compute_grad_bytes: float) -> float:
    """DeepSpeed ZeRO-1/2's gradient reduce buckets: with contiguous_gradients
    (which loom writes) one buffer of reduce_bucket_size elements in the
    gradients' dtype, and with overlap_comm a second one to reduce from while
    the next fills (stage_1_and_2.py setup_buckets), whatever the model's size."""
    return (2 if overlap_comm else 1) * ZERO_REDUCE_BUCKET_PARAMS * compute_grad_bytes


def buffer_bytes(framework: str, layout: Layout, units: Units, compute_grad_bytes: float) -> float:
    """The unsharded weights and gradient buffers one rank holds at its peak
    under sharded data parallelism (ZeRO-3 / FSDP), in bytes.

    - torchtitan's pipeline: the whole stage gathered plus its fp32 gradient
      accumulator (module docstring).
    - FSDP2 / Megatron-FSDP: ``UNITS_IN_FLIGHT`` units gathered (the current
      and the prefetched one; Megatron-FSDP's --fsdp-double-buffer pool holds
      two), plus the running unit's unsharded gradients in the compute dtype
      and the reduce-scatter's input in the reduce dtype (FSDP2
      foreach_reduce copies them in before freeing the gradients); without
      resharding after forward every unit stays gathered until its backward.
    - DeepSpeed ZeRO-3: up to stage3_max_live_parameters gathered and one
      reduce bucket of reduce_bucket_size elements.
    Two units in flight are the largest and one of mean size."""
    stage_params = units.count * units.params
    largest = max(units.largest, units.params)
    if framework == "deepspeed":
        return min(ZERO3_MAX_LIVE_PARAMS, stage_params) * units.gather_bytes + ZERO_REDUCE_BUCKET_PARAMS * compute_grad_bytes
    if held_across_microbatches(framework, layout):
        return stage_params * (units.gather_bytes + units.reduce_bytes)
    in_flight = largest + (UNITS_IN_FLIGHT - 1) * units.params
    gathered = stage_params if not layout.reshard_after_forward else min(stage_params, in_flight)
    return gathered * units.gather_bytes + largest * (compute_grad_bytes + units.reduce_bytes)
