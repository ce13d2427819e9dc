"""``loom explain``: the saved plan re-simulated, its tables, and figures whose
drawn bars are the simulated events."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.cli.figures import COLOURS, timeline_figure
from loom.planner.output.report import Report
from loom.planner.schedule.simulate import simulate

runner = CliRunner()
CLUSTER = {"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory) -> Path:
    """A planned Llama-3 8B job with a 4-stage pipeline, written by loom plan --out."""
    folder = tmp_path_factory.mktemp("plan")
    (folder / "cluster.yaml").write_text(yaml.safe_dump(CLUSTER))
    job = {"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 32, "seq_length": 4096,
           "search": {"tp": [2], "pp": [4], "cp": [1], "vpp": [1], "micro_batch_size": [1]}, "top_k": 3}
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    result = runner.invoke(app, ["plan", str(folder / "job.yaml"), "--out", str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder / "out" / "plan.json"


def test_explain_shows_the_breakdown_and_stages(plan_json):
    result = runner.invoke(app, ["explain", str(plan_json)])
    assert result.exit_code == 0, result.output
    report = json.loads(plan_json.read_text())
    assert report["plans"][0]["label"].split()[0] in result.stdout
    assert "compute_backward" in result.stdout and "1f1b" in result.stdout
    assert all(f"│     {s} │" in result.stdout for s in range(4))  # one row per stage


def test_the_saved_schedule_resimulates_to_the_plans_step(plan_json):
    """plan.json carries what was simulated: simulating it again gives the
    plan's pipeline, and the in-flight counts 1F1B is known for (pp - s)."""
    plan = Report.model_validate_json(plan_json.read_text()).plans[0]
    simulation = simulate(plan.schedule.costs(), plan.schedule.name)
    assert list(simulation.peak_in_flight) == plan.schedule.peak_in_flight == [4, 3, 2, 1]
    extras = plan.predicted.breakdown_s["dp_param_gather"] + plan.predicted.breakdown_s["embedding_sync"]
    assert simulation.step_time_s + extras == pytest.approx(plan.predicted.step_time_s, rel=1e-9)


def test_timeline_bars_are_the_simulated_events(plan_json):
    """Read the figure back: one bar per event, in its stage's row, from its
    start to its end, in its kind's colour; idle rows behind them."""
    from matplotlib.colors import to_hex

    plan = Report.model_validate_json(plan_json.read_text()).plans[0]
    simulation = simulate(plan.schedule.costs(), "1f1b")
    fig = timeline_figure(simulation, "test")
    bars = [patch for patch in fig.axes[0].patches if patch.get_gid() in COLOURS]
    assert len(bars) == len(simulation.events)
    for bar, event in zip(bars, simulation.events):
        assert bar.get_gid() == event.kind
        assert to_hex(bar.get_facecolor()) == COLOURS[event.kind].lower()
        assert bar.get_x() == pytest.approx(event.start_s) and bar.get_width() == pytest.approx(event.end_s - event.start_s)
        assert round(bar.get_y() + bar.get_height() / 2) == event.stage
    idle = [patch for patch in fig.axes[0].patches if patch.get_gid() == "idle"]
    assert len(idle) == 4 and all(patch.get_width() == pytest.approx(simulation.step_time_s) for patch in idle)
    assert {"F", "B", "dp"} <= {event.kind for event in simulation.events}


def test_timeline_and_candidates_files_open(plan_json, tmp_path):
    png, svg, html, chart = tmp_path / "t.png", tmp_path / "t.svg", tmp_path / "t.html", tmp_path / "c.png"
    for path in (png, svg, html):
        assert runner.invoke(app, ["explain", str(plan_json), "--timeline", str(path), "--candidates", str(chart)]).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.read_bytes()[:4] == b"\x89PNG"
    assert ElementTree.parse(svg).getroot().tag.endswith("svg")
    text = html.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "</html>" in text


def test_zero_bubble_schedule_shrinks_the_bubble(plan_json):
    result = runner.invoke(app, ["explain", str(plan_json), "--schedule", "zb-h1"])
    assert result.exit_code == 0, result.output
    plan = Report.model_validate_json(plan_json.read_text()).plans[0]
    costs = plan.schedule.costs()
    assert simulate(costs, "zb-h1").pipeline_time_s < simulate(costs, "1f1b").pipeline_time_s
    assert "zb-h1: pipeline" in result.stdout


def test_bad_inputs_exit_2(plan_json, tmp_path):
    assert runner.invoke(app, ["explain", str(tmp_path / "missing.json")]).exit_code == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert runner.invoke(app, ["explain", str(broken)]).exit_code == 2
    assert runner.invoke(app, ["explain", str(plan_json), "--plan", "99"]).exit_code == 2
    assert runner.invoke(app, ["explain", str(plan_json), "--schedule", "wavy"]).exit_code == 2
    assert runner.invoke(app, ["explain", str(plan_json), "--timeline", str(tmp_path / "t.gif")]).exit_code == 2
