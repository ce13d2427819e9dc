"""The search's cost memos (planner/cost/memo.py) are keyed on everything
the costs they remember read: after every layout of a job has filled them,
each layout's chunk times, model state and activations still equal what
pricing it afresh gives. A field left out of a key would hand one layout
another's value, and this would see it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import make_job

from loom.planner.cost.layers import shape_of
from loom.planner.cost.memory import _priced_stage_activations, _priced_stage_state, _stage_activations, _stage_state
from loom.planner.cost.network import Links
from loom.planner.cost.time_model import _chunk_time_memo, chunk_time
from loom.planner.search.layouts import candidate_layouts
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Features, SearchFile
from loom.planner.specs.rules import layout_problems
from loom.planner.specs.stages import default_placement, stage_gpus, uniform_stages


def _priced(job, layout):
    """Each stage of ``layout`` on its GPU, with the layout's shape and links."""
    stages = uniform_stages(job.model, layout)
    gpus = stage_gpus(job.cluster, default_placement(job.cluster, job.cluster.num_gpus), stages)
    return shape_of(job, layout), Links.of(job, layout), list(zip(stages, gpus))


MIXED = parse_cluster({"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400,
                       "node_overrides": [{"node": 0, "gpu": "A100-SXM4-80GB", "nvlink_GBps": 300, "nic_Gbps": 200},
                                          {"node": 1, "power_limit_W": 500}]}, "mixed")


@pytest.mark.parametrize("job", [
    make_job("deepseek-v2-lite", nodes=1, gbs=64, seq=4096),
    make_job("llama-3-8b", nodes=1, gbs=64, seq=4096, framework="torchtitan"),
    make_job("llama-3-8b", nodes=1, gbs=64, seq=4096, framework="deepspeed",
             search=SearchFile(zero_stage=[0, 1, 2, 3], optimizer_offload=[False, True])),
    make_job("llama-3-8b", nodes=1, gbs=64, seq=4096, features=Features(tp_comm_overlap=True),
             search=SearchFile(recompute=["none", "selective", "full"], tp=[1, 2, 4])),
    replace(make_job("deepseek-v2-lite", gbs=32, seq=4096), cluster=MIXED),
], ids=["megatron-moe", "torchtitan", "deepspeed-zero-offload", "megatron-dense", "mixed-capped-moe"])
def test_memoised_costs_equal_pricing_afresh(job):
    layouts = [layout for layout in candidate_layouts(job) if not layout_problems(job, layout)]
    assert len(layouts) > 20
    for layout in layouts:
        shape, links, stages = _priced(job, layout)
        for stage, gpu in stages:
            _stage_state(shape, layout, stage, job.framework, gpu)
            _stage_activations(shape, layout, stage, job.framework)
            for chunk in stage.chunks:
                _chunk_time_memo(shape, layout, chunk, gpu, links, job)
    for layout in reversed(layouts):
        shape, links, stages = _priced(job, layout)
        for stage, gpu in stages:
            assert _stage_state(shape, layout, stage, job.framework, gpu) == _priced_stage_state(shape, layout, stage, job.framework, gpu)
            assert _stage_activations(shape, layout, stage, job.framework) == _priced_stage_activations(shape, layout, stage, job.framework)
            for chunk in stage.chunks:
                assert _chunk_time_memo(shape, layout, chunk, gpu, links, job) == chunk_time(shape, layout, chunk, gpu, links, job), layout.label()
