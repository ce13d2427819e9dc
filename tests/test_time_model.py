"""The time model: collectives, links, kernel efficiency and the pipeline
schedule behave as their sources say."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import make_cluster, make_job

from loom.planner.cost.collectives import Link, all_gather_s, all_reduce_s, reduce_scatter_s
from loom.planner.cost.efficiency import gemm_time_s
from loom.planner.specs.job import Features
from loom.planner.specs.layout import Layout
from loom.planner.specs.hardware import NIC_EFFICIENCY, NVLINK_EFFICIENCY
from loom.planner.cost.network import group_link
from loom.planner.plan import evaluate
from loom.planner.cost.time_model import pipeline_term_s
from loom.profiles.catalogue import find_gpu

H100 = find_gpu("H100")


def test_ring_all_reduce_moves_2_n_minus_1_over_n_of_the_buffer():
    link = Link(bandwidth_GBps=100, latency_s=5e-6, kind="network")
    size, n = 1e9, 8
    assert all_reduce_s(size, n, link) == pytest.approx(2 * 7 * 5e-6 + 2 * 7 / 8 * size / 100e9)
    assert reduce_scatter_s(size, n, link) + all_gather_s(size, n, link) == pytest.approx(all_reduce_s(size, n, link))
    assert all_reduce_s(size, 1, link) == 0.0


def test_small_messages_on_many_ranks_take_the_tree():
    link = Link(bandwidth_GBps=50, latency_s=8e-6, kind="network")
    n, size = 1024, 1e4
    ring = 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * link.seconds(size)
    assert all_reduce_s(size, n, link) < ring / 10


def test_groups_land_on_nvlink_or_the_network():
    node = make_cluster().slowest
    assert group_link(node, 8, 1).kind == "nvlink"  # TP8 fills one node
    assert group_link(node, 8, 1).bandwidth_GBps == pytest.approx(450 * NVLINK_EFFICIENCY)
    one_per_node = group_link(node, 16, 8)  # DP over TP8 groups: one member per node, its own rail
    assert one_per_node.kind == "network"
    assert one_per_node.bandwidth_GBps == pytest.approx(50 * NIC_EFFICIENCY)
    two_per_node = group_link(node, 16, 4)  # two members per node use two NICs
    assert two_per_node.bandwidth_GBps == pytest.approx(2 * one_per_node.bandwidth_GBps)


def test_small_and_short_k_gemms_run_slower_per_flop():
    def per_flop(m, n, k):
        return gemm_time_s(m, n, k, H100, "bf16") / (2 * m * n * k)

    assert per_flop(8192, 8192, 512) > 1.3 * per_flop(8192, 8192, 8192)  # short K
    assert per_flop(256, 256, 8192) > 5 * per_flop(8192, 8192, 8192)  # too few tiles for 132 SMs
    assert per_flop(8192, 8192, 8192) > 1 / (H100.peak_flops("bf16"))  # never above peak
    assert gemm_time_s(8192, 8192, 8192, H100, "fp8") < gemm_time_s(8192, 8192, 8192, H100, "bf16")


def test_pipeline_time_is_megatrons_bubble_formula_for_equal_stages():
    tau, p, m = 0.1, 8, 32
    for v in (1, 2, 4):
        layout = Layout(tp=1, pp=p, dp=1, cp=1, vpp=v, micro_batch_size=1, global_batch_size=m)
        assert pipeline_term_s([tau] * p, layout) == pytest.approx((m + (p - 1) / v) * tau)


def test_breakdown_adds_up_and_more_micro_batches_shrink_the_bubble():
    job = make_job("llama-3-70b", nodes=16, gbs=256)
    small = evaluate(job, Layout(tp=8, pp=4, dp=4, cp=1, micro_batch_size=1, global_batch_size=256, sequence_parallel=True))
    assert sum(small.step.breakdown_s.values()) == pytest.approx(small.step_time_s)
    big = evaluate(replace(job, global_batch_size=1024),
                   Layout(tp=8, pp=4, dp=4, cp=1, micro_batch_size=1, global_batch_size=1024, sequence_parallel=True))
    bubble_fraction = [plan.step.breakdown_s["pipeline_bubble"] / plan.step_time_s for plan in (small, big)]
    assert bubble_fraction[1] < bubble_fraction[0] / 3


def test_the_bubble_is_named_as_the_bubble_and_pp_comm_is_what_transfers_add():
    """pp_comm is what send/recv add to the simulated pipeline (the same
    schedule with free transfers is that much shorter); the rest of the
    slowest stage's idle time is the pipeline bubble, here 1F1B's (p-1)
    micro batches of fill and drain."""
    from loom.planner.cost.simulated_step import pipeline_costs
    from loom.planner.cost.time_model import step_parts
    from loom.planner.schedule.simulate import simulate

    job = make_job("llama-3-70b", nodes=16, gbs=64)
    layout = Layout(tp=8, pp=4, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True)
    plan = evaluate(job, layout)
    parts = step_parts(job, layout, list(plan.stages), [job.cluster.slowest.gpu] * layout.pp)
    costs = pipeline_costs(parts, list(plan.stages))
    free = simulate(replace(costs, p2p_s=0.0), plan.simulation.schedule).pipeline_time_s
    breakdown = plan.step.breakdown_s
    assert breakdown["pp_comm"] == pytest.approx(plan.simulation.pipeline_time_s - free)
    assert breakdown["pp_comm"] == pytest.approx(2 * (layout.pp - 1) * parts.p2p_one_s)  # the fill and drain path's hops
    tau = max(parts.tau_s)
    assert breakdown["pipeline_bubble"] == pytest.approx((layout.pp - 1) * tau, rel=0.05)


def test_recompute_costs_time_in_order():
    job = make_job("gpt3-175b", nodes=8, gbs=64, seq=2048, features=Features(flash_attention=False))
    times = {
        recompute: evaluate(job, Layout(tp=8, pp=8, dp=1, cp=1, micro_batch_size=1, global_batch_size=64,
                                        sequence_parallel=True, recompute=recompute)).step_time_s
        for recompute in ("none", "selective", "full")
    }
    assert times["none"] < times["selective"] < times["full"]
    # Full recompute re-runs the forward: about a third more compute (Korthikanti Table 4: +36% at 175B).
    assert 1.2 < times["full"] / times["none"] < 1.45


def test_overlapping_the_gradient_reduce_hides_it():
    layout = Layout(tp=2, pp=1, dp=32, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True)
    hidden = evaluate(make_job("llama-3-8b", gbs=64), layout).step.breakdown_s["dp_grad_reduce"]
    exposed = evaluate(make_job("llama-3-8b", gbs=64, features=Features(overlap_grad_reduce=False)), layout)
    assert exposed.step.breakdown_s["dp_grad_reduce"] > 3 * hidden


def test_deepspeed_without_zero_all_reduces_after_the_backward():
    """DeepSpeed's engine all-reduces a ZeRO-0 model's gradients after the
    backward (allreduce_gradients), whatever overlap_grad_reduce says;
    ZeRO-1's gradient hooks reduce behind it."""
    plain = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=False)
    zero1 = replace(plain, zero_stage=1)
    deepspeed = make_job("llama-3-8b", gbs=64, framework="deepspeed")
    megatron = evaluate(make_job("llama-3-8b", gbs=64), plain).step.breakdown_s["dp_grad_reduce"]
    after = evaluate(deepspeed, plain).step.breakdown_s["dp_grad_reduce"]
    assert after > 3 * megatron
    in_turn = Features(overlap_grad_reduce=False, grad_reduce_in_fp32=False)  # DeepSpeed reduces its 16-bit gradients
    assert after == pytest.approx(evaluate(make_job("llama-3-8b", gbs=64, features=in_turn), plain)
                                  .step.breakdown_s["dp_grad_reduce"])
    assert evaluate(deepspeed, zero1).step.breakdown_s["dp_grad_reduce"] < after / 3
    # Its pipeline engine reduces after the flush, ZeRO-1 included.
    piped = Layout(tp=1, pp=2, dp=32, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=False, zero_stage=1)
    megatron_piped = replace(piped, zero_stage=0, distributed_optimizer=True)
    assert evaluate(deepspeed, piped).step.breakdown_s["dp_grad_reduce"] == pytest.approx(
        evaluate(make_job("llama-3-8b", gbs=64, features=in_turn), megatron_piped).step.breakdown_s["dp_grad_reduce"])


