"""Rank placement: the solver against brute force, its bound, and the planner
around it (cluster graph, links per group, search, report)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import yaml

from loom.planner.specs.cluster import load_cluster, parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Job, job_warnings
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.search.placement import place, placement_problem
from loom.planner.plan import evaluate
from loom.planner.cost.network import Links
from loom.planner.specs.layout import neighbour_pairs, rank_groups
from loom.solvers.placement import (
    GroupKind,
    PlacementProblem,
    anneal,
    brute_force,
    communication_s,
    decomposed,
    exact,
    lower_bound_s,
)

H100 = {"gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}


def random_problem(hosts: int, per_host: int, seed: int, tp: int = 2, pp: int = 2, leaves: int = 1) -> PlacementProblem:
    """Hosts with NICs of mixed speed, some slow NVLink pairs, optionally two
    leaf switches behind a 2:1 spine, and a TP x DP x PP layout over them."""
    rng = np.random.default_rng(seed)
    slots = hosts * per_host
    host_of_slot = np.repeat(np.arange(hosts), per_host)
    uplink = rng.choice([10.0, 20.0, 40.0], size=slots, p=[0.2, 0.3, 0.5])
    leaf = rng.integers(leaves, size=hosts)[host_of_slot]
    bandwidth = np.minimum.outer(uplink, uplink) / np.where(leaf[:, None] == leaf[None, :], 1.0, 2.0)
    nvlink = rng.choice([100.0, 300.0], size=(slots, slots), p=[0.3, 0.7])
    bandwidth = np.where(host_of_slot[:, None] == host_of_slot[None, :], np.minimum(nvlink, nvlink.T), bandwidth)
    np.fill_diagonal(bandwidth, np.inf)
    groups = rank_groups(Layout(tp=tp, pp=pp, dp=slots // (tp * pp), cp=1, micro_batch_size=1, global_batch_size=slots))
    kinds = (
        GroupKind("tp", 5.0, groups["tp"]),
        GroupKind("dp-cp", 2.0, groups["dp-cp"]),
        GroupKind("pp", 0.5, neighbour_pairs(groups["pp"])),
    )
    return PlacementProblem(bandwidth, host_of_slot, kinds, per_host, np.arange(slots), np.zeros(hosts, dtype=np.int64))


def brute_force_s(problem: PlacementProblem) -> float:
    return brute_force(problem).communication_s


SMALL = [(2, 4, 2, 2, 1), (4, 2, 2, 2, 1), (3, 4, 2, 2, 1), (2, 4, 1, 2, 2), (4, 2, 1, 4, 2), (3, 2, 1, 3, 2)]


@pytest.mark.parametrize("hosts, per_host, tp, pp, leaves", SMALL)
@pytest.mark.parametrize("seed", range(3))
def test_exact_placement_equals_brute_force(hosts, per_host, tp, pp, leaves, seed):
    problem = random_problem(hosts, per_host, seed, tp, pp, leaves)
    optimum = brute_force_s(problem)
    solution = exact(problem, time_limit_s=20)
    assert solution.status == "optimal"
    assert solution.communication_s == pytest.approx(optimum, rel=1e-9)
    assert communication_s(problem, solution.slot_of_rank) == pytest.approx(solution.communication_s, rel=1e-12)
    assert sorted(solution.slot_of_rank) == list(range(hosts * per_host)), "a bijection"
    blocks = problem.host_of_slot[solution.slot_of_rank].reshape(-1, per_host)
    assert (blocks == blocks[:, :1]).all(), "each block of ranks on one host"


@pytest.mark.parametrize("hosts, per_host, tp, pp, leaves", SMALL)
@pytest.mark.parametrize("seed", range(3))
def test_bound_and_heuristics_bracket_the_optimum(hosts, per_host, tp, pp, leaves, seed):
    """The lower bound never exceeds the optimum; the decomposition and the
    annealing baseline never do worse than the start, nor better than the optimum."""
    problem = random_problem(hosts, per_host, seed, tp, pp, leaves)
    optimum = brute_force_s(problem)
    assert lower_bound_s(problem) <= optimum * (1 + 1e-9)
    start = communication_s(problem, problem.start)
    for solution in (decomposed(problem, 5), anneal(problem, 0.2, seed=seed)):
        assert optimum * (1 - 1e-9) <= solution.communication_s <= start * (1 + 1e-12)
        assert solution.bound_s <= optimum * (1 + 1e-9)


def test_the_joint_bound_is_never_weaker_than_each_kind_alone():
    """The bound by the groups through each GPU together is at least the
    kinds' caps summed (what the bound was) and at most the brute-force optimum."""
    from loom.solvers.placement import _kind_caps_GBps, _reach

    for (hosts, per_host, tp, pp, leaves), seed in itertools.product(SMALL, range(4)):
        problem = random_problem(hosts, per_host, seed, tp, pp, leaves)
        caps = _kind_caps_GBps(problem, _reach(problem))
        per_kind = sum(kind.volume_GB / cap for kind, cap in zip(problem.kinds, caps) if np.isfinite(cap))
        assert per_kind * (1 - 1e-12) <= lower_bound_s(problem) <= brute_force_s(problem) * (1 + 1e-9)


