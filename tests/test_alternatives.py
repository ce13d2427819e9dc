"""Idle nodes and nearby global batch sizes (#15): what counts as awkward,
which alternatives are tried, and that plans and suggestions reach the
table, plan.json and the launch files."""

from __future__ import annotations

import json

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
    assert idle_node_counts(make_cluster(89)) == [80, 84]
    assert idle_node_counts(make_cluster(84)) == [] and idle_node_counts(make_cluster(168)) == []
    assert nearby_batch_sizes(3091) == [3072, 3200] and nearby_batch_sizes(1536) == []
    assert all(abs(b / 63 - 1) <= 0.05 for b in nearby_batch_sizes(63))


def test_first_nodes_keep_their_switches_and_refuse_to_split_a_domain():
    cluster = make_cluster(11)
    kept = cluster.first_nodes(10)
    assert kept.num_gpus == 80 and kept.hosts == cluster.hosts[:10]
    with pytest.raises(ValueError):
        cluster.first_nodes(12)


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
    cluster = write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "nodes": 2})
    args = ["--model", "llama-3-8b", "--cluster", cluster, "--seq-length", 4096]
    shown = invoke("plan", *args, "--global-batch-size", 63)
    assert shown.exit_code == 0 and "global batch 64 instead of 63" in shown.stdout, shown.output
    report = json.loads(invoke("plan", *args, "--global-batch-size", 63, "--json").stdout)
    nearby = report["search"]["nearby_global_batch_sizes"]
    assert nearby[0]["global_batch_size"] == 64 and nearby[0]["gain"] > 0.2
    assert all(abs(n["global_batch_size"] / 63 - 1) <= 0.05 and n["gain"] >= 0.01 for n in nearby)
    assert report["plans"][0]["idle_gpus"] == 0 and report["plans"][0]["parallel"]["global_batch_size"] == 63

    write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "nodes": 11})
    table = invoke("plan", *args, "--global-batch-size", 64).stdout
    assert "+ 8 idle" in table and "idle" in table.splitlines()[2]
    best = json.loads(invoke("plan", *args, "--global-batch-size", 64, "--json").stdout)
    assert best["gpus"] == 88 and best["plans"][0]["idle_gpus"] == 8 and sum(run["count"] for run in best["plans"][0]["placement"]) == 80
