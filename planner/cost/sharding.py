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
step, and the stage holds its whole unsharded weights and an fp32 gradient
accumulator (FSDP2 ``FSDPParam.to_accumulated_grad_if_needed`` upcasts to
the reduce dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loom.planner.cost.collectives import LOCAL, Link, all_gather_s, all_reduce_s, reduce_scatter_s
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import ModelSpec

# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py, 0.19):
# stage3_max_live_parameters bounds the gathered parameters resident at once,
# and stage3.py allocates one reduce bucket of reduce_bucket_size elements
# per gradient dtype (IPGBucketZ3.buffer).
ZERO3_MAX_LIVE_PARAMS = 1_000_000_000
ZERO3_REDUCE_BUCKET_PARAMS = 500_000_000
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


def unit_collectives_s(layout: Layout, units: Units, links: ShardingLinks, share: float = 1.0) -> tuple[float, float, float]:
    """The all-gather, reduce-scatter and HSDP all-reduce of ``share`` of
    one unit's weights, in seconds."""
    dense, experts = share * (units.params - units.expert_params), share * units.expert_params
    expert_shards, shards = max(1, layout.expert_shards), layout.grad_shards
    gather = all_gather_s(dense * units.gather_bytes, layout.param_shards, links.shard)
    reduce = reduce_scatter_s(dense * units.reduce_bytes, shards, links.shard)
    if experts:
        gather += all_gather_s(experts * units.gather_bytes, expert_shards, links.expert_dp)
        reduce += reduce_scatter_s(experts * units.reduce_bytes, expert_shards, links.expert_dp)
    if units.host_copy_bytes:  # the shard comes from the host first, its gradient goes back after
        gather += links.host.seconds(share * units.host_copy_bytes)
        reduce += links.host.seconds(share * units.host_copy_bytes)
    replicas = 0.0
    if layout.fsdp:  # each replica's shards, dense and expert, all-reduced across the replicas
        gradient_shard = dense * units.reduce_bytes / shards + experts * units.reduce_bytes / expert_shards
        replicas = all_reduce_s(gradient_shard, layout.dp_replicate, links.replicate)
    return gather, reduce, replicas


def _unit_reduce_s(framework: str, layout: Layout, units: Units, links: ShardingLinks) -> float:
    """Without FSDP, one unit's gradient reduce in each micro batch: ZeRO-2's
    reduce-scatter, torchtitan's DDP all-reduce (bucketed behind backward),
    else 0."""
    if layout.grad_shards > 1:
        return unit_collectives_s(layout, units, links)[1]
    if reduces_every_microbatch(framework, layout):
        return all_reduce_s(units.params * units.reduce_bytes, layout.dp * layout.cp, links.shard)
    return 0.0


def busy_s(framework: str, layout: Layout, units: Units, links: ShardingLinks) -> tuple[float, float]:
    """(per micro batch, once per step) seconds the NCCL collectives of
    sharded data parallelism run on one stage, hidden or not: what
    exposed_s counts before overlap, less the offloaded shards' host copies
    (copy engines, no SMs). contention.py prices what the hidden part costs
    the compute beside it."""
    units = replace(units, host_copy_bytes=0.0)
    if not layout.fsdp:
        return units.count * _unit_reduce_s(framework, layout, units, links), 0.0
    total = 0.0
    for share in units.pieces:
        gather, reduce, replicas = unit_collectives_s(layout, units, links, share)
        total += gather * (1 + layout.reshard_after_forward) + reduce + replicas
    total *= units.count
    return (0.0, total) if held_across_microbatches(framework, layout) else (total, 0.0)


def exposed_microbatch_s(layout: Layout, units: Units, links: ShardingLinks, forward_s: float, backward_s: float) -> float:
    """Sharding communication one micro batch exposes on a stage whose units
    compute ``forward_s`` and ``backward_s`` (recompute included) in all:
    each pass's first collective plus, per later piece of a unit, what its
    collectives take beyond the compute of the piece before (module
    docstring; the backward runs the pieces in reverse)."""
    forward_comm, backward_comm = [], []
    for share in units.pieces:
        gather, reduce, replicas = unit_collectives_s(layout, units, links, share)
        backward_gather = gather if layout.reshard_after_forward else 0.0
        forward_comm.append(gather)
        if links.replicate.kind == links.shard.kind:
            backward_comm.append(backward_gather + reduce + replicas)
        else:  # different fabrics: the replicas' all-reduce runs beside the shard group's
            backward_comm.append(max(backward_gather + reduce, replicas))
    forward = _pass_exposed_s(forward_comm, [forward_s / units.count * share for share in units.pieces], units.count)
    backward = _pass_exposed_s(backward_comm[::-1], [backward_s / units.count * share for share in units.pieces[::-1]], units.count)
    return forward + backward


def _pass_exposed_s(comm: list[float], compute: list[float], count: int) -> float:
    """One pass over ``count`` units of pieces with collectives ``comm`` and
    compute ``compute`` (in running order): the first collective has
    nothing to hide behind; each later one hides behind the piece before
    (the previous unit's last piece for a unit's first)."""
    within = sum(max(0.0, comm[j] - compute[j - 1]) for j in range(1, len(comm)))
    across = max(0.0, comm[0] - compute[-1])
    return comm[0] + within + (count - 1) * (across + within)


def exposed_s(framework: str, layout: Layout, units: Units, links: ShardingLinks, forward_s: float, backward_s: float) -> tuple[float, float]:
    """(per micro batch, once per step) exposed seconds of sharded data
    parallelism on one stage; both 0 without it. ZeRO-2 reduce-scatters
    every micro batch's gradients and gathers nothing (Rajbhandari et al.
    2020, sec. 5.2); torchtitan's DDP all-reduces them every micro batch."""
    if not layout.fsdp:
        reduce = _unit_reduce_s(framework, layout, units, links)
        return reduce + (units.count - 1) * max(0.0, reduce - backward_s / units.count), 0.0
    once = exposed_microbatch_s(layout, units, links, forward_s, backward_s)
    if held_across_microbatches(framework, layout):
        return 0.0, once
    return once, 0.0


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
        return min(ZERO3_MAX_LIVE_PARAMS, stage_params) * units.gather_bytes + ZERO3_REDUCE_BUCKET_PARAMS * compute_grad_bytes
    if held_across_microbatches(framework, layout):
        return stage_params * (units.gather_bytes + units.reduce_bytes)
    in_flight = largest + (UNITS_IN_FLIGHT - 1) * units.params
    gathered = stage_params if not layout.reshard_after_forward else min(stage_params, in_flight)
    return gathered * units.gather_bytes + largest * (compute_grad_bytes + units.reduce_bytes)