def test_a_faulty_cluster_behind_an_oversubscribed_spine_is_placed_provably_optimally():
    """#15: 8 nodes under two leaves behind a 2:1 spine, one NIC rail down
    and three NICs at half speed. A DP group of 16 ranks needs 8 nodes, so
    the rank on the slowest NIC has its DP group or its pipeline neighbour
    beyond its leaf: the kinds' caps alone leave a gap; the joint bound
    meets the decomposition's placement, which is then proven optimal."""
    from loom.solvers.placement import _kind_caps_GBps, _reach

    spec = {**H100, "nodes": 8, "leaves": [[0, 1, 2, 3], [4, 5, 6, 7]], "spine_oversubscription": 2,
            "nic_overrides": [{"nic": 3, "Gbps": 0}, {"node": 2, "nic": 1, "Gbps": 200}, {"node": 4, "nic": 0, "Gbps": 200},
                              {"node": 4, "nic": 7, "Gbps": 200}]}
    job = Job(model=load_model("llama-3-8b"), cluster=parse_cluster(spec, "faults.yaml"), global_batch_size=256, seq_length=8192)
    layout = Layout(tp=2, pp=2, dp=16, cp=1, micro_batch_size=1, global_batch_size=256, sequence_parallel=True,
                    distributed_optimizer=True, recompute="selective")
    problem = placement_problem(evaluate(job, layout))
    solution = decomposed(problem, 5)
    caps = _kind_caps_GBps(problem, _reach(problem))
    per_kind = sum(kind.volume_GB / cap for kind, cap in zip(problem.kinds, caps) if np.isfinite(cap))
    assert solution.status == "optimal" and solution.gap == 0 and per_kind < 0.95 * solution.communication_s


def test_uniform_links_keep_megatrons_order():
    """Nothing to gain: both methods return the start itself, with a proof."""
    problem = random_problem(4, 4, 0)
    flat = np.where(problem.host_of_slot[:, None] == problem.host_of_slot[None, :], 300.0, 40.0)
    np.fill_diagonal(flat, np.inf)
    uniform = PlacementProblem(flat, problem.host_of_slot, problem.kinds, 4, problem.start, problem.host_type)
    for solution in (exact(uniform, 5), decomposed(uniform, 5)):
        assert solution.slot_of_rank.tolist() == uniform.start.tolist()
        assert solution.status == "optimal" and solution.gap == 0.0


def test_the_solve_is_deterministic():
    problem = random_problem(3, 4, 7, leaves=2)
    first, second = decomposed(problem, 2), decomposed(problem, 2)
    assert first.slot_of_rank.tolist() == second.slot_of_rank.tolist()
    assert exact(problem, 5).slot_of_rank.tolist() == exact(problem, 5).slot_of_rank.tolist()


