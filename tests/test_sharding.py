"""Sharded data parallelism's time and memory (planner/cost/sharding.py),
mechanism by mechanism."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import make_job
from loom.planner.cost import sharding
from loom.planner.cost.collectives import Link
from loom.planner.cost.memory import StageParams, StateBytes, model_state_bytes
from loom.planner.plan import evaluate
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.profiles.catalogue import find_gpu

NVLINK = Link(bandwidth_GBps=360, latency_s=3e-6, kind="nvlink")
NETWORK = Link(bandwidth_GBps=45, latency_s=8e-6, kind="network")
H100 = find_gpu("H100")


def units(count: int = 32, params: float = 2e8) -> sharding.Units:
    return sharding.Units(count=count, params=params, expert_params=0.0, gather_bytes=2.0, reduce_bytes=4.0)


def layout(dp: int, fsdp: int, **kwargs) -> Layout:
    return Layout(tp=1, pp=1, dp=dp, cp=1, micro_batch_size=1, global_batch_size=dp, fsdp=fsdp, **kwargs)


def test_compute_hides_all_but_the_first_gather_and_the_last_reduce():
    links = sharding.ShardingLinks(shard=NVLINK, replicate=NVLINK, expert_dp=NVLINK)
    gather, reduce, _ = sharding.unit_collectives_s(layout(8, 8), units(), links)
    slow = sharding.microbatch_s(layout(8, 8), units(), links, H100, forward_s=32 * 10 * gather, backward_s=32 * 10 * (gather + reduce))[0]
    assert slow == pytest.approx(2 * gather + reduce)
    # Compute shorter than a unit's collectives exposes the difference, unit by unit.
    tight = sharding.microbatch_s(layout(8, 8), units(), links, H100, forward_s=32 * gather / 2, backward_s=32 * gather)[0]
    assert tight == pytest.approx(2 * gather + reduce + 31 * (gather / 2 + reduce))


def test_larger_shard_groups_pay_a_latency_per_rank():
    """The ring's n - 1 steps: at hundreds of ranks the latency is what a
    small unit's gather costs (what makes ZeRO-3 slow at large DP)."""
    links = sharding.ShardingLinks(shard=NETWORK, replicate=NETWORK, expert_dp=NETWORK)
    small = units(params=1e6)
    at_64, _, _ = sharding.unit_collectives_s(layout(64, 64), small, links)
    at_1024, _, _ = sharding.unit_collectives_s(layout(1024, 1024), small, links)
    assert at_1024 - at_64 == pytest.approx(960 * NETWORK.latency_s, rel=0.01)


def test_keeping_weights_after_forward_drops_the_backward_gather_and_holds_the_stage():
    links = sharding.ShardingLinks(shard=NETWORK, replicate=NETWORK, expert_dp=NETWORK)
    resharded, kept = layout(64, 64), layout(64, 64, reshard_after_forward=False)
    gather, _, _ = sharding.unit_collectives_s(resharded, units(), links)
    assert sharding.microbatch_s(resharded, units(), links, H100, 0.0, 0.0)[0] - sharding.microbatch_s(kept, units(), links, H100, 0.0, 0.0)[0] \
        == pytest.approx(32 * gather)
    assert sharding.buffer_bytes("torchtitan", kept, units(), 2.0) == pytest.approx(32 * 2e8 * 2 + 2e8 * (2 + 4))
    assert sharding.buffer_bytes("torchtitan", resharded, units(), 2.0) == pytest.approx(2 * 2e8 * 2 + 2e8 * (2 + 4))


def test_torchtitans_pipeline_gathers_once_per_step_and_holds_fp32_gradients():
    """torch.distributed.pipelining keeps an FSDP stage unsharded and its
    gradients unreduced until the last micro batch's backward."""
    links = sharding.ShardingLinks(shard=NETWORK, replicate=NETWORK, expert_dp=NETWORK)
    piped = Layout(tp=1, pp=4, dp=16, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=16, reshard_after_forward=False)
    time = sharding.time_s("torchtitan", piped, units(8), links, H100, 1.0, 2.0)
    per_microbatch, once = time.microbatch_s, time.step_s
    assert per_microbatch == 0.0 and once > 0.0
    assert sharding.buffer_bytes("torchtitan", piped, units(8), 2.0) == pytest.approx(8 * 2e8 * (2 + 4))


