"""Compute slowed by the collectives hidden behind it (planner/cost/contention.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_job
from loom.planner.cost import contention, sharding
from loom.planner.cost.collectives import LOCAL, Link
from loom.planner.cost.layers import shape_of
from loom.planner.cost.time_model import closed_form_step, step_parts
from loom.planner.plan import evaluate
from loom.planner.cost.time_model import paired_share
from loom.planner.specs.job import Features
from loom.planner.specs.layout import Layout
from loom.planner.specs.stages import split_stages
from loom.profiles.catalogue import find_gpu
from loom.solvers.links import fewest_members_per_node

H100, B200 = find_gpu("H100"), find_gpu("B200")
NVLINK = Link(bandwidth_GBps=360, latency_s=3e-6, kind="nvlink")


def network(members_per_node: int) -> Link:
    return Link(bandwidth_GBps=45 * members_per_node, latency_s=8e-6, kind="network", members_per_node=members_per_node)


def test_a_collective_holds_one_sm_per_nccl_channel():
    """NCCL's ring channels: 24 in an H100 node, 32 on Blackwell; across
    nodes 4 per member a node holds, 16 at most; send/recv all-to-alls
    round up to a power of two; nothing on PCIe copies or locally."""
    assert [contention.nccl_ctas(network(k), H100) for k in (1, 2, 4, 8)] == [4, 8, 16, 16]
    assert contention.nccl_ctas(NVLINK, H100) == 24 and contention.nccl_ctas(NVLINK, B200) == 32
    assert contention.nccl_ctas(NVLINK, H100, all_to_all=True) == 32
    assert contention.nccl_ctas(network(8), H100, all_to_all=True) == 16
    assert contention.sm_share(NVLINK, H100) == pytest.approx(24 / 132)
    assert contention.nccl_ctas(LOCAL, H100) == 0 and contention.nccl_ctas(Link(50, 0.0, "pcie"), H100) == 0


def test_a_collective_that_outlasts_the_compute_costs_only_beyond_its_slack():
    """Compute of W seconds beside T seconds of a collective holding s of
    the SMs ends at W + T s when T <= W; at max(T, W + W s) otherwise."""
    s = 0.2
    assert contention.slowdown_s(1.0, 1.0 * s, 1.0, 0.0) == pytest.approx(0.2)  # T = 1 hidden behind W >= 1
    assert contention.slowdown_s(3.0, 3.0 * s, 2.0, 1.0) == 0.0  # T = 3, W = 2: W + W s = 2.4 < 3
    assert contention.slowdown_s(1.1, 1.1 * s, 1.0, 0.1) == pytest.approx(1.0 * s - 0.1)  # W + W s = 1.2 > T = 1.1
    assert contention.slowdown_s(0.0, 0.0, 0.0, 0.0) == 0.0


def test_the_fewest_members_on_a_node_set_a_placed_groups_channels():
    host_of_slot = np.arange(32) // 8
    assert fewest_members_per_node(host_of_slot, np.array([[0, 1, 8, 9], [2, 3, 10, 11]])) == 2
    assert fewest_members_per_node(host_of_slot, np.array([[0, 1, 2, 8]])) == 1


def _units(count: int = 32) -> sharding.Units:
    return sharding.Units(count=count, params=2e8, expert_params=0.0, gather_bytes=2.0, reduce_bytes=4.0)


def test_hidden_sharded_collectives_slow_the_units_they_hide_behind():
    """Each unit's gather hides behind the unit before it, each reduce (and
    the backward's gather again) behind the next one's backward: with
    compute to spare, every collective but each pass's first slows the
    compute by its seconds times its SM share; with none to spare, all of
    it is exposed and nothing is charged twice."""
    links = sharding.ShardingLinks(shard=network(8), replicate=network(8), expert_dp=network(8))
    layout = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=64)
    gather, reduce, _ = sharding.unit_collectives_s(layout, _units(), links)
    share = contention.sm_share(network(8), H100)
    exposed, slowed = sharding.microbatch_s(layout, _units(), links, H100, forward_s=1e3, backward_s=2e3)
    assert exposed == pytest.approx(2 * gather + reduce)
    assert slowed == pytest.approx(31 * (2 * gather + reduce) * share)
    exposed, slowed = sharding.microbatch_s(layout, _units(), links, H100, forward_s=0.0, backward_s=0.0)
    assert exposed == pytest.approx(32 * (2 * gather + reduce)) and slowed == 0.0


def test_collectives_not_overlapped_run_in_turn_and_slow_nothing():
    """Megatron-FSDP without --overlap-grad-reduce / --overlap-param-gather
    runs each collective in turn with the compute; DeepSpeed without
    overlap_comm still prefetches ZeRO-3's gathers but reduces in turn."""
    links = sharding.ShardingLinks(shard=network(8), replicate=network(8), expert_dp=network(8))
    layout = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=64)
    gather, reduce, _ = sharding.unit_collectives_s(layout, _units(), links)
    share = contention.sm_share(network(8), H100)
    off = sharding.microbatch_s(layout, _units(), links, H100, 1e3, 2e3, sharding.Overlap(gather=False, reduce=False))
    assert off == (pytest.approx(32 * (2 * gather + reduce)), 0.0)
    exposed, slowed = sharding.microbatch_s(layout, _units(), links, H100, 1e3, 2e3, sharding.Overlap(gather=True, reduce=False))
    assert exposed == pytest.approx(2 * gather + 32 * reduce) and slowed == pytest.approx(2 * 31 * gather * share)
    features = Features(overlap_grad_reduce=False)
    assert sharding.Overlap.of("deepspeed", features, layout) == sharding.Overlap(gather=True, reduce=False)
    assert sharding.Overlap.of("megatron", features, layout) == sharding.Overlap(gather=False, reduce=False)
    assert sharding.Overlap.of("torchtitan", features, layout) == sharding.Overlap()