def test_rank_groups_are_megatrons():
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    for tp, cp, dp, pp in [(2, 2, 2, 2), (4, 1, 4, 2), (1, 2, 8, 1), (8, 1, 2, 4)]:
        ours = rank_groups(Layout(tp=tp, pp=pp, dp=dp, cp=cp, micro_batch_size=1, global_batch_size=dp))
        theirs = parallel_state.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
        for name in ("tp", "cp", "dp-cp", "pp"):
            assert sorted(map(tuple, ours[name].tolist())) == sorted(map(tuple, theirs.get_ranks(name)))


# ------------------------------------------------------------ cluster graph


def test_graph_prices_faults_where_they_are():
    cluster = parse_cluster(
        {**H100, "nodes": 4, "leaves": [["node000", "node002"], ["node001", "node003"]], "spine_oversubscription": 2,
         "nic_overrides": [{"node": 1, "nic": 3, "Gbps": 0}], "link_overrides": [{"node": 2, "gpus": [5, 4], "GBps": 100}]},
        "faulty.yaml",
    )
    bandwidth, slot = cluster.topology.bandwidth_GBps, cluster.topology.slot_of
    nic = 400 / 8 * 0.92  # one NIC per GPU, at nccl-tests' busbw efficiency
    assert bandwidth[slot["node000", 0], slot["node002", 0]] == pytest.approx(nic)  # same leaf
    assert bandwidth[slot["node000", 0], slot["node001", 0]] == pytest.approx(nic / 2)  # across the spine
    # node001's GPU 3 lost its NIC: it shares the nearest one with GPU 2.
    assert bandwidth[slot["node001", 3], slot["node003", 3]] == pytest.approx(nic / 2)
    assert bandwidth[slot["node001", 2], slot["node003", 2]] == pytest.approx(nic / 2)
    assert bandwidth[slot["node001", 4], slot["node003", 4]] == pytest.approx(nic)
    assert bandwidth[slot["node002", 4], slot["node002", 5]] == pytest.approx(100 * 0.78)
    assert bandwidth[slot["node002", 4], slot["node002", 6]] == pytest.approx(450 * 0.78)
    assert np.array_equal(bandwidth, bandwidth.T)


@pytest.mark.parametrize("nics", [8, 4])
def test_links_from_the_graph_equal_the_closed_form_on_uniform_links(nics):
    """The same cluster priced through its graph (an override that changes
    nothing makes it non-uniform) gets exactly planner/cost/network.py's links."""
    spec = {**H100, "nodes": 8, "nics_per_node": nics}
    closed = parse_cluster(spec, "uniform")
    graphed = parse_cluster({**spec, "nic_overrides": [{"node": 0, "nic": 0, "Gbps": 400}]}, "graphed")
    assert closed.uniform and not graphed.uniform
    model = load_model("llama-3-8b")
    for tp, cp, pp in itertools.product((1, 2, 8), (1, 2), (1, 2, 4)):
        layout = Layout(tp=tp, pp=pp, dp=64 // (tp * cp * pp), cp=cp, micro_batch_size=1, global_batch_size=512)
        links = [Links.of(Job(model=model, cluster=c, global_batch_size=512, seq_length=8192), layout) for c in (closed, graphed)]
        assert links[0] == links[1], layout.label()


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"nic_overrides": [{"node": 0, "nic": 8, "Gbps": 100}]}, "nic_overrides.0.nic"),
        ({"link_overrides": [{"node": 9, "gpus": [0, 1], "GBps": 100}]}, "link_overrides.0.node"),
        ({"link_overrides": [{"node": 0, "gpus": [2, 2], "GBps": 100}]}, "link_overrides.0.gpus"),
        ({"leaves": [["node000"], ["node001"]]}, "leaves"),
        ({"leaves": [["node000", "node001"], ["node001"]]}, "leaves.1.0"),
        ({"leaves": [[0, 1]], "nodes_per_leaf": 2}, "leaves"),
        ({"spine_oversubscription": 0.5}, "spine_oversubscription"),
    ],
)
def test_bad_fabric_fields_are_named(extra, field):
    with pytest.raises(SpecError) as error:
        parse_cluster({**H100, "nodes": 3, **extra}, "bad.yaml")
    assert error.value.field == field and error.value.source == "bad.yaml"


