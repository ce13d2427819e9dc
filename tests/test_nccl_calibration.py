"""A cluster file's ``nccl_tests`` profile sets the NVLink and NIC efficiencies
that every link of the time model and the placement solver is priced with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.specs.cluster import load_cluster
from loom.planner.specs.hardware import NIC_EFFICIENCY, NVLINK_EFFICIENCY
from loom.planner.cost.network import group_link
from loom.profiles.nccl_tests import read_nccl_tests_log

runner = CliRunner()
LOGS = Path(__file__).parent / "data" / "nccl-tests"
ALL_REDUCE, SENDRECV = LOGS / "all_reduce_perf-2x8-h100.log", LOGS / "sendrecv_perf-node000-node001.log"
H100_NODES = {"gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}


def _largest_busbw(path: Path) -> float:
    run = read_nccl_tests_log(path)
    return max(run.rows, key=lambda row: row.size_bytes).out_of_place.busbw_GBps


@pytest.fixture()
def calibrated(tmp_path) -> Path:
    """A 2-node cluster file whose nccl_tests profile holds both logs."""
    result = runner.invoke(app, ["profile", "nccl-tests", str(ALL_REDUCE), str(SENDRECV), "--out", str(tmp_path / "nccl.json")])
    assert result.exit_code == 0, result.output
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"nodes": 2, **H100_NODES, "nccl_tests": "nccl.json"}))
    return tmp_path


def test_cross_node_runs_set_the_nic_efficiency(calibrated):
    cluster = load_cluster(calibrated / "cluster.yaml")
    # 16 GPUs on 2 nodes (8 GPUs' NICs, 8 x 50 GB/s) and GPU 0 to GPU 0 (one NIC, 50 GB/s).
    expected = sorted([_largest_busbw(ALL_REDUCE) / 400, _largest_busbw(SENDRECV) / 50])
    assert all(node.nic_efficiency == pytest.approx(sum(expected) / 2) for node in cluster.nodes)
    assert expected[0] != pytest.approx(NIC_EFFICIENCY, abs=1e-3)
    assert all(node.nvlink_efficiency == NVLINK_EFFICIENCY for node in cluster.nodes)  # no run inside a node
    across = group_link(cluster.slowest, 16, 2)  # 4 members per node: 4 GPUs' NICs
    assert across.bandwidth_GBps == pytest.approx(4 * 50 * sum(expected) / 2)


def test_a_run_inside_one_node_sets_the_nvlink_efficiency(calibrated):
    document = json.loads((calibrated / "nccl.json").read_text())
    one_node = document["runs"][0]
    for gpu in one_node["gpus"]:
        gpu["host"] = "node000"
    document["runs"] = [one_node]
    (calibrated / "nccl.json").write_text(json.dumps(document))
    cluster = load_cluster(calibrated / "cluster.yaml")
    assert cluster.nodes[0].nvlink_efficiency == pytest.approx(_largest_busbw(ALL_REDUCE) / 450)
    assert cluster.nodes[0].nic_efficiency == NIC_EFFICIENCY
    assert cluster.uniform  # the same efficiency everywhere keeps the closed forms


def test_measured_links_change_the_plan_and_say_so(calibrated):
    job = calibrated / "job.yaml"
    job.write_text("model: llama-3-8b\ncluster: cluster.yaml\nglobal_batch_size: 64\nseq_length: 4096\n")
    plain = job.parent / "plain.yaml"
    plain.write_text(yaml.safe_dump({"nodes": 2, **H100_NODES}))
    reports = {}
    for name, cluster in (("measured", "cluster.yaml"), ("plain", "plain.yaml")):
        result = runner.invoke(app, ["evaluate", str(job), "--cluster", str(job.parent / cluster), "--tp", "8", "--json"])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(result.stdout)["plans"][0]
    assert reports["measured"]["sources"]["links"] == "measured" and reports["plain"]["sources"]["links"] == "estimated"
    # DP 2 over the two nodes: the gradient reduce runs at the measured NIC efficiency.
    measured_s, plain_s = (reports[name]["schedule"]["dp_reduce_s"][0] for name in ("measured", "plain"))
    assert measured_s < plain_s * 0.995


def _cell(document: dict, run: int, row: int, placement: str = "out_of_place") -> dict:
    return document["runs"][run]["rows"][row][placement]


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.__setitem__("runs", [{**d["runs"][1], "gpus": d["runs"][1]["gpus"][:1]}]), "runs"),  # one GPU: nothing measured
    (lambda d: d.__setitem__("kind", "links"), "kind"),
    (lambda d: d.__setitem__("schema_version", 2), "schema_version"),
    (lambda d: d.__setitem__("runs", []), "runs"),
    # impossible numbers, which would otherwise become the links' efficiency (JSON's NaN, Infinity)
    (lambda d: _cell(d, 0, -1).__setitem__("busbw_GBps", float("nan")), "runs.0.rows.30.out_of_place.busbw_GBps"),
    (lambda d: _cell(d, 1, -1).__setitem__("busbw_GBps", float("inf")), "runs.1.rows.30.out_of_place.busbw_GBps"),
    (lambda d: _cell(d, 0, 4, "in_place").__setitem__("algbw_GBps", -1.0), "runs.0.rows.4.in_place.algbw_GBps"),
    (lambda d: _cell(d, 0, 4).__setitem__("time_us", 0.0), "runs.0.rows.4.out_of_place.time_us"),
    (lambda d: _cell(d, 1, 2).__setitem__("wrong", 7), "runs.1.rows.2.out_of_place.wrong"),  # a failed result check
    (lambda d: _cell(d, 0, -1).__setitem__("busbw_GBps", 0.0), "runs.0.rows"),  # 16 GPUs that moved nothing: efficiency 0
    (lambda d: d["runs"][0].__setitem__("avg_busbw_GBps", -5.0), "runs.0.avg_busbw_GBps"),
    # a busbw nccl-tests cannot print: beyond its largest bus factor times algbw
    (lambda d: _cell(d, 0, -1).__setitem__("busbw_GBps", 99999.0), "runs.0.rows.30"),
])
def test_unusable_nccl_tests_profiles_exit_2(calibrated, edit, field):
    document = json.loads((calibrated / "nccl.json").read_text())
    edit(document)
    (calibrated / "nccl.json").write_text(json.dumps(document))
    result = runner.invoke(app, ["evaluate", "--cluster", str(calibrated / "cluster.yaml")])
    assert result.exit_code == 2 and field in result.output and "nccl.json" in result.output


def test_a_missing_nccl_tests_file_names_the_cluster_field(tmp_path):
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"nodes": 2, **H100_NODES, "nccl_tests": "absent.json"}))
    result = runner.invoke(app, ["evaluate", "--cluster", str(tmp_path / "cluster.yaml")])
    assert result.exit_code == 2 and "nccl_tests" in result.output


@pytest.mark.parametrize("cluster, reason", [
    ({"nics_per_node": 1, "nic_Gbps": 25}, "beyond the 2x"),  # the log moved 100x what these NICs carry
    ({"gpu": "A100"}, "ran on NVIDIA H100"),
])
def test_a_profile_of_another_cluster_is_refused(calibrated, cluster, reason):
    """A profile whose bus bandwidth the declared links cannot carry, or
    measured on another GPU, calibrates nothing: exit 2 naming nccl_tests,
    not links priced as free."""
    (calibrated / "cluster.yaml").write_text(yaml.safe_dump({"nodes": 2, **H100_NODES, **cluster, "nccl_tests": "nccl.json"}))
    result = runner.invoke(app, ["evaluate", "--cluster", str(calibrated / "cluster.yaml")])
    assert result.exit_code == 2 and "nccl_tests" in result.output and reason in result.output, result.output


def test_what_a_run_measures_follows_the_nodes_it_ran_on(calibrated):
    """A run across the trays of one NVLink domain measures NVLink; a lone
    GPU pair across nodes uses a whole NIC where a node has fewer NICs than
    GPUs; a node's own NIC rate (node_overrides) is its line rate."""
    def load(**fields):
        (calibrated / "cluster.yaml").write_text(yaml.safe_dump({"nodes": 2, **H100_NODES, **fields, "nccl_tests": "nccl.json"}))
        return load_cluster(calibrated / "cluster.yaml")

    domain = load(nvlink_domain_nodes=2)  # both logs ran inside the one domain
    assert domain.nodes[0].nvlink_efficiency == pytest.approx((_largest_busbw(ALL_REDUCE) + _largest_busbw(SENDRECV)) / 2 / 450)
    assert domain.nodes[0].nic_efficiency == NIC_EFFICIENCY
    overridden = load(nic_Gbps=100, node_overrides=[{"node": 0, "nic_Gbps": 400}, {"node": 1, "nic_Gbps": 400}])
    assert overridden.nodes[0].nic_efficiency == pytest.approx(load().nodes[0].nic_efficiency)
    document = json.loads((calibrated / "nccl.json").read_text())
    (calibrated / "nccl.json").write_text(json.dumps({**document, "runs": document["runs"][1:]}))  # the sendrecv log alone
    assert load(nics_per_node=2).nodes[0].nic_efficiency == pytest.approx(_largest_busbw(SENDRECV) / 50)