def test_hsdp_replicas_across_nodes_hold_the_network_share_beside_the_shards_nvlink_share():
    links = sharding.ShardingLinks(shard=NVLINK, replicate=network(1), expert_dp=NVLINK)
    layout = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=8)
    gather, reduce, replicas = sharding.unit_collectives_s(layout, _units(), links)
    _, slowed = sharding.microbatch_s(layout, _units(), links, H100, forward_s=1e3, backward_s=2e3)
    nvlink, net = contention.sm_share(NVLINK, H100), contention.sm_share(network(1), H100)
    assert slowed == pytest.approx(31 * ((2 * gather + reduce) * nvlink + replicas * net))


def test_offloaded_shards_host_copies_hold_no_sms():
    """torchtitan's CPU offload copies each shard over PCIe before its
    gather: copy engines, not NCCL's blocks."""
    host = Link(bandwidth_GBps=50, latency_s=0.0, kind="pcie")
    links = sharding.ShardingLinks(shard=network(8), replicate=network(8), expert_dp=network(8), host=host)
    layout = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=64)
    offloaded = sharding.Units(count=32, params=2e8, expert_params=0.0, gather_bytes=2.0, reduce_bytes=4.0, host_copy_bytes=2e8 * 4 / 64)
    assert sharding.unit_collectives_s(layout, offloaded, links)[0] > sharding.unit_collectives_s(layout, _units(), links)[0]
    assert sharding.microbatch_s(layout, offloaded, links, H100, 1e3, 2e3)[1] == pytest.approx(
        sharding.microbatch_s(layout, _units(), links, H100, 1e3, 2e3)[1])


def _breakdown(features: Features, seq: int = 8192) -> dict[str, float]:
    """The closed form's breakdown (the reduce exposure contention reads)."""
    job = make_job("llama-3-8b", nodes=4, gbs=64, seq=seq, features=features)
    layout = Layout(tp=1, pp=1, dp=32, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)
    return closed_form_step(step_parts(job, layout, split_stages(layout, (32,)), [H100])).breakdown_s