def test_a_node_without_any_nic_is_bad_input():
    cluster = parse_cluster({**H100, "nodes": 2, "nics_per_node": 1, "nic_overrides": [{"node": 1, "nic": 0, "Gbps": 0}]}, "dead.yaml")
    with pytest.raises(SpecError, match="working NIC on node node001"):
        cluster.topology


# ------------------------------------------------------------------ planner


def degraded_job(**fabric) -> Job:
    """Llama-3 8B on 4 nodes under two leaves, allocated alternately."""
    cluster = parse_cluster(
        {**H100, "nodes": 4, "leaves": [[0, 2], [1, 3]], "spine_oversubscription": 2, **fabric}, "degraded.yaml"
    )
    return Job(model=load_model("llama-3-8b"), cluster=cluster, global_batch_size=256, seq_length=4096)


def test_placement_moves_data_parallel_groups_under_one_leaf():
    """PP2 over 4 nodes: Megatron's order puts each stage's DP group on nodes
    0-1 and 2-3, which straddle the two leaves; loom swaps nodes so that each
    stage's nodes share a leaf, and the whole time model sees the faster step."""
    job = degraded_job()
    layout = Layout(tp=4, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=256, sequence_parallel=True)
    plan = evaluate(job, layout)
    placed = place(plan, time_limit_s=5)
    solve = placed.placement_solve
    assert solve.status == "optimal" and solve.communication_s < solve.start_s
    assert placed.step_time_s < plan.step_time_s
    assert placed.start_step_time_s == plan.step_time_s
    leaf = {"node000": 0, "node002": 0, "node001": 1, "node003": 1}
    for stage in placed.stages:
        assert len({leaf[placed.placement.host_of(rank)] for rank in stage.ranks}) == 1
    # The placement keeps each host's ranks contiguous: one torchrun per node realises it.
    hosts = [host for host, _ in placed.placement.gpus]
    assert all(hosts[r] == hosts[r - r % 8] for r in range(len(hosts)))
    # Placing a plan keeps the split solve behind its stages (plan.json's split_solver).
    from loom.planner.search.layouts import split_plan

    split = split_plan(job, layout)
    assert split.split_solve is not None and place(split, time_limit_s=5).split_solve is split.split_solve


def test_placement_routes_tensor_parallel_groups_around_a_slow_nvlink_pair():
    job = degraded_job(link_overrides=[{"node": 1, "gpus": [1, 2], "GBps": 50}])
    layout = Layout(tp=4, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=256, sequence_parallel=True, distributed_optimizer=True)
    plan = evaluate(job, layout)
    assert Links.of(job, layout).tp.bandwidth_GBps == pytest.approx(50 * 0.78)
    placed = place(plan, time_limit_s=5)
    assert Links.of(job, layout, placed.placement).tp.bandwidth_GBps == pytest.approx(450 * 0.78)
    assert placed.step_time_s < plan.step_time_s
    tp_groups = [{placed.placement.gpus[r] for r in group} for group in rank_groups(layout)["tp"].tolist()]
    assert not any({("node001", 1), ("node001", 2)} <= group for group in tp_groups)


