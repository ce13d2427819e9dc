"""A cluster's GPU power cap: compute-bound kernels run at the clock the cap
leaves (profiles/catalogue.py GPU.clock_fraction), memory-bound ones do not
slow, and a cap the GPU cannot take is a one-line error."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import make_job

from loom.planner.cost.efficiency import flash_attention_time_s, gemm_time_s, memory_time_s
from loom.planner.plan import evaluate
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.layout import Layout
from loom.profiles.catalogue import find_gpu, power_limited

NODE = {"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}


def test_the_clock_follows_the_cube_root_of_the_power_cap():
    h100 = find_gpu("H100")
    capped = power_limited(h100, 500)
    assert capped.clock_fraction == pytest.approx((500 / 700) ** (1 / 3))
    assert power_limited(h100, 500) is capped  # one object per cap: kernel-time caches stay sound
    assert power_limited(h100, None) is h100 and h100.clock_fraction == 1.0
    assert capped.kind == "H100-SXM5-80GB@500W" and h100.kind == "H100-SXM5-80GB"


def test_compute_slows_and_memory_traffic_does_not():
    h100, capped = find_gpu("H100"), power_limited(find_gpu("H100"), 500)
    ratio = capped.clock_fraction
    assert gemm_time_s(8192, 8192, 8192, capped, "bf16") == pytest.approx(gemm_time_s(8192, 8192, 8192, h100, "bf16") / ratio)
    assert flash_attention_time_s(1e15, capped, 8192) == pytest.approx(flash_attention_time_s(1e15, h100, 8192) / ratio)
    assert memory_time_s(1e9, capped) == memory_time_s(1e9, h100)


def test_a_capped_cluster_steps_slower_and_mfu_keeps_the_datasheet_peak():
    layout = Layout(tp=2, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True)
    free = make_job(nodes=2, gbs=64)
    capped = replace(free, cluster=parse_cluster({**NODE, "power_limit_W": 500}, "capped"))
    fast, slow = evaluate(free, layout), evaluate(capped, layout)
    assert fast.step_time_s < slow.step_time_s < fast.step_time_s / power_limited(find_gpu("H100"), 500).clock_fraction
    assert slow.mfu < fast.mfu  # against the same 989 TFLOP/s


@pytest.mark.parametrize("cap, field, expected", [
    ({"power_limit_W": 800}, "power_limit_W", "at most 700 W, the TDP of H100-SXM5-80GB"),
    ({"power_limit_W": 0}, "power_limit_W", "greater than 0"),
    ({"power_limit_W": 1}, "power_limit_W", "at least 175 W on H100-SXM5-80GB"),
    ({"node_overrides": [{"node": 1, "power_limit_W": 900}]}, "node_overrides.0.power_limit_W", "at most 700 W"),
])
def test_a_cap_the_gpu_cannot_take_names_the_field(cap, field, expected):
    with pytest.raises(SpecError) as error:
        parse_cluster({**NODE, **cap}, "cluster.yaml")
    assert error.value.field == field and expected in str(error.value)


def test_nodes_capped_differently_are_different_gpu_kinds():
    cluster = parse_cluster({**NODE, "node_overrides": [{"node": 1, "power_limit_W": 400}]}, "mixed")
    assert cluster.heterogeneous
    assert not parse_cluster({**NODE, "power_limit_W": 400}, "even").heterogeneous


@pytest.mark.parametrize("capped", [1, 2])
def test_a_capped_node_slows_its_own_stage_only(capped):
    """One node of four capped at 350 W, one pipeline stage per node: that
    stage's chunks run slower and the others' do not (stages alike in layers
    but on GPUs of another kind are priced apart), so the step is slower."""
    base = {"nodes": 4, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    plain = make_job("llama-3-8b", nodes=4, gbs=128, seq=8192)
    job = replace(plain, cluster=parse_cluster({**base, "node_overrides": [{"node": capped, "power_limit_W": 350}]}, "t"))
    layout = Layout(tp=8, pp=4, dp=1, cp=1, micro_batch_size=1, global_batch_size=128, sequence_parallel=True)
    chunks = evaluate(job, layout).schedule_costs.stages
    uncapped = evaluate(plain, layout).schedule_costs.stages
    slower = [s for s in range(4) if chunks[s][0].forward_s > uncapped[s][0].forward_s * 1.01]
    assert slower == [capped]
    assert evaluate(job, layout).step_time_s > evaluate(plain, layout).step_time_s
