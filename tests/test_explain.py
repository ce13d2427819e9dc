"""``loom explain``: the saved plan checked and re-simulated, its tables, and
figures whose drawn bars are the simulated events.

Invalid plan.json files are made by mutating one that ``loom plan --out``
wrote; each must exit 2 with one line naming the file, the field and what
was expected."""

from __future__ import annotations

import copy
import json
import re
import math
import xml.etree.ElementTree as ElementTree
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import yaml
from matplotlib.colors import to_hex
from typer.testing import CliRunner

from loom.cli.app import app
from loom.cli.figures import BEST_COLOUR, COLOURS, candidates_figure, ops_per_window, timeline_figure, timeline_windows
from loom.planner.output.report import SCHEMA_FILE, read_report
from loom.planner.schedule.simulate import COMPUTE_KINDS, MAX_OPS, simulate

runner = CliRunner()
CLUSTER = {"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory) -> Path:
    """A planned Llama-3 8B job with a 4-stage pipeline (TP2 PP4 DP2, 16 micro
    batches, 32 layers, three plans), written by loom plan --out."""
    folder = tmp_path_factory.mktemp("plan")
    (folder / "cluster.yaml").write_text(yaml.safe_dump(CLUSTER))
    job = {"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 32, "seq_length": 4096,
           "search": {"tp": [2], "pp": [4], "cp": [1], "vpp": [1], "micro_batch_size": [1]}, "top_k": 3}
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    result = runner.invoke(app, ["plan", str(folder / "job.yaml"), "--out", str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder / "out" / "plan.json"


def explain(*args: object):
    return runner.invoke(app, ["explain", *map(str, args)])


def one_line(result) -> str:
    """The command's message: exactly one line on stderr, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def mutated(plan_json: Path, folder: Path, change) -> Path:
    """A copy of plan.json with ``change(report dict)`` applied (NaN and
    Infinity written as Python's json module writes them)."""
    report = json.loads(plan_json.read_text())
    change(report)
    path = folder / "plan.json"
    path.write_text(json.dumps(report))
    return path


def drawn_bars(fig) -> list[tuple[str, float, float, float, str, int]]:
    """Every rectangle of the timeline's collections: (gid, x, width, y centre,
    colour, axes index), in drawing order."""
    bars = []
    for index, ax in enumerate(fig.axes):
        for collection in ax.collections:
            colour = to_hex(collection.get_facecolor()[0])
            for path in collection.get_paths():
                box = path.get_extents()
                bars.append((collection.get_gid(), box.x0, box.width, (box.y0 + box.y1) / 2, colour, index))
    return bars


# --- what explain shows ---------------------------------------------------------


def test_explain_shows_the_breakdown_and_stages(plan_json):
    result = explain(plan_json)
    assert result.exit_code == 0, result.output
    report = json.loads(plan_json.read_text())
    assert report["plans"][0]["label"].split()[0] in result.stdout
    assert "compute_backward" in result.stdout and "1f1b" in result.stdout
    stage_rows = [line.split() for line in result.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+", line)]
    assert [int(row[0]) for row in stage_rows] == list(range(4))  # one row per stage, first its index


def test_the_saved_schedule_resimulates_to_the_plans_step(plan_json):
    """plan.json carries what was simulated: simulating it again gives the
    plan's pipeline, and the in-flight counts 1F1B is known for (pp - s)."""
    plan = read_report(plan_json).plans[0]
    simulation = simulate(plan.schedule.costs(), plan.schedule.name)
    assert list(simulation.peak_in_flight) == plan.schedule.peak_in_flight == [4, 3, 2, 1]
    extras = sum(plan.predicted.breakdown_s[part] for part in ("dp_param_gather", "embedding_sync", "overlap_contention"))
    assert simulation.step_time_s + extras == pytest.approx(plan.predicted.step_time_s, rel=1e-9)


def test_zero_bubble_schedule_shrinks_the_bubble(plan_json):
    result = explain(plan_json, "--schedule", "zb-h1")
    assert result.exit_code == 0, result.output
    costs = read_report(plan_json).plans[0].schedule.costs()
    assert simulate(costs, "zb-h1").pipeline_time_s < simulate(costs, "1f1b").pipeline_time_s
    assert "zb-h1: pipeline" in result.stdout


def test_another_schedules_memory_is_its_own(plan_json):
    """GPipe holds all 16 micro batches on every stage where 1F1B holds
    pp - s: the stage table shows the peak it would have, not the plan's."""
    stage_rows = {}
    for schedule in ("1f1b", "gpipe"):
        result = explain(plan_json, "--schedule", schedule)
        assert result.exit_code == 0, result.output
        stage_rows[schedule] = [line.split() for line in result.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+", line)]
    plan = read_report(plan_json).plans[0]
    per_microbatch = [stage.activation_bytes for stage in plan.schedule.costs().stages[0]][0]  # stage 0's one chunk
    one_f_one_b, gpipe = (float(stage_rows[name][0][2]) for name in ("1f1b", "gpipe"))
    assert gpipe - one_f_one_b == pytest.approx((16 - 4) * per_microbatch / 2**30, abs=0.06)
    assert [row[4] for row in stage_rows["gpipe"]] == ["16"] * 4


def test_each_stage_is_judged_against_its_own_gpu(tmp_path):
    """On a cluster of 40 GB A100s beside 80 GB H100s plan.json carries each
    stage's capacity (schema 1.8) and explain shows and judges each stage by
    it, not by the peak stage's GPU."""
    cluster = {**CLUSTER, "nodes": 4, "node_overrides": [{"node": 0, "gpu": "A100-SXM4-40GB"}, {"node": 1, "gpu": "A100-SXM4-40GB"}]}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    job = {"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 32, "seq_length": 4096,
           "search": {"pp": [4], "vpp": [1]}, "top_k": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = runner.invoke(app, ["plan", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    memory = read_report(tmp_path / "out" / "plan.json").plans[0].memory
    assert len(set(memory.per_stage_capacity_bytes)) == 2
    shown = explain(tmp_path / "out" / "plan.json")
    rows = [line.split() for line in shown.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+", line)]
    assert [float(row[3]) for row in rows] == [round(capacity / 2**30, 1) for capacity in memory.per_stage_capacity_bytes]


def test_explain_is_its_own_module_registered_on_the_app():
    import loom.cli.app as app_module
    import loom.cli.explain as explain_module

    assert not hasattr(app_module, "_read_report")
    command = next(c for c in app.registered_commands if c.name == "explain")
    assert command.callback is explain_module.explain


# --- the timeline -----------------------------------------------------------------


def test_timeline_bars_are_the_simulated_events(plan_json):
    """A short schedule is drawn whole, one axes: one bar per event, in its
    stage's row, from its start to its end, in its kind's colour, over an
    idle bar per stage spanning the step."""
    plan = read_report(plan_json).plans[0]
    simulation = simulate(plan.schedule.costs(), "1f1b")
    assert timeline_windows(simulation) == ((0.0, simulation.step_time_s),)
    fig = timeline_figure(simulation, "test")
    assert len(fig.axes) == 1
    bars = drawn_bars(fig)
    events = [bar for bar in bars if bar[0] in COLOURS]
    assert len(events) == len(simulation.events)
    drawn = sorted(events, key=lambda bar: (round(bar[3]), bar[1], bar[0]))
    expected = sorted(simulation.events, key=lambda e: (e.stage, e.start_s, e.kind))
    for (gid, x, width, centre, colour, _), event in zip(drawn, expected):
        assert gid == event.kind and colour == COLOURS[event.kind].lower()
        assert x == pytest.approx(event.start_s) and width == pytest.approx(event.end_s - event.start_s)
        assert round(centre) == event.stage
    idle = [bar for bar in bars if bar[0] == "idle"]
    assert len(idle) == 4 and all(bar[2] == pytest.approx(simulation.step_time_s) for bar in idle)
    assert {"F", "B", "dp"} <= {event.kind for event in simulation.events}


def test_a_long_timeline_is_drawn_in_two_bounded_windows(plan_json):
    """4,096 micro batches on 4 stages (16,384 ops): the figure draws the
    start and the end of the step, at most ops_per_window compute ops of each
    stage in each, the first op of every stage and its reduce and optimizer
    among them, and says in its title how many ops it left out."""
    costs = replace(read_report(plan_json).plans[0].schedule.costs(), microbatches=4096)
    simulation = simulate(costs, "1f1b")
    rows = [[e for e in simulation.events if e.stage == s and e.kind in COMPUTE_KINDS] for s in range(4)]
    per_window = ops_per_window(rows)
    assert per_window == 4 + 16  # 1F1B: stage 0 runs pp = 4 forwards before its first backward (STEADY_OPS_SHOWN 16)
    windows = timeline_windows(simulation)
    assert len(windows) == 2 and windows[0][0] == 0.0 and windows[1][1] == simulation.step_time_s
    assert windows[0][1] < windows[1][0]

    fig = timeline_figure(simulation, "big")
    assert len(fig.axes) == 2
    bars = drawn_bars(fig)
    for index in (0, 1):
        for stage in range(4):
            compute = [b for b in bars if b[5] == index and b[0] in COMPUTE_KINDS and round(b[3]) == stage]
            assert 0 < len(compute) <= per_window
    assert len([b for b in bars if b[0] != "idle"]) <= 4 * 2 * (2 * per_window + 2)  # compute, a send each, dp, optimizer
    start, end = windows
    assert all(b[1] < start[1] and b[1] + b[2] > start[0] for b in bars if b[5] == 0 and b[0] != "idle")
    assert all(b[1] < end[1] and b[1] + b[2] > end[0] for b in bars if b[5] == 1 and b[0] != "idle")
    firsts = [row[0] for row in rows]
    assert all(any(b[5] == 0 and b[0] == "F" and b[1] == pytest.approx(e.start_s) and round(b[3]) == e.stage for b in bars) for e in firsts)
    assert {b[0] for b in bars if b[5] == 1} >= {"B", "dp", "optimizer"}
    total = sum(map(len, rows))
    drawn = sum(1 for b in bars if b[0] in COMPUTE_KINDS)
    assert f"{total - drawn:,} of {total:,} compute ops in between not drawn" in fig._suptitle.get_text()


def test_a_long_timeline_file_is_written(plan_json, tmp_path):
    """The command draws a plan of 2,048 micro batches (8,192 ops) to PNG and HTML."""
    def bigger(report):
        plan = report["plans"][0]
        plan["parallel"]["global_batch_size"] = 2048 * plan["parallel"]["micro_batch_size"] * plan["parallel"]["dp"]
        plan["schedule"]["microbatches"] = 2048

    path = mutated(plan_json, tmp_path, bigger)
    for name in ("t.png", "t.html"):
        result = explain(path, "--timeline", tmp_path / name)
        assert result.exit_code == 0, result.output
        assert f"wrote {tmp_path / name}" in " ".join(result.output.split())  # says where the figure went
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compute ops in between not drawn" in (tmp_path / "t.html").read_text()


def test_timeline_and_candidates_files_open(plan_json, tmp_path):
    png, svg, html, chart = tmp_path / "t.png", tmp_path / "t.svg", tmp_path / "t.html", tmp_path / "c.png"
    for path in (png, svg, html):
        assert explain(plan_json, "--timeline", path, "--candidates", chart).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.read_bytes()[:4] == b"\x89PNG"
    assert ElementTree.parse(svg).getroot().tag.endswith("svg")
    text = html.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "</html>" in text


# --- the candidates chart ----------------------------------------------------------------


def test_candidates_chart_spans_the_values_and_labels_them(plan_json):
    plans = read_report(plan_json).plans
    times = [plan.predicted.step_time_s for plan in plans]
    fig = candidates_figure([plan.label for plan in plans], times, "test")
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    assert 0 < low < min(times) and high > max(times)
    assert (max(times) - min(times)) / (high - low) > 0.5  # the differences fill the axis, not a sliver of it
    values = [text.get_text() for text in ax.texts]
    assert len(values) == len(times)
    for value, seconds in zip(values, times):
        assert value.startswith(f"{seconds:.3f} s")
    best = times.index(min(times))
    assert values[best].endswith("best") and sum("best" in value for value in values) == 1
    assert to_hex(ax.patches[best].get_facecolor()) == BEST_COLOUR.lower()
    assert {to_hex(patch.get_facecolor()) for i, patch in enumerate(ax.patches) if i != best} == {COLOURS["F"].lower()}
    assert [label.get_text() for label in ax.get_yticklabels()] == [f"{i + 1}. {plan.label}" for i, plan in enumerate(plans)]


def test_thirty_candidates_keep_their_labels_apart():
    """~30 candidates: layout labels and value labels do not overlap, and
    values that differ only in the fourth decimal print differently."""
    times = [10.0 + 0.0004 * i for i in range(30)]
    labels = [f"TP{i % 8 + 1} PP{i % 4 + 1}x{i % 3 + 1} DP{64 // (i % 8 + 1)} CP2 mbs1 SP sel DO" for i in range(30)]
    fig = candidates_figure(labels, times, "thirty")
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    for texts in (ax.get_yticklabels(), ax.texts):
        boxes = sorted((text.get_window_extent(renderer) for text in texts), key=lambda box: box.y0)
        assert len(boxes) == 30
        assert all(lower.y1 <= upper.y0 + 0.5 for lower, upper in zip(boxes, boxes[1:]))
    assert len({text.get_text().split()[0] for text in ax.texts}) == 30
    assert ax.get_xlim()[0] > 9.9


# --- invalid plan.json: exit 2, one line naming the file, the field and what was expected ---------


def _set(*path_and_value):
    *path, value = path_and_value

    def change(report):
        target = report
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value

    return change


def _drop_last(*path):
    def change(report):
        target = report
        for key in path:
            target = target[key]
        target.pop()

    return change


def _duplicate_gpu(report):
    """The second node's run starts on the first node's last GPU."""
    first, second = report["plans"][0]["placement"]
    second.update(host=first["host"], gpu=first["gpu"] + first["count"] - 1)


def _swap_ranks(report):
    placement = report["plans"][0]["placement"]
    placement[0]["rank"], placement[1]["rank"] = placement[1]["rank"], placement[0]["rank"]


def _shorter_model(report):
    """Plan 2 splits one layer fewer than plan 1 (its last chunk loses one)."""
    last = report["plans"][1]["stages"][-1]
    last["layer_ranges"][-1][1] -= 1
    last["layers"] -= 1


INVALID = {
    "a stage beyond its own GPU in a plan that fits": (_set("plans", 0, "memory", "per_stage_capacity_bytes", 1, 1000), "plans.0.memory.fits",
                                                       "stage 1's peak is beyond its per_stage_capacity_bytes"),
    "unknown schema version": (_set("schema_version", "9.9"), "schema_version", "'1.0', '1.1', '1.2', '1.3', '1.4', '1.5', '1.6', '1.7' or '1.8'"),
    "tp 0": (_set("plans", 0, "parallel", "tp", 0), "plans.0.parallel.tp", "greater than or equal to 1"),
    "pp 0": (_set("plans", 0, "parallel", "pp", 0), "plans.0.parallel.pp", "greater than or equal to 1"),
    "dp 0": (_set("plans", 0, "parallel", "dp", 0), "plans.0.parallel.dp", "greater than or equal to 1"),
    "cp 0": (_set("plans", 0, "parallel", "cp", 0), "plans.0.parallel.cp", "greater than or equal to 1"),
    "ep -1": (_set("plans", 0, "parallel", "ep", -1), "plans.0.parallel.ep", "greater than or equal to 1"),
    "ep not dividing a stage": (_set("plans", 0, "parallel", "ep", 3), "plans.0.parallel.ep", "a divisor of a stage's tp x cp x dp = 4"),
    "world over the cluster": (_set("gpus", 8), "plans.0.parallel", "tp x pp x dp x cp at most the cluster's 8 GPUs"),
    "placement shorter than the world": (_drop_last("plans", 0, "placement"), "plans.0.placement", "16 slots, one per rank"),
    "two ranks on one GPU": (_duplicate_gpu, "plans.0.placement.1", "a GPU of its own (rank 7 runs on"),
    "placement out of rank order": (_swap_ranks, "plans.0.placement.0.rank", "0 (runs in rank order)"),
    "device group not the stage's ranks": (_set("plans", 0, "stages", 1, "device_group", [0, 1, 2, 3]), "plans.0.stages.1.device_group",
                                           "global ranks 4 to 7"),
    "stage ranks not the stage's": (_set("plans", 0, "stages", 1, "ranks", [0, 4]), "plans.0.stages.1.ranks", "global ranks 4 to 7"),
    "a stage missing": (_drop_last("plans", 0, "stages"), "plans.0.stages", "4 stages (parallel.pp)"),
    "layers not those of the ranges": (_set("plans", 0, "stages", 1, "layers", lambda n: n + 1), "plans.0.stages.1.layers", "layers of its layer_ranges"),
    "a gap between layer ranges": (_set("plans", 0, "stages", 2, "layer_ranges", lambda r: [[r[0][0] + 1, r[0][1]]]), "plans.0.stages.2.layer_ranges.0",
                                   "starts where model chunk 1 ends"),
    "plans of different models": (_shorter_model, "plans.1.stages", "32 decoder layers in all"),
    "negative layers": (_set("plans", 0, "stages", 0, "layers", -1), "plans.0.stages.0.layers", "greater than or equal to 0"),
    "capacity 0": (_set("plans", 0, "memory", "capacity_bytes", 0), "plans.0.memory.capacity_bytes", "greater than 0"),
    "a number as text": (_set("plans", 0, "parallel", "dp", "4"), "plans.0.parallel.dp", "a valid integer"),
    "NaN step time": (_set("plans", 0, "predicted", "step_time_s", math.nan), "plans.0.predicted.step_time_s", "finite number"),
    "infinite bytes": (_set("plans", 0, "memory", "peak_bytes_per_gpu", math.inf), "plans.0.memory.peak_bytes_per_gpu", "finite number"),
    "NaN in a breakdown": (_set("plans", 0, "memory", "breakdown_bytes", "weights", math.nan), "plans.0.memory.breakdown_bytes.weights",
                           "finite number"),
    "negative chunk time": (_set("plans", 0, "schedule", "stages", 0, 0, "forward_s", -1.0), "plans.0.schedule.stages.0.0.forward_s",
                            "greater than or equal to 0"),
    "infinite p2p": (_set("plans", 0, "schedule", "p2p_s", math.inf), "plans.0.schedule.p2p_s", "finite number"),
    "weight grad over backward": (_set("plans", 0, "schedule", "stages", 1, 0, "weight_grad_s", 1e3), "plans.0.schedule.stages.1.0.weight_grad_s",
                                  "at most backward_s"),
    "micro batches not the batch's": (_set("plans", 0, "schedule", "microbatches", 3), "plans.0.schedule.microbatches",
                                      "global_batch_size / (micro_batch_size x dp) = 16"),
    "zero micro batches": (_set("plans", 0, "schedule", "microbatches", 0), "plans.0.schedule.microbatches", "greater than or equal to 1"),
    "a chunk too many": (_set("plans", 0, "schedule", "stages", 0, lambda chunks: chunks * 2), "plans.0.schedule.stages.0", "1 chunks (parallel.vpp)"),
    "a reduce missing": (_drop_last("plans", 0, "schedule", "dp_reduce_s"), "plans.0.schedule.dp_reduce_s", "one entry per stage (4) or none"),
    "unknown schedule": (_set("plans", 0, "schedule", "name", "wavy"), "plans.0.schedule.name", "'gpipe', '1f1b', 'interleaved' or 'zb-h1'"),
    "no plans": (_set("plans", []), "plans", "at least one plan"),
    # figures that contradict each other: explain would show shares adding to 116%, MFU 200%, a plan that fits and does not
    "a breakdown part beyond the step": (_set("plans", 0, "predicted", "breakdown_s", "foo_bar", 1.0), "plans.0.predicted.step_time_s",
                                         "the sum of breakdown_s"),
    "a step time not its parts'": (_set("plans", 0, "predicted", "step_time_s", 100.0), "plans.0.predicted.step_time_s", "the sum of breakdown_s"),
    # a schema 1.6 report of an ETP 2 plan: its parallel had no etp, which reads back as 1
    "etp not the label's": (_set("plans", 0, "label", lambda label: label + " ETP2"), "plans.0.parallel.etp", "2, as the label says"),
    "MFU over 1": (_set("plans", 0, "predicted", "mfu", 2.0), "plans.0.predicted.mfu", "at most 1"),
    "a peak not its parts'": (_set("plans", 0, "memory", "peak_bytes_per_gpu", lambda b: 2 * b), "plans.0.memory.peak_bytes_per_gpu",
                              "the sum of breakdown_bytes"),
    "fits beyond capacity": (_set("plans", 0, "memory", "capacity_bytes", 1), "plans.0.memory.fits", "false: peak_bytes_per_gpu is beyond"),
    "an unknown field": (_set("plans", 0, "predicted", "tflops", 1.0), "plans.0.predicted.tflops", "did you mean 'tflops_per_gpu'"),
    # names loom does not know: explain would print them as if planned
    "an unknown framework": (_set("framework", "jax"), "framework", "'megatron', 'deepspeed' or 'torchtitan'"),
    "an unknown precision": (_set("precision", "int3"), "precision", "'bf16', 'fp16', 'fp8'"),
    "an unknown stack": (_set("stack", "nemo"), "stack", "one of megatron-lm"),
    "an unknown feature": (_set("features", "flash_atention", True), "features.flash_atention", "a feature loom names"),
    "a feature of the wrong type": (_set("features", "flash_attention", "yes"), "features.flash_attention", "valid boolean"),
    "a feature out of range": (_set("features", "moe_load_imbalance", -5.0), "features.moe_load_imbalance", "busiest/mean ratios from 1"),
}


@pytest.mark.parametrize("kind", list(INVALID))
def test_an_invalid_plan_json_exits_2_naming_the_field(plan_json, tmp_path, kind):
    change, field, expected = INVALID[kind]
    path = mutated(plan_json, tmp_path, change)
    result = explain(path)
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert str(path) in line and f"field '{field}'" in line and expected in line, line


def test_every_problem_is_named_at_once(plan_json, tmp_path):
    def two(report):
        report["plans"][0]["parallel"]["tp"] = 0
        report["plans"][2]["schedule"]["p2p_s"] = math.nan

    line = one_line(explain(mutated(plan_json, tmp_path, two)))
    assert "2 problems" in line and "plans.0.parallel.tp" in line and "plans.2.schedule.p2p_s" in line


def test_a_schedule_the_plan_cannot_run_is_blamed_on_the_file(plan_json, tmp_path):
    path = mutated(plan_json, tmp_path, _set("plans", 0, "schedule", "name", "interleaved"))
    result = explain(path)
    assert result.exit_code == 2
    line = one_line(result)
    assert str(path) in line and "plans.0.schedule.name" in line and "vpp >= 2" in line
    assert "--schedule" in one_line(explain(plan_json, "--schedule", "interleaved"))


def test_the_shipped_schema_carries_the_field_constraints(plan_json):
    report = json.loads(plan_json.read_text())
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.validate(report, schema)
    for change in (_set("plans", 0, "parallel", "tp", 0), _set("plans", 0, "memory", "capacity_bytes", 0), _set("schema_version", "9.9"), _set("plans", []),
                   _set("plans", 0, "schedule", "stages", 0, 0, "forward_s", -1.0)):
        broken = copy.deepcopy(report)
        change(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_a_1_0_report_still_reads(plan_json, tmp_path):
    """1.1 only added fields with defaults: a 1.0 report (without them) is explained."""
    def version_1_0(report):
        report["schema_version"] = "1.0"
        for plan in report["plans"]:
            for field in ("required_headroom_bytes", "fits"):
                del plan["memory"][field]
            for field in ("recompute_modules", "recompute_num_layers"):
                del plan["parallel"][field]

    result = explain(mutated(plan_json, tmp_path, version_1_0))
    assert result.exit_code == 0, result.output


# --- the simulation's size is bounded before simulating -----------------------------------


def _microbatches(count: int):
    def change(report):
        plan = report["plans"][0]
        plan["parallel"]["global_batch_size"] = count * plan["parallel"]["micro_batch_size"] * plan["parallel"]["dp"]
        plan["schedule"]["microbatches"] = count

    return change


def test_ten_million_micro_batches_exit_2_before_simulating(plan_json, tmp_path, monkeypatch):
    """A consistent plan of 10^7 micro batches on 4 stages (4 x 10^7 ops) is
    refused by the size bound, without simulating (simulate is made to fail)."""
    def never(*args, **kwargs):
        raise AssertionError("simulated a plan over the bound")

    monkeypatch.setattr("loom.cli.explain.simulate", never)
    path = mutated(plan_json, tmp_path, _microbatches(10**7))
    result = explain(path, "--timeline", tmp_path / "t.png")
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert str(path) in line and "plans.0.schedule.microbatches" in line
    assert f"at most {MAX_OPS // 4:,} micro batches" in line and f"{MAX_OPS:,} ops" in line and "10000000" in line
    assert not (tmp_path / "t.png").exists()


def test_the_bound_is_inclusive(plan_json, tmp_path, monkeypatch):
    """The fixture's 4 stages x 16 micro batches = 64 ops: explained under a
    bound of 64, refused under 63."""
    monkeypatch.setattr("loom.cli.explain.MAX_OPS", 64)
    assert explain(plan_json).exit_code == 0
    monkeypatch.setattr("loom.cli.explain.MAX_OPS", 63)
    result = explain(plan_json)
    assert result.exit_code == 2 and "at most 15 micro batches" in one_line(result)


# --- bad arguments ---------------------------------------------------------------------------


def test_bad_inputs_exit_2(plan_json, tmp_path):
    assert explain(tmp_path / "missing.json").exit_code == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert explain(broken).exit_code == 2
    assert explain(plan_json, "--plan", "99").exit_code == 2
    assert explain(plan_json, "--schedule", "wavy").exit_code == 2
    assert explain(plan_json, "--timeline", tmp_path / "t.gif").exit_code == 2


def test_a_1_4_report_with_rank_lists_still_reads(plan_json, tmp_path):
    """Before 1.5 a placement listed every rank and a stage every rank of
    its group: such a report is explained as it was."""
    def version_1_4(report):
        report["schema_version"] = "1.4"
        for plan in report["plans"]:
            plan["placement"] = [{"rank": run["rank"] + k, "host": run["host"], "gpu": run["gpu"] + k}
                                 for run in plan["placement"] for k in range(run["count"])]
            for stage in plan["stages"]:
                stage["device_group"] = list(range(*stage.pop("ranks")))

    result = explain(mutated(plan_json, tmp_path, version_1_4))
    assert result.exit_code == 0, result.output