def test_volumes_follow_the_time_model():
    """The solver's volumes: each kind's busy time times its link's bandwidth."""
    job = degraded_job()
    layout = Layout(tp=4, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=256, sequence_parallel=True)
    problem = placement_problem(evaluate(job, layout))
    volume = {kind.name: kind.volume_GB for kind in problem.kinds}
    assert set(volume) == {"tp", "dp-cp", "pp"}  # no CP, untied embeddings
    link = Links.of(job, layout).pp
    activation_GB = 4096 * 4096 * 2 / 1e9 / 4  # one micro batch's bf16 hidden states, split over TP
    # p2p: forward and backward per micro batch; latency counts as bytes at the link's speed.
    assert volume["pp"] == pytest.approx(2 * 64 * (activation_GB + link.latency_s * link.bandwidth_GBps), rel=1e-9)
    # TP dwarfs DP, which dwarfs the pipeline's sends.
    assert volume["tp"] > volume["dp-cp"] > volume["pp"]


def test_a_measured_links_profile_prices_the_groups(tmp_path):
    """A links profile (what `loom profile links` writes) replaces the
    cluster file's figures: a pair measured slow slows the TP group it is in,
    and the placement solver moves the group off it."""
    hosts = [f"node{n:03d}" for n in range(2)]
    gpus = [(host, g) for host in hosts for g in range(4)]
    size = len(gpus)
    bandwidth = [[None if i == j else (300.0 if gpus[i][0] == gpus[j][0] else 40.0) for j in range(size)] for i in range(size)]
    bandwidth[1][2] = bandwidth[2][1] = 30.0  # a slow pair inside node000
    profile = {
        "schema_version": 1, "kind": "links", "backend": "nccl", "device": "NVIDIA H100", "torch_version": "2.13.0",
        "gpus": [{"rank": i, "host": host, "local_gpu": g} for i, (host, g) in enumerate(gpus)],
        "message_bytes": 1 << 26, "latency_message_bytes": 8, "repeats": 10, "warmup": 2,
        "bandwidth_GBps": bandwidth,
        "latency_s": [[None if i == j else 1e-5 for j in range(size)] for i in range(size)],
        "rounds": [], "all_reduce": [],
    }
    (tmp_path / "links.json").write_text(json.dumps(profile))
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({**H100, "gpus_per_node": 4, "nics_per_node": 4, "nodes": 2, "links_profile": "links.json"}))
    cluster = load_cluster(cluster_file)
    assert cluster.topology.measured and cluster.topology.bandwidth_GBps[1, 2] == 30.0
    job = Job(model=load_model("llama-3-8b"), cluster=cluster, global_batch_size=64, seq_length=4096)
    layout = Layout(tp=2, pp=1, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True)
    assert Links.of(job, layout).tp.bandwidth_GBps == 300.0  # Megatron's TP pairs (0,1) and (2,3) avoid (1,2)
    crossed = Layout(tp=4, pp=1, dp=2, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True)
    assert Links.of(job, crossed).tp.bandwidth_GBps == 30.0
    placed = place(evaluate(job, crossed), time_limit_s=5)
    assert placed.placement_solve.status == "optimal"  # TP4 fills the node: the slow pair is unavoidable
    assert placed.step_time_s == evaluate(job, crossed).step_time_s
    assert not any("links profile" in warning for warning in job_warnings(job))
    # the same figures measured with gloo on CPUs (loom profile links without GPUs) are not the H100s' links
    (tmp_path / "links.json").write_text(json.dumps({**profile, "backend": "gloo", "device": "cpu"}))
    gloo = Job(model=load_model("llama-3-8b"), cluster=load_cluster(cluster_file), global_batch_size=64, seq_length=4096)
    assert any("measured with gloo on cpu" in warning for warning in job_warnings(gloo))


