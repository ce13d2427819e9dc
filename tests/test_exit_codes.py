"""Exit codes and output files as a new user meets them: 1 only for a failed
gate, 2 for bad input (one line naming the file or flag), 3 for no fit, 4
for a bug in loom; nothing half-written, no folder replaced that loom did
not write."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.output.files import MANIFEST

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def one_line(result) -> str:
    """The command's message: exactly one line on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_bug_exits_4_with_one_line_asking_for_a_report(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something loom did not expect")

    monkeypatch.setattr("loom.cli.app.search", broken)
    result = invoke("plan")
    assert result.exit_code == 4
    line = one_line(result)
    assert "internal error" in line and "something loom did not expect" in line and "report" in line
    assert "Traceback" not in result.output


def test_out_naming_a_file_is_bad_input(tmp_path):
    target = tmp_path / "plan"
    target.write_text("mine\n")
    result = invoke("plan", "--out", target)
    assert result.exit_code == 2 and "--out" in one_line(result)
    assert target.read_text() == "mine\n"


def test_out_holding_files_loom_did_not_write_is_refused_before_planning(tmp_path):
    (tmp_path / "notes.md").write_text("mine\n")
    result = invoke("plan", "--out", tmp_path)
    assert result.exit_code == 2
    assert "notes.md" in one_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]


def test_a_deepspeed_plan_replaces_a_megatron_set_whole(tmp_path):
    out = tmp_path / "out"
    assert invoke("plan", "--out", out).exit_code == 0
    assert (out / "train.sh").is_file()
    assert invoke("plan", "--framework", "deepspeed", "--out", out).exit_code == 0
    names = {p.name for p in out.iterdir()}
    assert "train.sh" not in names and "ds_config.json" in names
    assert set(json.loads((out / MANIFEST).read_text())) == names - {MANIFEST}


def test_out_in_a_missing_folder_is_created(tmp_path):
    out = tmp_path / "runs" / "today" / "plan"
    assert invoke("plan", "--out", out).exit_code == 0
    assert (out / "plan.json").is_file()


def test_out_where_a_file_of_the_set_is_a_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    assert invoke("plan", "--out", out).exit_code == 0
    (out / "plan.json").unlink()
    (out / "plan.json").mkdir()
    result = invoke("plan", "--out", out)
    assert result.exit_code == 2 and "plan.json" in one_line(result)


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "out"
    assert invoke("plan", "--out", out).exit_code == 0
    return out / "plan.json"


def test_a_timeline_without_matplotlib_says_how_to_install_it(plan_json, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = invoke("explain", plan_json, "--timeline", tmp_path / "t.png")
    assert result.exit_code == 2
    assert "pip install 'loom-planner[plot]'" in one_line(result)


@pytest.mark.parametrize("name", ["t.png", "x/y/t.svg"])
def test_a_timeline_in_a_new_folder_is_written(plan_json, tmp_path, name):
    result = invoke("explain", plan_json, "--timeline", tmp_path / name)
    assert result.exit_code == 0, result.output
    assert (tmp_path / name).stat().st_size > 0


def test_a_timeline_named_like_a_folder_is_bad_input(plan_json, tmp_path):
    folder = tmp_path / "figure.png"
    folder.mkdir()
    result = invoke("explain", plan_json, "--timeline", folder)
    assert result.exit_code == 2 and "--timeline" in one_line(result)