def test_a_slow_node_slows_the_whole_job():
    """Synchronous training runs at the pace of the slowest member."""
    from loom.planner.specs.cluster import parse_cluster

    layout = Layout(tp=8, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True)
    base = {"nodes": 8, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    job = make_job("llama-3-70b", gbs=64, features=Features(overlap_grad_reduce=False))
    fast = evaluate(job, layout)
    slow_cluster = parse_cluster({**base, "node_overrides": [{"node": 5, "nic_Gbps": 100}]}, "test")
    slow = evaluate(replace(job, cluster=slow_cluster), layout)
    assert slow.step.breakdown_s["dp_grad_reduce"] == pytest.approx(4 * fast.step.breakdown_s["dp_grad_reduce"], rel=0.05)


def test_chunks_of_one_size_but_other_layers_are_priced_each_as_their_own():
    """DeepSeek-V3's first three layers are dense: two-layer chunks over
    layers 2-3 (dense + MoE) and 4-5 (MoE + MoE) cost differently, and each
    stage's price is what chunk_time gives its own chunk (the per-step memo
    is keyed on the layers' kinds, not their count)."""
    from loom.planner.cost.layers import shape_of
    from loom.planner.cost.network import Links
    from loom.planner.cost.time_model import chunk_time, step_parts
    from loom.planner.specs.stages import split_stages

    job = make_job("deepseek-v3", nodes=32, gbs=256, seq=4096)
    layout = Layout(tp=1, pp=4, dp=64, cp=1, ep=8, micro_batch_size=1, global_batch_size=256, distributed_optimizer=True)
    stages = split_stages(layout, (2, 2, 2, 55))
    gpu = job.cluster.slowest.gpu
    parts = step_parts(job, layout, stages, [gpu] * 4)
    own = [chunk_time(shape_of(job, layout), layout, stage.chunks[0], gpu, Links.of(job, layout), job) for stage in stages]
    assert [cs[0] for cs in parts.chunks] == own
    assert own[1].total_s < own[2].total_s  # one dense layer is cheaper than a second MoE layer


def test_one_gpu_reduces_nothing_not_a_rounding_error():
    """The simulated step's reduce is what follows the pipeline beyond the
    optimizer: on one GPU exactly none (not 1e-16 s)."""
    job = make_job("llama-3-8b", nodes=1, gbs=4, seq=2048)
    layout = Layout(tp=1, pp=1, dp=1, cp=1, micro_batch_size=1, global_batch_size=4, recompute="full")
    assert evaluate(job, layout).step.breakdown_s["dp_grad_reduce"] == 0.0


def test_qk_norms_read_and_write_the_queries_and_keys():
    """Qwen3's q_layernorm and k_layernorm are two more memory-bound passes over Q and K, each way."""
    from loom.planner.cost.compute import attention_projections
    from loom.planner.cost.efficiency import memory_time_s
    from loom.planner.cost.layers import shape_of
    from loom.planner.specs.model import load_model

    qwen = load_model("qwen3-235b-a22b")  # 64 query heads, 4 key/value heads of 128
    assert qwen.qk_norm
    layout = Layout(tp=2, pp=1, dp=4, cp=1, ep=8, micro_batch_size=1, global_batch_size=8, sequence_parallel=True)
    gpu = find_gpu("H100")
    for backward, passes in ((False, 1), (True, 2)):
        jobs = [replace(make_job(seq=4096), model=model) for model in (qwen, replace(qwen, qk_norm=False))]
        times = [attention_projections(shape_of(job, layout), gpu, backward) for job in jobs]
        q_and_k_bytes = 2 * 4096 * (qwen.q_size + qwen.kv_size) // 2
        assert times[0].gemm_s == times[1].gemm_s
        assert times[0].elementwise_s - times[1].elementwise_s == pytest.approx(memory_time_s(passes * 2 * q_and_k_bytes, gpu))
