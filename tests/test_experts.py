"""Expert placement (solvers/experts.py): the exact model against brute force,
the bound, loom against EPLB's greedy placement, the slots, determinism, and
``loom experts``: its JSON contract, SGLang's expert-location file and its
exit code on bad input."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.search.experts import MAP_FILE, SGLANG_FILE, ExpertMap
from loom.solvers.experts import (
    ExpertProblem,
    _replicate,
    affinity_from_trace,
    brute_force,
    check_placement,
    contiguous,
    decomposed,
    evaluate,
    exact,
    greedy,
    greedy_slots,
    layer_loads,
    link_cost_matrix,
    loads_from_trace,
    lower_bound,
    shares,
    solve,
)
from loom.solvers.synthetic_routing import correlated_trace, zipf_loads

runner = CliRunner()


def tiny_problem(seed: int, layers: int, experts: int, gpus: int, slots: int, top_k: int = 1) -> ExpertProblem:
    """Integer loads and affinities (a top-k trace of 40 tokens), two nodes, dyadic link costs: CP-SAT's ticks are exact."""
    rng = np.random.default_rng(seed)
    trace = np.stack([[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(40)])
    loads = rng.integers(0, 60, (layers, experts)).astype(float)
    nodes = np.repeat([0, 1], [gpus - gpus // 2, gpus // 2])
    return ExpertProblem(loads, nodes, slots, affinity_from_trace(trace, experts), link_cost_matrix(nodes, 1.0, 0.25))


# (seed, layers, experts, GPUs, slots, top_k): up to 2 redundant slots, as in practice, so CP-SAT proves them in well under a second.
TINY = [(0, 3, 3, 2, 2, 1), (1, 2, 4, 2, 3, 2), (2, 3, 4, 3, 2, 1), (3, 2, 5, 2, 3, 2), (4, 3, 3, 3, 1, 1)]


@pytest.mark.parametrize("case", TINY)
def test_exact_model_matches_brute_force(case):
    problem = tiny_problem(*case)
    reference = brute_force(problem)
    solved = exact(problem, time_limit_s=10.0)
    assert solved.status == "optimal"
    assert solved.objective == pytest.approx(reference.objective, rel=1e-9)
    assert solved.bound == pytest.approx(reference.objective, rel=1e-9)
    check_placement(problem, solved.expert_of_slot)


@pytest.mark.parametrize("case", TINY)
def test_every_method_reports_a_valid_bound(case):
    problem = tiny_problem(*case)
    optimum = brute_force(problem).objective
    assert lower_bound(problem) <= optimum * (1 + 1e-9)
    for method in (contiguous(problem), greedy(problem), decomposed(problem, time_limit_s=1.0), solve(problem, time_limit_s=5.0)):
        assert method.bound <= optimum * (1 + 1e-9)
        assert method.objective >= optimum * (1 - 1e-9)
        assert 0.0 <= method.gap < 1.0


def test_replica_counts_other_than_eplbs_when_every_slot_is_filled():
    """40 and 3 tokens on 2 GPUs x 2 slots. EPLB gives the hot expert both
    redundant slots: 3 replicas of 13.3, two of them on one GPU (26.7).
    Two replicas each put 20 + 1.5 on every GPU."""
    problem = ExpertProblem(np.array([[40.0, 3.0]]), np.array([0, 0]), 2)
    assert problem.eplb_counts[0].tolist() == [3, 1]
    greedy_busiest = layer_loads(problem, greedy_slots(problem)).max()
    for solved in (exact(problem, time_limit_s=5.0), decomposed(problem, time_limit_s=1.0)):
        assert np.bincount(solved.expert_of_slot[0]).tolist() == [2, 2]
        assert layer_loads(problem, solved.expert_of_slot).max() == pytest.approx(brute_force(problem).objective)
        assert layer_loads(problem, solved.expert_of_slot).max() < greedy_busiest


def test_eplb_replication_minimises_the_largest_replica():
    """``_replicate`` (EPLB's rule) against every count vector of a small layer."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        load = rng.integers(1, 100, 4).astype(float)
        slots = int(rng.integers(4, 9))
        counts = _replicate(load, np.ones(4, dtype=np.int64), slots)
        assert counts.sum() == slots
        best = min((load / np.array(c)).max() for c in itertools.product(range(1, slots), repeat=4) if sum(c) == slots)
        assert (load / counts).max() == pytest.approx(best)


def medium_problem(kind: str, seed: int = 0) -> ExpertProblem:
    """32 experts x 6 layers on 8 GPUs (2 nodes of 4), 5 slots each (8 redundant)."""
    nodes = np.arange(8) // 4
    if kind == "trace":
        trace = correlated_trace(1024, 6, 32, 2, 1.0, seed, successors=2, affinity=4.0)
        return ExpertProblem(loads_from_trace(trace, 32), nodes, 5, affinity_from_trace(trace, 32))
    return ExpertProblem(zipf_loads(6, 32, 2048, {"zipf 1.0": 1.0, "zipf 1.5": 1.5}[kind], seed), nodes, 5)


@pytest.mark.parametrize("kind", ["zipf 1.0", "zipf 1.5", "trace"])
def test_never_worse_than_greedy_on_any_layers_busiest_gpu(kind):
    problem = medium_problem(kind)
    solved = solve(problem, time_limit_s=1.0)
    greedy_busiest = layer_loads(problem, greedy_slots(problem)).max(axis=1)
    assert (layer_loads(problem, solved.expert_of_slot).max(axis=1) <= greedy_busiest * (1 + 1e-9)).all()
    assert solved.objective <= evaluate(problem, greedy_slots(problem)).objective
    assert solved.bound <= solved.objective


def test_cuts_cross_node_traffic_when_experts_have_affinity():
    problem = medium_problem("trace")
    solved = solve(problem, time_limit_s=1.0)
    assert evaluate(problem, solved.expert_of_slot).cross_node_tokens < 0.97 * evaluate(problem, greedy_slots(problem)).cross_node_tokens


def test_replicas_fill_every_slot_and_every_expert_has_one():
    problem = medium_problem("zipf 1.5")
    for method in (solve(problem, time_limit_s=1.0), greedy(problem), contiguous(problem)):
        rows = method.expert_of_slot
        assert rows.shape == (problem.layers, problem.gpus * problem.slots_per_gpu)
        for row in rows:
            assert set(row.tolist()) == set(range(problem.experts))
    with pytest.raises(ValueError, match="cannot hold"):
        ExpertProblem(np.ones((1, 9)), np.zeros(2), 4)


def test_same_problem_same_placement():
    first, second = (solve(medium_problem("trace"), time_limit_s=1.0) for _ in range(2))
    assert np.array_equal(first.expert_of_slot, second.expert_of_slot)
    assert first.objective == second.objective and first.bound == second.bound


def test_affinity_rows_sum_to_the_loads():
    trace = correlated_trace(500, 4, 16, 3, 1.0, seed=2)
    loads, affinity = loads_from_trace(trace, 16), affinity_from_trace(trace, 16)
    assert np.allclose(affinity.sum(axis=2), loads[:-1])
    assert np.allclose(affinity.sum(axis=1), loads[1:])


def test_cli_defaults_are_the_solvers():
    from loom.cli import experts as command
    from loom.solvers import experts as solver

    assert (command.CROSS_NODE_COST, command.CROSS_GPU_COST) == (solver.CROSS_NODE_COST, solver.CROSS_GPU_COST)


def test_link_cost_follows_transfer_time():
    nodes = np.array([0, 0, 1, 1])
    bandwidth = np.array([[np.inf, 400, 50, 25], [400, np.inf, 50, 50], [50, 50, np.inf, 400], [25, 50, 400, np.inf]])
    cost = link_cost_matrix(nodes, cross_node=1.0, bandwidth_GBps=bandwidth)
    assert cost[0, 3] == pytest.approx(1.0)  # the slowest link between nodes
    assert cost[0, 2] == pytest.approx(0.5) and cost[0, 1] == pytest.approx(25 / 400)
    assert np.diag(cost).tolist() == [0.0] * 4


# --------------------------------------------------------------------------- loom experts


def run_experts(*args: str):
    return runner.invoke(app, ["experts", *args])


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    trace = correlated_trace(512, 4, 16, 2, 1.0, seed=3)
    np.save(tmp_path / "trace.npy", trace)
    (tmp_path / "loads.json").write_text(json.dumps({"load_tokens": loads_from_trace(trace, 16).tolist()}))
    return {"loads": tmp_path / "loads.json", "trace": tmp_path / "trace.npy"}


def test_cli_writes_a_valid_map_and_a_consistent_sglang_file(tmp_path, inputs):
    out = tmp_path / "out"
    result = run_experts(str(inputs["loads"]), "--ep-size", "4", "--gpus-per-node", "2", "--slots-per-gpu", "5",
                         "--trace", str(inputs["trace"]), "--time-limit", "1", "--dense-layers", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "greedy" in result.stdout and "contiguous" in result.stdout and "loom" in result.stdout
    document = json.loads((out / MAP_FILE).read_text())
    jsonschema.validate(document, ExpertMap.model_json_schema())
    parsed = ExpertMap.model_validate(document)
    assert parsed.layers == 4 and parsed.experts == 16 and parsed.redundant_slots == 4
    assert parsed.solver.bound <= parsed.solver.objective
    assert parsed.methods["loom"].max_load_tokens <= parsed.methods["greedy"].max_load_tokens * (1 + 1e-9)

    location = json.loads((out / SGLANG_FILE).read_text())
    assert list(location) == ["physical_to_logical_map"]  # SGLang passes the keys on as arguments
    rows = np.array(location["physical_to_logical_map"])
    assert rows.shape == (2 + 4, 4 * 5)
    assert (rows[:2] == np.arange(20) % 16).all()  # dense layers: SGLang's trivial map
    for layer, row in enumerate(rows[2:]):
        assert set(row.tolist()) == set(range(16))
        for expert, ranks in enumerate(parsed.placement[layer]):
            assert sorted((np.flatnonzero(row == expert) // 5).tolist()) == ranks


def test_cli_reads_a_cluster_file(tmp_path, inputs):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"nodes": 2, "gpus_per_node": 2, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 2, "nic_Gbps": 400}))
    result = run_experts(str(inputs["loads"]), "--cluster", str(cluster), "--slots-per-gpu", "4",
                         "--trace", str(inputs["trace"]), "--time-limit", "1", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    document = ExpertMap.model_validate_json((tmp_path / "out" / MAP_FILE).read_text())
    assert document.ep_size == 4 and document.node_of_rank == [0, 0, 1, 1]
    # The cluster says how many GPUs a node has: --gpus-per-node beside it contradicts or repeats it.
    result = run_experts(str(inputs["loads"]), "--cluster", str(cluster), "--gpus-per-node", "4", "--slots-per-gpu", "4",
                         "--out", str(tmp_path / "other"))
    assert result.exit_code == 2 and "--gpus-per-node" in result.output and not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "arguments, field",
    [
        (["--ep-size", "4", "--slots-per-gpu", "3"], "slots_per_gpu"),  # 12 slots for 16 experts
        (["--ep-size", "4", "--gpus-per-node", "3", "--slots-per-gpu", "4"], "gpus_per_node"),
        (["--slots-per-gpu", "4"], "ep_size"),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--trace", "LOADS"], "topk_ids"),  # a 2-D array is no trace
    ],
)
def test_cli_bad_input_exits_2_naming_the_field(tmp_path, inputs, arguments, field):
    arguments = [str(inputs["loads"]) if a == "LOADS" else a for a in arguments]
    result = run_experts(str(inputs["loads"]), *arguments)
    assert result.exit_code == 2
    assert f"'{field}'" in result.output or f"--{field.replace('_', '-')}:" in result.output


def test_cli_bad_loads_file_exits_2(tmp_path):
    (tmp_path / "loads.json").write_text(json.dumps({"tokens": [[1, 2]]}))
    result = run_experts(str(tmp_path / "loads.json"), "--ep-size", "2", "--slots-per-gpu", "1")
    assert result.exit_code == 2 and "'load_tokens'" in result.output
    np.save(tmp_path / "loads.npy", np.array([1.0, -2.0]))
    result = run_experts(str(tmp_path / "loads.npy"), "--ep-size", "2", "--slots-per-gpu", "1")
    assert result.exit_code == 2 and "'load_tokens'" in result.output


# --------------------------------------------------------------------------- bounds and the time limit


def one_line_error(result, source: str, *fragments: str) -> None:
    """Exit 2 with one line that names ``source`` (a flag or file) and shows
    each fragment (the bound, what was given)."""
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert result.output.startswith(f"error: {source}:"), result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


@pytest.mark.parametrize(
    "arguments, flag, fragments",
    [
        (["--ep-size", "100000", "--slots-per-gpu", "1"], "--ep-size", ["2,048 EP ranks", "got 100000"]),
        (["--ep-size", "0", "--slots-per-gpu", "4"], "--ep-size", ["1 to 2,048", "got 0"]),
        (["--ep-size", "4", "--slots-per-gpu", "100000"], "--slots-per-gpu", ["1 to 512 slots", "got 100000"]),
        (["--ep-size", "4", "--slots-per-gpu", "0"], "--slots-per-gpu", ["1 to 512", "got 0"]),
        (["--ep-size", "2048", "--slots-per-gpu", "4"], "--slots-per-gpu", ["at most 1 on 2,048 EP ranks", "2,048", "got 4"]),
        (["--ep-size", "4", "--gpus-per-node", "-2", "--slots-per-gpu", "4"], "--gpus-per-node", ["1 to 2,048", "got -2"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--time-limit", "0"], "--time-limit", ["0.1 to 86,400 seconds", "got 0.0"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--time-limit", "-1"], "--time-limit", ["0.1 to 86,400", "got -1.0"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--time-limit", "nan"], "--time-limit", ["0.1 to 86,400", "got nan"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--time-limit", "inf"], "--time-limit", ["0.1 to 86,400", "got inf"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--cross-gpu-cost", "inf"], "--cross-gpu-cost", ["0 to 1,000,000", "got inf"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--cross-gpu-cost", "nan"], "--cross-gpu-cost", ["0 to 1,000,000", "got nan"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--cross-gpu-cost", "-0.5"], "--cross-gpu-cost", ["0 to 1,000,000", "got -0.5"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--cross-node-cost", "inf"], "--cross-node-cost", ["0 to 1,000,000", "got inf"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--cross-node-cost", "nan"], "--cross-node-cost", ["0 to 1,000,000", "got nan"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--dense-layers", "100000"], "--dense-layers", ["0 to 1,024 layers", "got 100000"]),
        (["--ep-size", "4", "--slots-per-gpu", "4", "--dense-layers", "-1"], "--dense-layers", ["0 to 1,024", "got -1"]),
    ],
)
def test_cli_flag_out_of_bounds_exits_2_naming_flag_bound_and_value(inputs, arguments, flag, fragments):
    result = run_experts(str(inputs["loads"]), "--trace", str(inputs["trace"]), *arguments)
    one_line_error(result, flag, *fragments)


@pytest.mark.parametrize(
    "shape, arguments, flag, fragments",
    [
        # layers x ranks x experts: 64 x 1024 x 512 cells is past 2^24
        ((64, 512), ["--ep-size", "1024", "--slots-per-gpu", "1"], "--ep-size", ["at most 512 EP ranks for 64 layers x 512 experts", "got 1024"]),
        # layers x slots: 128 layers of 2048 slots is past 2^17
        ((128, 16), ["--ep-size", "2048", "--slots-per-gpu", "1"], "--ep-size", ["at most 1,024 EP ranks for 128 layers", "got 2048"]),
        ((128, 16), ["--ep-size", "512", "--slots-per-gpu", "4"], "--slots-per-gpu", ["at most 2 on 512 EP ranks for 128 layers", "got 4"]),
    ],
)
def test_cli_problem_beyond_the_solvers_size_exits_2(tmp_path, shape, arguments, flag, fragments):
    np.save(tmp_path / "loads.npy", np.ones(shape))
    one_line_error(run_experts(str(tmp_path / "loads.npy"), *arguments), flag, *fragments)


def test_cli_cluster_beyond_the_ep_bound_needs_an_ep_size(tmp_path, inputs):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"nodes": 300, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}))
    result = run_experts(str(inputs["loads"]), "--cluster", str(cluster), "--slots-per-gpu", "1")
    one_line_error(result, "--ep-size", "at most 2,048 EP ranks: give --ep-size", "2,400 GPUs", "got 2400")


@pytest.mark.parametrize(
    "name, array, fragments",
    [
        ("nan.npy", [[1.0, np.nan], [2.0, 3.0]], ["finite, non-negative", "nan at index [0, 1]"]),
        ("inf.npy", [[1.0, 2.0], [np.inf, 3.0]], ["finite, non-negative", "inf at index [1, 0]"]),
        ("negative.npy", [[1.0, 2.0], [3.0, -4.0]], ["finite, non-negative", "-4.0 at index [1, 1]"]),
        ("nan.json", [[1.0, np.nan], [2.0, 3.0]], ["finite, non-negative", "nan at index [0, 1]"]),
        ("recordings.npy", [[[1.0, 5.0]], [[1.0, -2.0]]], ["finite, non-negative", "-2.0 at index [1, 0, 1]"]),  # not hidden by the sum
        ("deep.npy", np.zeros((2000, 16)), ["at most 1,024 layers x 2,048 experts", "shape (2000, 16)"]),
        ("deep.json", np.zeros((2000, 16)), ["at most 1,024 layers x 2,048 experts", "shape (2000, 16)"]),
        ("huge.npy", np.zeros((4097, 4097), dtype=np.int8), ["at most 16,777,216 numbers", "shape (4097, 4097)"]),
        ("overflow.npy", [[1e300, 1e300]], ["at most 2^53 routed tokens per layer", "in layer 0"]),
    ],
)
def test_cli_bad_or_oversized_loads_exit_2_naming_the_file(tmp_path, name, array, fragments):
    path = tmp_path / name
    if path.suffix == ".npy":
        np.save(path, np.asarray(array))
    else:
        path.write_text(json.dumps(np.asarray(array).tolist()))
    result = run_experts(str(path), "--ep-size", "2", "--slots-per-gpu", "1")
    one_line_error(result, str(path), "'load_tokens'", *fragments)


def test_cli_oversized_trace_exits_2_naming_the_file(tmp_path, inputs):
    # 4 layers x top-16 allow 2^26 / (4 x 16^2) = 65,536 tokens
    np.save(tmp_path / "long.npy", np.zeros((65_537, 4, 16), dtype=np.int8))
    result = run_experts(str(inputs["loads"]), "--ep-size", "4", "--slots-per-gpu", "4", "--trace", str(tmp_path / "long.npy"))
    one_line_error(result, str(tmp_path / "long.npy"), "'topk_ids'", "at most 65,536 tokens for 4 layers x top-16", "65,537 tokens")
    # 66 layers x 512 experts: the affinity, 65 x 512^2 cells, is past 2^24 (the trace is not even read)
    np.save(tmp_path / "wide.npy", np.ones((66, 512)))
    result = run_experts(str(tmp_path / "wide.npy"), "--ep-size", "64", "--slots-per-gpu", "8", "--trace", str(tmp_path / "absent.npy"))
    one_line_error(result, str(tmp_path / "absent.npy"), "(layers - 1) x experts^2 <= 16,777,216", "66 layers x 512 experts")


def test_cli_time_limit_bounds_the_whole_command(tmp_path):
    """A problem the solver needs over ten seconds for (256 experts x 58
    layers with affinity on 64 GPUs); with a 2 s limit the command, reading
    included, ends within the limit and the margin, says what it cut short,
    and still keeps greedy's balance."""
    from loom.cli.experts import TIME_LIMIT_MARGIN_S

    trace = correlated_trace(1024, 58, 256, 8, 1.0, seed=0, successors=4, affinity=3.0)
    np.save(tmp_path / "trace.npy", trace)
    np.save(tmp_path / "loads.npy", loads_from_trace(trace, 256))
    started = time.monotonic()
    result = run_experts(str(tmp_path / "loads.npy"), "--trace", str(tmp_path / "trace.npy"), "--ep-size", "64", "--gpus-per-node", "8",
                         "--slots-per-gpu", "5", "--time-limit", "2", "--out", str(tmp_path / "out"))
    elapsed_s = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert elapsed_s < 2 + TIME_LIMIT_MARGIN_S
    assert "time limit reached" in result.output
    document = ExpertMap.model_validate_json((tmp_path / "out" / MAP_FILE).read_text())
    assert document.methods["loom"].max_load_tokens <= document.methods["greedy"].max_load_tokens * (1 + 1e-9)
    assert "Wall-clock bound on the whole command" in run_experts("--help").output


def test_solver_stops_at_the_deadline_with_greedy_and_says_so():
    problem = medium_problem("trace")
    for method in (decomposed, exact):
        stopped = method(problem, time_limit_s=0.0)
        assert np.array_equal(stopped.expert_of_slot, greedy_slots(problem))
        assert "time limit" in stopped.cut_short
    assert solve(problem, time_limit_s=1.0).cut_short == ""
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="time_limit_s"):
            solve(problem, time_limit_s=bad)
    with pytest.raises(ValueError, match="finite"):
        ExpertProblem(np.array([[1.0, np.nan]]), np.zeros(2), 1)


def test_evaluate_matches_the_dense_flow():
    """``evaluate`` sums the flow slot by slot; the model's formula is share^T @ affinity @ share."""
    problem = medium_problem("trace")
    placement = solve(problem, time_limit_s=1.0).expert_of_slot
    share = shares(problem, placement)
    flow = share[:-1].transpose(0, 2, 1) @ problem.affinity_tokens @ share[1:]
    off_node = problem.node_of_gpu[:, None] != problem.node_of_gpu[None, :]
    figures = evaluate(problem, placement)
    assert figures.traffic_cost == pytest.approx((flow * problem.link_cost).sum() / problem.gpus, rel=1e-12)
    assert figures.cross_node_tokens == pytest.approx(flow[:, off_node].sum(), rel=1e-12)
    assert figures.cross_gpu_tokens == pytest.approx(flow[:, ~np.eye(problem.gpus, dtype=bool)].sum(), rel=1e-12)
    assert figures.cross_node_tokens > 0


@pytest.mark.parametrize("values", [np.array([[1 + 2j, 3]]), np.array([[True, False]]), np.array([["1", "2"]])])
def test_loads_that_are_not_real_numbers_are_refused(tmp_path, values):
    np.save(tmp_path / "loads.npy", values)
    result = run_experts(str(tmp_path / "loads.npy"), "--ep-size", "2", "--slots-per-gpu", "1")
    assert result.exit_code == 2 and "real numbers" in result.output and "Warning" not in result.output


def test_the_imbalance_per_ep_size_is_what_a_job_takes(tmp_path, inputs):
    from loom.planner.specs.job import Features

    result = run_experts(str(inputs["loads"]), "--ep-size", "4", "--slots-per-gpu", "4", "--time-limit", "1", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    document = ExpertMap.model_validate_json((tmp_path / "out" / MAP_FILE).read_text())
    assert sorted(document.imbalance_by_ep_size) == [2, 4, 8, 16]
    # No replicas: the contiguous placement at EP 4 is the one the per-EP figures assume.
    assert document.imbalance_by_ep_size[4] == pytest.approx(document.methods["contiguous"].imbalance, abs=1e-4)
    assert document.imbalance_by_ep_size[16] >= document.imbalance_by_ep_size[2] >= 1.0  # fewer experts per rank: less averaging
    # The printed line is a job's features entry.
    line = next(line for line in result.stdout.splitlines() if line.startswith("features:"))
    features = Features(**yaml.safe_load(line)["features"])
    assert dict(features.moe_load_imbalance) == pytest.approx(document.imbalance_by_ep_size, abs=1e-3)


def test_loads_as_json_booleans_or_beyond_floats_are_refused_in_one_line(tmp_path):
    (tmp_path / "bools.json").write_text(json.dumps([[True, False, 1, 1, 1, 1, 1, 1]]))
    result = run_experts(str(tmp_path / "bools.json"), "--ep-size", "8", "--slots-per-gpu", "1")
    assert result.exit_code == 2 and "true/false" in result.output
    np.save(tmp_path / "big.npy", np.full((4, 64), 1e308))
    result = run_experts(str(tmp_path / "big.npy"), "--ep-size", "8", "--slots-per-gpu", "8")
    assert result.exit_code == 2 and "Warning" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_trace_repeating_an_expert_in_a_tokens_top_k_is_refused(tmp_path, inputs):
    """A router's top-k picks k distinct experts: a token listing one twice is not a trace of one."""
    trace = np.load(inputs["trace"]) if str(inputs["trace"]).endswith(".npy") else None
    assert trace is not None and trace.shape[2] > 1
    trace[3, 1, 1] = trace[3, 1, 0]
    np.save(tmp_path / "repeat.npy", trace)
    result = run_experts(str(inputs["loads"]), "--ep-size", "4", "--slots-per-gpu", "4", "--trace", str(tmp_path / "repeat.npy"))
    one_line_error(result, str(tmp_path / "repeat.npy"), "'topk_ids[3][1]'", "distinct experts")


def test_one_gpu_gets_a_finite_bound_in_strict_json(tmp_path):
    """EP size 1: no token crosses a GPU, so the traffic floor is 0 (not inf x 0 = NaN, which is not JSON)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "loads.npy", rng.integers(1, 100, (8, 16)).astype(float))
    np.save(tmp_path / "trace.npy", np.stack([np.stack([rng.choice(16, 2, replace=False) for _ in range(8)]) for _ in range(64)]))
    result = run_experts(str(tmp_path / "loads.npy"), "--ep-size", "1", "--slots-per-gpu", "16", "--trace", str(tmp_path / "trace.npy"),
                         "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    solver = json.loads((tmp_path / "out" / MAP_FILE).read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the map"))["solver"]
    assert solver["gap"] == 0.0 and solver["bound"] == solver["objective"]


def test_one_expert_prints_no_imbalance_line_plan_would_refuse(tmp_path):
    np.save(tmp_path / "one.npy", np.ones((1, 1)))
    result = run_experts(str(tmp_path / "one.npy"), "--ep-size", "2", "--slots-per-gpu", "1")
    assert result.exit_code == 0, result.output
    assert "moe_load_imbalance" not in result.output
