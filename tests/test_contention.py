"""Compute slowed by the collectives hidden behind it (planner/cost/contention.py)."""

from __future__ import annotations

import pytest

from conftest import make_job
from loom.planner.cost import contention, sharding
from loom.planner.cost.collectives import LOCAL, Link
from loom.planner.plan import evaluate
from loom.planner.specs.job import Features
from loom.planner.specs.layout import Layout
from loom.profiles.catalogue import find_gpu

NVLINK = Link(bandwidth_GBps=360, latency_s=3e-6, kind="nvlink")
NETWORK = Link(bandwidth_GBps=45, latency_s=8e-6, kind="network")


def test_a_collective_holds_one_sm_per_nccl_channel():
    h100, b200 = find_gpu("H100"), find_gpu("B200")
    assert contention.sm_share(NETWORK, h100) == pytest.approx(16 / 132)
    assert contention.sm_share(NVLINK, h100) == pytest.approx(24 / 132)
    assert contention.sm_share(NVLINK, b200) == pytest.approx(32 / b200.sms)
    assert contention.sm_share(LOCAL, h100) == 0.0


def _step(features: Features):
    job = make_job("llama-3-8b", nodes=4, gbs=64, features=features)
    layout = Layout(tp=1, pp=1, dp=32, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)
    return evaluate(job, layout).step.breakdown_s


def test_a_hidden_gradient_reduce_slows_backward_and_an_exposed_one_does_not():
    """The reduce hidden behind backward and the gather hidden behind the
    next forward cost their NCCL channels' SMs; run after compute, nothing."""
    both = _step(Features(overlap_grad_reduce=True, overlap_param_gather=True))
    reduce_only = _step(Features(overlap_grad_reduce=True, overlap_param_gather=False))
    neither = _step(Features(overlap_grad_reduce=False, overlap_param_gather=False))
    assert neither["overlap_contention"] == 0.0
    assert both["overlap_contention"] > reduce_only["overlap_contention"] > 0.0
    # The gather's hidden part is the exposed gather it no longer shows, times the network's share.
    share = contention.sm_share(NETWORK, find_gpu("H100"))
    gather_hidden = reduce_only["dp_param_gather"] - both["dp_param_gather"]
    assert both["overlap_contention"] - reduce_only["overlap_contention"] == pytest.approx(gather_hidden * share, rel=1e-6)


def test_sharded_collectives_cost_what_they_hide():
    """Busy = exposed + hidden, per micro batch; the compute pays the hidden
    part times the shard group's share (Megatron-FSDP over 4 nodes: no
    copies on the compute stream to tell apart)."""
    from loom.planner.cost.memory import sharding_units, stage_params
    from loom.planner.cost.network import Links
    from loom.planner.cost.time_model import _state_bytes

    job = make_job("llama-3-8b", nodes=4, gbs=64)
    layout = Layout(tp=1, pp=1, dp=32, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True, fsdp=32)
    plan = evaluate(job, layout)
    stage, shard = plan.stages[0], Links.of(job, layout).shard
    units = sharding_units(job.model, job.framework, layout, stage_params(job.model, layout, stage), stage, _state_bytes(job, layout))
    links = sharding.ShardingLinks(shard=shard, replicate=shard, expert_dp=shard)
    busy, once = sharding.busy_s(job.framework, layout, units, links)
    gather, reduce, _ = sharding.unit_collectives_s(layout, units, links)
    assert once == 0.0 and busy == pytest.approx(units.count * (2 * gather + reduce))
    breakdown, m = plan.step.breakdown_s, layout.num_microbatches
    assert shard.kind == "network" and 0.0 < breakdown["sharding_comm"] < m * busy
    share = contention.sm_share(shard, find_gpu("H100"))
    assert breakdown["overlap_contention"] == pytest.approx((m * busy - breakdown["sharding_comm"]) * share, rel=1e-6)


@pytest.mark.parametrize("dispatcher, sms", [("alltoall", 24), ("deepep", 20)])
def test_an_overlapped_all_to_all_costs_its_sms(dispatcher, sms):
    """Mixtral inside a node: the A2A overlap hides every dispatch and
    combine behind the other micro batch's compute, which then runs on the
    SMs NCCL's channels (alltoall) or DeepEP's kernels leave it."""
    layout = Layout(tp=1, pp=2, dp=4, cp=1, ep=4, vpp=2, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)

    def ep_comm(overlap: bool) -> float:
        features = Features(moe_token_dispatcher=dispatcher, overlap_moe_expert_parallel_comm=overlap)
        return evaluate(make_job("mixtral-8x7b", nodes=1, gbs=64, seq=4096, features=features), layout).step.breakdown_s["ep_comm"]

    assert ep_comm(True) == pytest.approx(ep_comm(False) * sms / 132, rel=1e-6)


def test_offloaded_shards_host_copies_hold_no_sms():
    """torchtitan's CPU offload copies each shard over PCIe before its gather:
    copy engines, not NCCL's blocks, so the busy time that contends is the
    collectives' alone."""
    links = sharding.ShardingLinks(shard=NETWORK, replicate=NETWORK, expert_dp=NETWORK, host=Link(bandwidth_GBps=50, latency_s=0.0, kind="local"))
    layout = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=64)
    plain = sharding.Units(count=32, params=2e8, expert_params=0.0, gather_bytes=2.0, reduce_bytes=4.0)
    offloaded = sharding.Units(count=32, params=2e8, expert_params=0.0, gather_bytes=2.0, reduce_bytes=4.0, host_copy_bytes=2e8 * 4 / 64)
    assert sharding.unit_collectives_s(layout, offloaded, links)[0] > sharding.unit_collectives_s(layout, plain, links)[0]
    assert sharding.busy_s("torchtitan", layout, offloaded, links) == sharding.busy_s("torchtitan", layout, plain, links)