def test_torchtitans_pipeline_reduces_after_the_last_backward_with_nothing_to_hide_behind():
    """stage.py reduces a stage's gradients only once its last micro batch's
    backward is done: however long the backward, every reduce-scatter is
    exposed, while the gathers still hide behind the first forward."""
    links = sharding.ShardingLinks(shard=NETWORK, replicate=NETWORK, expert_dp=NETWORK)
    piped = Layout(tp=1, pp=4, dp=16, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=16, reshard_after_forward=False)
    gather, reduce, _ = sharding.unit_collectives_s(piped, units(8), links)
    long_compute = sharding.time_s("torchtitan", piped, units(8), links, H100, forward_s=100.0, backward_s=200.0)
    assert (long_compute.step_s, long_compute.after_backward_s) == pytest.approx((gather, 8 * reduce))
    # ... and an HSDP all-reduce on another fabric runs beside the reduce-scatters.
    hsdp = Layout(tp=1, pp=4, dp=16, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=4, reshard_after_forward=False)
    beside = sharding.ShardingLinks(shard=NVLINK, replicate=NETWORK, expert_dp=NVLINK)
    _, scatter, replicas = sharding.unit_collectives_s(hsdp, units(8), beside)
    assert sharding.reduced_after_backward_s(hsdp, units(8), beside) == pytest.approx(8 * max(scatter, replicas) + min(scatter, replicas))


def test_torchtitans_pipeline_adds_each_micro_batchs_gradients_into_fp32():
    """The first micro batch's bf16 gradients are cast into the fp32
    accumulator (read 2, write 4), every later one added to it (read 2 + 4,
    write 4): HBM traffic that grows with the micro batches."""
    for microbatches in (1, 4):
        piped = Layout(tp=1, pp=4, dp=16, cp=1, micro_batch_size=1, global_batch_size=16 * microbatches, fsdp=16,
                       reshard_after_forward=False)
        assert sharding.fsdp2_accumulation_bytes(piped, units(8), 2.0) == pytest.approx(8 * 2e8 * (6 + (microbatches - 1) * 10))
        assert sharding.fsdp2_accumulation_bytes(piped, units(8), 4.0) == 0.0  # fp32 gradients are the accumulator


def test_torchtitans_pipeline_accumulates_in_each_micro_batch_and_reduces_behind_the_cool_down():
    """The accumulation runs in every micro batch's backward (the pipeline
    sees it); a stage's reduce after its last backward hides behind the
    cool-down of the stages that finish after it, so stage 0's is exposed."""
    from loom.planner.cost.time_model import step_parts
    from loom.planner.specs.stages import uniform_stages

    job = make_job("llama-3-8b", nodes=4, gbs=64, seq=4096, framework="torchtitan")
    layout = Layout(tp=1, pp=4, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=8, reshard_after_forward=False)
    stages = uniform_stages(job.model, layout)
    parts = step_parts(job, layout, stages, [job.cluster.slowest.gpu] * len(stages))
    assert all(z.microbatch_s > 0 and z.after_backward_s > 0 for z in parts.sharded)
    assert parts.cooldown_s[0] == 0 and all(later > 0 for later in parts.cooldown_s[1:])
    once = parts.breakdown_s(1.0, 0.0, 0.0)["sharding_comm_once"]
    assert once == pytest.approx(max(z.step_s + max(0.0, z.after_backward_s - c) for z, c in zip(parts.sharded, parts.cooldown_s)))
    assert once >= parts.sharded[0].step_s + parts.sharded[0].after_backward_s
    # Interleaved, each chunk's reduce holds up the rank's remaining backwards: no cool-down hides it.
    interleaved = replace(layout, vpp=2)
    stages = uniform_stages(job.model, interleaved)
    assert step_parts(job, interleaved, stages, [job.cluster.slowest.gpu] * len(stages)).cooldown_s == [0.0] * 4


def test_hsdp_all_reduces_the_shard_across_replicas_beside_the_shard_group():
    """Shards in a node, replicas across nodes: the replicas' all-reduce of
    the gradient shard runs on the network beside the NVLink collectives."""
    hsdp = layout(64, 8)
    links = sharding.ShardingLinks(shard=NVLINK, replicate=NETWORK, expert_dp=NVLINK)
    gather, reduce, replicas = sharding.unit_collectives_s(hsdp, units(), links)
    assert replicas > 0.0 and sharding.unit_collectives_s(layout(64, 64), units(), links)[2] == 0.0
    exposed = sharding.microbatch_s(hsdp, units(), links, H100, 0.0, 0.0)[0]
    assert exposed == pytest.approx(32 * gather + 32 * max(gather + reduce, replicas))