def test_a_links_profile_missing_a_gpu_is_bad_input(tmp_path):
    profile = {
        "schema_version": 1, "kind": "links", "backend": "gloo", "device": "cpu", "torch_version": "2.13.0",
        "gpus": [{"rank": 0, "host": "node000", "local_gpu": 0}, {"rank": 1, "host": "node000", "local_gpu": 1}],
        "message_bytes": 8, "latency_message_bytes": 8, "repeats": 1, "warmup": 0,
        "bandwidth_GBps": [[None, 1.0], [1.0, None]], "latency_s": [[None, 1e-5], [1e-5, None]], "rounds": [[[0, 1]]], "all_reduce": [],
    }
    (tmp_path / "links.json").write_text(json.dumps(profile))
    cluster = parse_cluster({**H100, "gpus_per_node": 4, "nics_per_node": 4, "nodes": 1, "links_profile": str(tmp_path / "links.json")}, "c.yaml")
    with pytest.raises(SpecError, match="missing"):
        cluster.topology


def test_deepspeed_placements_keep_each_hosts_gpu_order(tmp_path):
    """DeepSpeed's runner cannot reorder a host's GPUs: the solver moves whole
    nodes only, and the launch files realise what it finds."""
    from loom.planner.output.launch import launch_files
    from test_emit_deepspeed import run_launch_sh

    cluster = parse_cluster(
        {**H100, "nodes": 4, "leaves": [[0, 2], [1, 3]], "spine_oversubscription": 2,
         "link_overrides": [{"node": 1, "gpus": [1, 2], "GBps": 50}]}, "degraded.yaml")
    job = Job(model=load_model("llama-3-8b"), cluster=cluster, global_batch_size=256, seq_length=4096, framework="deepspeed")
    layout = Layout(tp=1, pp=2, dp=16, cp=1, micro_batch_size=1, global_batch_size=256, zero_stage=1)
    problem = placement_problem(evaluate(job, layout))
    assert not problem.reorder_gpus
    for solution in (exact(problem, 5) if len(problem.host_of_slot) <= 32 else decomposed(problem, 5), anneal(problem, 0.3)):
        gpus = solution.slot_of_rank.reshape(-1, 8) % 8
        assert (gpus == np.arange(8)).all()
    placed = place(evaluate(job, layout), time_limit_s=5)
    assert placed.placement_solve.communication_s <= placed.placement_solve.start_s
    launched = run_launch_sh(launch_files(job, layout, list(placed.stages), placed.placement), tmp_path, job.cluster.hosts)
    hosts = [line.split()[0] for line in launched.stdout.splitlines()[1:]]  # the cluster names no hosts: given as its own
    assert hosts == list(dict.fromkeys(host for host, _ in placed.placement.gpus))


def test_launch_files_realise_the_solvers_placement(tmp_path):
    """End to end: the solver re-places a degraded cluster's ranks; train.sh,
    run per host with torchrun recorded, starts every rank on the GPU the plan
    says; and the groups megatron-core's RankGenerator builds from those
    ranks land on the GPUs whose links the solver priced."""
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    from loom.planner.output.launch import launch_files
    from test_emit_megatron import placement_from_launch

    job = degraded_job(link_overrides=[{"node": 1, "gpus": [1, 2], "GBps": 50}])
    layout = Layout(tp=4, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=256, sequence_parallel=True, distributed_optimizer=True)
    placed = place(evaluate(job, layout), time_limit_s=5)
    assert placed.placement != evaluate(job, layout).placement
    script = launch_files(job, layout, list(placed.stages), placed.placement)["train.sh"]
    launched = placement_from_launch(tmp_path, script, job.cluster.hosts, named=job.cluster.named_hosts)
    assert launched == list(placed.placement.gpus)
    generator = parallel_state.RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=1, order="tp-cp-ep-dp-pp")
    ours = rank_groups(layout)
    for name in ("tp", "dp-cp", "pp"):
        theirs = {frozenset(launched[r] for r in group) for group in generator.get_ranks(name)}
        priced = {frozenset(placed.placement.gpus[r] for r in group) for group in ours[name].tolist()}
        assert theirs == priced, name
    # The TP groups the solver priced avoid the slow pair, so the TP link is NVLink at full speed.
    assert Links.of(job, layout, placed.placement).tp.bandwidth_GBps == pytest.approx(450 * 0.78)
