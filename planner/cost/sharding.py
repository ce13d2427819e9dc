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

from dataclasses import dataclass

from loom.planner.cost.collectives import Link, all_gather_s, all_reduce_s, reduce_scatter_s
from loom.planner.specs.layout import Layout

# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py, 0.19):
# stage3_max_live_parameters bounds the gathered parameters resident at once,
# and stage3.py allocates one reduce bucket of reduce_bucket_size elements
# per gradient dtype (IPGBucketZ3.buffer).
ZERO3_MAX_LIVE_PARAMS = 1_000_000_000
ZERO3_REDUCE_BUCKET_PARAMS = 500_000_000
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


@dataclass(frozen=True)
class ShardingLinks:
    """Where the collectives run: the shard group (under ZeRO-2, the DP x CP
    group the gradients are split over), the HSDP replicas, expert DP."""

    shard: Link
    replicate: Link
    expert_dp: Link


def units_of(stage_layers: int, embedding: bool, head: bool) -> int:
    """One unit per decoder layer, plus the embedding and the head."""
    return max(1, stage_layers + embedding + head)


def held_across_microbatches(framework: str, layout: Layout) -> bool:
    """Weights stay gathered for the whole step: torchtitan's pipeline
    without resharding after forward (module docstring)."""
    return framework == "torchtitan" and layout.pp > 1 and not layout.reshard_after_forward


def unit_collectives_s(layout: Layout, units: Units, links: ShardingLinks) -> tuple[float, float, float]:
    """One unit's all-gather, reduce-scatter and HSDP all-reduce, in seconds."""
    dense, experts = units.params - units.expert_params, units.expert_params
    expert_dp, shards = max(1, layout.expert_dp), layout.grad_shards
    gather = all_gather_s(dense * units.gather_bytes, layout.param_shards, links.shard)
    reduce = reduce_scatter_s(dense * units.reduce_bytes, shards, links.shard)
    if experts:
        gather += all_gather_s(experts * units.gather_bytes, expert_dp, links.expert_dp)
        reduce += reduce_scatter_s(experts * units.reduce_bytes, expert_dp, links.expert_dp)
    replicas = all_reduce_s(dense * units.reduce_bytes / shards, layout.dp_replicate, links.replicate) if layout.fsdp else 0.0
    return gather, reduce, replicas


def exposed_microbatch_s(layout: Layout, units: Units, links: ShardingLinks, forward_s: float, backward_s: float) -> float:
    """Sharding communication one micro batch exposes on a stage whose units
    compute ``forward_s`` and ``backward_s`` (recompute included) in all:
    each pass's first collective plus, per later unit, what its collectives
    take beyond the neighbouring unit's compute (module docstring)."""
    gather, reduce, replicas = unit_collectives_s(layout, units, links)
    backward_gather = gather if layout.reshard_after_forward else 0.0
    if links.replicate.kind == links.shard.kind:
        backward_comm = backward_gather + reduce + replicas
    else:  # different fabrics: the replicas' all-reduce runs beside the shard group's
        backward_comm = max(backward_gather + reduce, replicas)
    later = units.count - 1
    forward = gather + later * max(0.0, gather - forward_s / units.count)
    backward = backward_gather + reduce + later * max(0.0, backward_comm - backward_s / units.count)
    return forward + backward


def exposed_s(framework: str, layout: Layout, units: Units, links: ShardingLinks, forward_s: float, backward_s: float) -> tuple[float, float]:
    """(per micro batch, once per step) exposed seconds of sharded data
    parallelism on one stage; both 0 without it. ZeRO-2 reduce-scatters
    every micro batch's gradients and gathers nothing (Rajbhandari et al.
    2020, sec. 5.2)."""
    if not layout.fsdp:
        if layout.grad_shards == 1:
            return 0.0, 0.0
        _, reduce, _ = unit_collectives_s(layout, units, links)
        return reduce + (units.count - 1) * max(0.0, reduce - backward_s / units.count), 0.0
    once = exposed_microbatch_s(layout, units, links, forward_s, backward_s)
    if held_across_microbatches(framework, layout):
        return 0.0, once
    return once, 0.0


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
      reduce bucket of reduce_bucket_size elements."""
    stage_params = units.count * units.params
    if framework == "deepspeed":
        return min(ZERO3_MAX_LIVE_PARAMS, stage_params) * units.gather_bytes + ZERO3_REDUCE_BUCKET_PARAMS * compute_grad_bytes
    if held_across_microbatches(framework, layout):
        return stage_params * (units.gather_bytes + units.reduce_bytes)
    gathered = stage_params if not layout.reshard_after_forward else min(stage_params, UNITS_IN_FLIGHT * units.params)
    return gathered * units.gather_bytes + units.params * (compute_grad_bytes + units.reduce_bytes)