def test_sharded_state_bytes():
    """FSDP2 keeps fp32 parameters, gradients and Adam's two moments, all
    sharded: 16 bytes per parameter over the shard group; Megatron-FSDP its
    bf16 weight, fp32 gradient and 12 bytes of optimizer state."""
    params = StageParams(total=1e9, linear=1e9, expert=0.0)
    titan = StateBytes.of("torchtitan", "bf16", make_job().features, H100)
    assert sum(model_state_bytes(params, layout(8, 8), titan).values()) == pytest.approx(16e9 / 8)
    hsdp = Layout(tp=1, pp=1, dp=16, cp=2, micro_batch_size=1, global_batch_size=16, fsdp=4)
    assert sum(model_state_bytes(params, hsdp, titan).values()) == pytest.approx(16e9 / 8)  # fsdp x cp shards
    megatron = StateBytes.of("megatron", "bf16", make_job().features, H100)
    assert sum(model_state_bytes(params, layout(8, 8, distributed_optimizer=True), megatron).values()) == pytest.approx(18e9 / 8)


def test_fsdp_fits_what_the_distributed_optimizer_cannot():
    """Llama-3 70B on 32 H100 without model parallelism: Megatron's distributed
    optimizer keeps whole bf16 weights and fp32 gradients (6 bytes per
    parameter, 420 GB), Megatron-FSDP shards them (18 / 32 per parameter)."""
    job = make_job("llama-3-70b", nodes=4, gbs=32, seq=4096)
    plain = evaluate(job, Layout(tp=1, pp=1, dp=32, cp=1, micro_batch_size=1, global_batch_size=32, recompute="full", distributed_optimizer=True))
    sharded = evaluate(job, Layout(tp=1, pp=1, dp=32, cp=1, micro_batch_size=1, global_batch_size=32, recompute="full",
                                   distributed_optimizer=True, fsdp=32))
    assert not plain.fits and sharded.fits
    assert sharded.step.breakdown_s["sharding_comm"] > 0.0 and sharded.step.breakdown_s["dp_grad_reduce"] == pytest.approx(0.0, abs=1e-9)


def test_deepspeed_fetches_a_layers_matrices_one_behind_another():
    """ZeRO-3's prefetch (5e7 elements) is smaller than one matrix of a large
    layer, so each matrix's gather hides behind the one before only: the up
    projection (4h^2) behind the output projection (h^2). FSDP gathers the
    whole next layer behind the current one and hides what DeepSpeed cannot."""
    gpt3 = load_model("gpt3-175b")
    pieces = sharding.deepspeed_pieces(gpt3)
    assert pieces == pytest.approx([1 / 12, 1 / 12, 1 / 12, 1 / 12, 4 / 12, 4 / 12])
    links = sharding.ShardingLinks(shard=NETWORK, replicate=NETWORK, expert_dp=NETWORK)
    fsdp, deepspeed = units(96, 1.8e9), sharding.Units(count=96, params=1.8e9, expert_params=0.0, gather_bytes=2.0, reduce_bytes=2.0,
                                                       pieces=pieces)
    gather, _, _ = sharding.unit_collectives_s(layout(512, 512), fsdp, links)
    forward_s = 96 * 1.25 * gather  # each layer's forward outlasts its gather
    assert sharding.microbatch_s(layout(512, 512), fsdp, links, H100, forward_s, 3 * forward_s)[0] == pytest.approx(
        sharding.unit_collectives_s(layout(512, 512), fsdp, links)[0] + sum(sharding.unit_collectives_s(layout(512, 512), fsdp, links)[:2]))
    assert sharding.microbatch_s(layout(512, 512), deepspeed, links, H100, forward_s, 3 * forward_s)[0] > 10 * gather


def test_the_largest_unit_bounds_the_buffers():
    """torchtitan shards the embedding and [norm, output] as units of their
    own: at a 128K vocabulary they outweigh a layer, and the buffers hold
    the largest gathered beside a layer, and its gradients."""
    even = units(34, 2.4e8)
    skewed = sharding.Units(count=34, params=2.4e8, expert_params=0.0, gather_bytes=2.0, reduce_bytes=4.0, largest=5.25e8)
    resharded = layout(8, 8)
    assert sharding.buffer_bytes("torchtitan", resharded, even, 2.0) == pytest.approx(2 * 2.4e8 * 2 + 2.4e8 * 6)
    assert sharding.buffer_bytes("torchtitan", resharded, skewed, 2.0) == pytest.approx((5.25e8 + 2.4e8) * 2 + 5.25e8 * 6)