def test_the_data_parallel_reduce_and_gather_cost_what_they_hide():
    """The gradient reduce hidden behind backward and the gather hidden
    behind the next forward cost their NCCL channels' share (32 ranks, 8 a
    node: 16 blocks of 132); run after the compute, nothing."""
    share = 16 / 132
    neither = _breakdown(Features(overlap_grad_reduce=False, overlap_param_gather=False))
    reduce_only = _breakdown(Features(overlap_grad_reduce=True, overlap_param_gather=False))
    both = _breakdown(Features(overlap_grad_reduce=True, overlap_param_gather=True))
    assert neither["overlap_contention"] == 0.0
    hidden_reduce = neither["dp_grad_reduce"] - reduce_only["dp_grad_reduce"]
    assert hidden_reduce > 0 and reduce_only["overlap_contention"] == pytest.approx(hidden_reduce * share, rel=1e-9)
    hidden_gather = reduce_only["dp_param_gather"] - both["dp_param_gather"]
    assert hidden_gather > 0 and both["overlap_contention"] - reduce_only["overlap_contention"] == pytest.approx(hidden_gather * share, rel=1e-9)


def test_a_gather_longer_than_the_first_forward_shows_beyond_its_first_bucket():
    """Megatron's forward pre-hooks wait for each bucket's gather: a forward
    of 128 tokens hides little of an 8B model's gather."""
    short = _breakdown(Features(overlap_param_gather=True), seq=128)
    whole = _breakdown(Features(overlap_param_gather=False), seq=128)
    bucket_fraction = 40e6 / 8.03e9
    assert whole["dp_param_gather"] * bucket_fraction * 1.5 < short["dp_param_gather"] < whole["dp_param_gather"]


def test_a_traces_kernels_carry_the_slowdown():
    """What a profiler trace times: GEMM and attention kernels stretched by
    the stage's contention, elementwise ones not."""
    job = make_job("llama-3-8b", nodes=4, gbs=64, features=Features(overlap_grad_reduce=True, overlap_param_gather=True))
    layout = Layout(tp=1, pp=1, dp=32, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)
    parts = step_parts(job, layout, split_stages(layout, (32,)), [H100])
    (microbatch_s, once_s), = parts.stage_contention_s
    raw = sum((c.kernels for c in parts.chunks[0]), type(parts.chunks[0][0].kernels)()).scaled(layout.num_microbatches)
    traced = parts.stage_kernels[0]
    assert once_s > 0 and traced.elementwise_s == raw.elementwise_s
    assert traced.total_s - raw.total_s == pytest.approx(layout.num_microbatches * microbatch_s + once_s, rel=1e-9)


@pytest.mark.parametrize("dispatcher, sms", [("alltoall", 32), ("deepep", 20)])
def test_an_overlapped_all_to_all_costs_its_sms(dispatcher, sms):
    """Mixtral inside a node: the A2A overlap hides every dispatch and
    combine of the paired passes behind the other micro batch's compute,
    which then runs on the SMs NCCL's send/recv channels (alltoall) or
    DeepEP's kernels leave it; the warm-up and cool-down passes run alone."""
    layout = Layout(tp=1, pp=2, dp=4, cp=1, ep=4, vpp=2, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)

    def parts(overlap: bool) -> dict[str, float]:
        features = Features(moe_token_dispatcher=dispatcher, overlap_moe_expert_parallel_comm=overlap, overlap_grad_reduce=False,
                            overlap_param_gather=False)
        return evaluate(make_job("mixtral-8x7b", nodes=1, gbs=64, seq=4096, features=features), layout).step.breakdown_s

    hidden, exposed = parts(True), parts(False)
    paired = paired_share(layout)  # 16 micro batches, pp 2, vpp 2: 4 of 32 passes alone
    assert paired == 28 / 32
    assert hidden["ep_comm"] == pytest.approx(exposed["ep_comm"] * (1 - paired), rel=1e-6)
    assert hidden["overlap_contention"] == pytest.approx(paired * exposed["ep_comm"] * sms / 132, rel=1e-6)
    assert shape_of(make_job("mixtral-8x7b", nodes=1, gbs=64, seq=4096), layout).ep == 4
