"""Idle nodes and nearby global batch sizes (#15): what counts as awkward,
which alternatives are tried, and that plans and suggestions reach the
table, plan.json and the launch files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import make_cluster, make_job
from test_cli import CLUSTER, invoke, write_yaml

from loom.planner.output.launch import launch_files
from loom.planner.search.alternatives import factors_of_two, idle_node_counts, largest_prime_factor, nearby_batch_sizes
from loom.planner.search.layouts import search


def test_awkward_sizes_and_their_alternatives():
    assert [largest_prime_factor(n) for n in (1, 2, 89, 84, 3091)] == [1, 2, 89, 7, 281]
    assert [factors_of_two(n) for n in (1, 96, 3072)] == [0, 5, 10]
    # 89 nodes (712 GPUs): 80 and 84 leave at most an eighth idle and factor into 2, 3, 5, 7.
    assert idle_node_counts(make_cluster(89), 1536) == [80, 84]
    assert idle_node_counts(make_cluster(84), 1536) == [] and idle_node_counts(make_cluster(168), 3072) == []
    # 3,091 = 11 x 281: 154 and 165 of 168 nodes give GPU counts 11 divides (281 is beyond every count).
    assert idle_node_counts(make_cluster(168), 3091) == [154, 165]
    assert nearby_batch_sizes(3091) == [3072, 3200] and nearby_batch_sizes(1536) == []
    assert all(abs(b / 63 - 1) <= 0.05 for b in nearby_batch_sizes(63))


def test_the_nodes_left_idle_are_the_slowest_and_keep_their_links():
    """Of 11 nodes, node 2 has a capped GPU and node 5 a slow NIC: keeping 9
    drops those two, keeps the others in order, and re-indexes the NIC
    overrides and switch leaves of the nodes kept; without a slow node the
    last ones go."""
    from loom.planner.specs.cluster import parse_cluster

    spec = {**CLUSTER, "nodes": 11, "nodes_per_leaf": 4, "node_overrides": [{"node": 2, "power_limit_W": 400}],
            "nic_overrides": [{"node": 5, "nic": 0, "Gbps": 100}, {"node": 7, "nic": 1, "Gbps": 390}]}
    cluster = parse_cluster(spec, "t")
    kept = cluster.fastest_nodes(9)
    assert kept.hosts == [h for i, h in enumerate(cluster.hosts) if i not in (2, 5)]
    assert kept.fabric.nic_Gbps == ((5, 1, 390.0),)  # node 7 is the 6th kept
    assert kept.fabric.leaf_of_node == tuple(cluster.fabric.leaf_of_node[i] for i in (0, 1, 3, 4, 6, 7, 8, 9, 10))
    assert make_cluster(11).fastest_nodes(10).hosts == make_cluster(11).hosts[:10]
    with pytest.raises(ValueError):
        cluster.fastest_nodes(12)


def test_a_mixed_cluster_also_plans_on_its_faster_gpus_alone():
    """8 A100 nodes beside 8 H100 nodes: training runs at the A100s' pace,
    so the search also plans on the H100 nodes alone, and for Llama-3 8B at
    global batch 64 that plan is the fastest, the A100s idle."""
    from loom.planner.specs.cluster import parse_cluster

    a100 = {"gpu": "A100-SXM4-80GB", "nvlink_GBps": 300, "nic_Gbps": 200}
    mixed = parse_cluster({**CLUSTER, "nodes": 16, "node_overrides": [{"node": i, **a100} for i in range(8)]}, "mixed")
    assert idle_node_counts(mixed, 64) == [8] and idle_node_counts(make_cluster(16), 64) == []
    result = search(replace(make_job("llama-3-8b", gbs=64, seq=4096), cluster=mixed), top_k=3)
    best = result.plans[0]
    assert best.idle_gpus == 64 and not best.job.cluster.heterogeneous and "A100" not in best.job.cluster.slowest.gpu.name
    assert all(plan.step_time_s > best.step_time_s for plan in result.plans if not plan.idle_gpus)
    # At batch 63 the suggested batch 64 is that plan: the suggestion says it leaves the A100s idle.
    nearby = search(replace(make_job("llama-3-8b", gbs=63, seq=4096), cluster=mixed), top_k=1).nearby_batches
    assert any(n.global_batch_size == 64 and n.idle_gpus == 64 and n.label == best.layout.label() for n in nearby)


def test_an_awkward_cluster_leaves_nodes_idle_when_that_is_faster():
    """Llama-3 8B on 11 nodes at global batch 64: every layout of all 88
    GPUs puts the factor 11 into the pipeline; on 10 nodes, 8 GPUs idle,
    the step is shorter, and that plan's launch files start only its nodes."""
    job = make_job("llama-3-8b", nodes=11, gbs=64, seq=4096)
    result = search(job, top_k=3)
    best = result.plans[0]
    assert best.idle_gpus == 8 and best.layout.world_size == 80 and best.job.cluster.hosts == job.cluster.hosts[:10]
    whole = [plan for plan in result.plans if not plan.idle_gpus]
    assert all(plan.step_time_s >= best.step_time_s for plan in whole)
    script = launch_files(best.job, best.layout, list(best.stages), best.placement)["train.sh"]
    assert "--nnodes 10" in script or "--nnodes=10" in script or "NNODES=10" in script, script[:2000]


