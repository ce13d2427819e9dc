"""Rack-scale NVLink domains (GB200/GB300 NVL72: 18 nodes of 4 GPUs share one
NVLink fabric): groups inside a domain talk over NVLink, only what leaves it
takes the NICs; and what the cluster file may say about them."""

from __future__ import annotations

import pytest

from loom.planner.cost.network import all_to_all_link, group_link, pipeline_link
from loom.planner.plan import evaluate
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model

NVL72 = {"nodes": 36, "gpus_per_node": 4, "gpu": "GB200", "nvlink_GBps": 900, "nics_per_node": 4, "nic_Gbps": 400, "nvlink_domain_nodes": 18}


def node(**change):
    return parse_cluster({**NVL72, **change}, "nvl72").slowest


def test_groups_inside_the_domain_stay_on_nvlink():
    rack, trays = node(), node(nvlink_domain_nodes=1)
    assert rack.domain_gpus == 72 and trays.domain_gpus == 4
    assert group_link(rack, 8, 1).kind == "nvlink" and group_link(trays, 8, 1).kind == "network"
    assert pipeline_link(rack, 8, 9).kind == "nvlink" and pipeline_link(rack, 8, 18).kind == "network"
    # An all-to-all over 72 GPUs of one rack stays in it; over 144 half of it leaves.
    assert all_to_all_link(rack, 72, 1) == (group_link(rack, 2, 1), 0.0)
    link, remote = all_to_all_link(rack, 144, 1)
    assert link.kind == "network" and remote == pytest.approx(0.5)
    # Groups of 16 do not tile 72 GPUs: one straddles two racks, so they are
    # priced by their nodes (the slowest group sets the pace).
    assert all_to_all_link(rack, 16, 1) == all_to_all_link(trays, 16, 1)
    # Beyond the domain the ring leaves through the NICs of a whole domain's members.
    assert group_link(rack, 144, 1).bandwidth_GBps > group_link(trays, 144, 1).bandwidth_GBps


def test_expert_parallelism_across_trays_is_faster_in_one_domain():
    layout = Layout(tp=1, pp=9, dp=16, cp=1, ep=8, micro_batch_size=1, global_batch_size=1152, distributed_optimizer=True)
    times = {}
    for domain in (1, 18):
        cluster = parse_cluster({**NVL72, "nvlink_domain_nodes": domain}, "nvl72")
        job = Job(model=load_model("deepseek-v3"), cluster=cluster, global_batch_size=1152, seq_length=4096)
        times[domain] = evaluate(job, layout).step.breakdown_s["ep_comm"]
    assert times[18] < times[1] / 3


@pytest.mark.parametrize("change, expected", [
    ({"nvlink_domain_nodes": 7}, "a divisor of nodes = 36"),
    ({"node_overrides": [{"node": 3, "nic_Gbps": 200}]}, "1 with node_overrides"),
    ({"nvlink_domain_nodes": 0}, "greater than or equal to 1"),
])
def test_what_a_domain_cannot_be_is_bad_input(change, expected):
    with pytest.raises(SpecError) as error:
        parse_cluster({**NVL72, **change}, "cluster.yaml")
    assert error.value.field == "nvlink_domain_nodes" and expected in str(error.value)


def test_a_ring_across_domains_runs_one_channel_per_member_of_a_domain():
    """Beyond a domain the ring leaves it through k members' own NICs, k the
    members a domain holds (a node's, without domains): 64 per rack of 64."""
    rack = parse_cluster({**NVL72, "nodes": 32, "nvlink_domain_nodes": 16}, "nvl64").slowest
    trays = parse_cluster({**NVL72, "nodes": 32, "nvlink_domain_nodes": 1}, "trays").slowest
    across, per_node = group_link(rack, 128, 1), group_link(trays, 128, 1)
    assert across.kind == "network" and across.bandwidth_GBps == pytest.approx(min(16 * per_node.bandwidth_GBps, 900 * rack.nvlink_efficiency))


def test_slurm_asks_for_whole_domains(tmp_path):
    from typer.testing import CliRunner

    from loom.cli.app import app

    for domain, expected in ((16, "#SBATCH --segment=16"), (1, None)):
        (tmp_path / "cluster.yaml").write_text(str({**NVL72, "nodes": 32, "nvlink_domain_nodes": domain}).replace("'", '"'))
        out = tmp_path / f"out{domain}"
        result = CliRunner().invoke(app, ["evaluate", "--cluster", str(tmp_path / "cluster.yaml"), "--model", "llama-3-8b",
                                          "--global-batch-size", "256", "--seq-length", "4096", "--tp", "4", "--out", str(out)])
        assert result.exit_code == 0, result.output
        lines = (out / "slurm.sbatch").read_text().splitlines()
        assert [line for line in lines if "--segment" in line and line.startswith("#SBATCH")] == ([expected] if expected else [])