def test_idle_gpus_and_nearby_batches_reach_the_table_and_plan_json(tmp_path):
    cluster = write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "nodes": 1})
    args = ["--model", "llama-3-8b", "--cluster", cluster, "--seq-length", 4096]
    shown = invoke("plan", *args, "--global-batch-size", 63)
    assert shown.exit_code == 0 and "global batch 64 instead of 63" in shown.stdout, shown.output
    report = json.loads(invoke("plan", *args, "--global-batch-size", 63, "--json").stdout)
    nearby = report["search"]["nearby_global_batch_sizes"]
    assert nearby[0]["global_batch_size"] == 64 and nearby[0]["gain"] > 0.05
    assert all(abs(n["global_batch_size"] / 63 - 1) <= 0.05 and n["gain"] >= 0.01 for n in nearby)
    assert report["plans"][0]["idle_gpus"] == 0 and report["plans"][0]["parallel"]["global_batch_size"] == 63

    write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "nodes": 11})
    table = invoke("plan", *args, "--global-batch-size", 64).stdout
    assert "+ 8 idle" in table and "idle" in table.splitlines()[2]
    best = json.loads(invoke("plan", *args, "--global-batch-size", 64, "--json").stdout)
    assert best["gpus"] == 88 and best["plans"][0]["idle_gpus"] == 8 and sum(run["count"] for run in best["plans"][0]["placement"]) == 80


def test_when_the_batch_fits_no_layout_the_message_names_the_nearby_ones_that_do(tmp_path):
    """DeepSpeed pipelines must divide the 32 layers, so on 64 GPUs data
    parallelism is at least 2 and a prime global batch of 509 has no layout:
    exit 3, and the message names 512, which has."""
    cluster = write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "nodes": 8})
    result = invoke("plan", "--model", "llama-3-8b", "--framework", "deepspeed", "--cluster", cluster, "--global-batch-size", 509,
                    "--seq-length", 4096)
    assert result.exit_code == 3 and "nearby global batch sizes fit: 512 (" in " ".join(result.output.split()), result.output


def test_an_awkward_batch_leaves_nodes_idle_for_data_parallelism():
    """Global batch 88 = 8 x 11 on 12 nodes (96 GPUs): data parallelism can
    take 11 only on a GPU count 11 divides, so the search also plans on 11
    nodes, and there DP11 (or 22, 44) beats every layout of all 96 GPUs."""
    from loom.planner.search.layouts import _search_dispatchers

    job = make_job("llama-3-8b", nodes=12, gbs=88, seq=4096)
    best = search(job, top_k=3).plans[0]
    assert best.idle_gpus == 8 and best.layout.dp % 11 == 0
    assert _search_dispatchers(job, 1).plans[0].step_time_s > best.step_time_s
