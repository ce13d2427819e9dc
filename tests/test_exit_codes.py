"""Exit codes and output files as a new user meets them: 1 only for a failed
gate, 2 for bad input (one line naming the file or flag), 3 for no fit, 4
for a bug in loom; nothing half-written, no folder replaced that loom did
not write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.output.files import MANIFEST

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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


# --- what a new user found (review of the memory features) -------------------------------


@pytest.mark.parametrize("modules,expected", [("foo", "module names among"), ("core_attn,", "module names among"),
                                              ("CORE_ATTN", "module names among"), ("mlp,mlp", "each module once")])
def test_bad_recompute_modules_are_bad_input_naming_the_flag(modules, expected):
    result = invoke("evaluate", "--tp", 2, "--pp", 2, "--recompute", "selective", "--recompute-modules", modules)
    assert result.exit_code == 2
    line = one_line(result)
    assert "--recompute-modules" in line and expected in line


def test_recompute_modules_in_any_order_are_the_same_layout():
    reports = [json.loads(invoke("evaluate", "--tp", 2, "--pp", 2, "--recompute", "selective", "--recompute-modules", modules, "--json").stdout)
               for modules in ("mlp,core_attn", "core_attn,mlp")]
    assert reports[0]["plans"][0]["parallel"] == reports[1]["plans"][0]["parallel"]
    assert reports[0]["plans"][0]["parallel"]["recompute_modules"] == ["core_attn", "mlp"]


@pytest.mark.parametrize("args", [["--gate", "memory_headroom>=1"], ["--gate", "memory_headroom>=1.5"], ["--memory-headroom", "80 GiB"],
                                  ["--memory-headroom", "79.11 GiB"]])
def test_a_headroom_of_the_whole_gpu_is_bad_input(args):
    result = invoke("plan", *args)
    assert result.exit_code == 2
    assert "memory_headroom" in one_line(result) or "--memory-headroom" in one_line(result)


def test_the_cheapest_fix_tries_every_smaller_micro_batch():
    """TP8 PP8 at micro batch 8 does not fit; micro batch 2 does, far faster
    than recomputing everything."""
    result = invoke("evaluate", "examples/llama3-70b-h100-1024.yaml", "--tp", 8, "--pp", 8, "--mbs", 8)
    assert result.exit_code == 3
    assert "the cheapest single change that fits: --mbs" in " ".join(result.stderr.split())


def test_the_cheapest_fix_replaces_the_recompute_flags():
    result = invoke("evaluate", "examples/llama3-70b-h100-1024.yaml", "--tp", 8, "--pp", 8, "--mbs", 8, "--recompute", "full",
                    "--recompute-num-layers", 2)
    assert result.exit_code == 3
    assert "no single change" not in " ".join(result.stderr.split())


def test_the_cheapest_fix_keeps_sequence_parallelism_off_when_the_user_has_it_off():
    result = invoke("evaluate", "--tp", 2, "--pp", 1, "--no-sequence-parallel", "--mbs", 4)
    assert result.exit_code == 3
    message = " ".join(result.stderr.split())
    if "--tp 4" in message:
        assert " SP " not in message.split("--tp 4")[1].split(")")[0]


def test_the_cheapest_fix_may_use_the_gpus_a_small_layout_leaves_idle():
    """Llama-3-8B on 1 or 2 of the 64 GPUs does not fit, and no change on
    those GPUs does: the idle GPUs do, more data parallel ranks sharding the
    optimizer the fastest (as loom evaluate --dp 64 runs it)."""
    for dp in (1, 2):
        result = invoke("evaluate", "--tp", 1, "--pp", 1, "--dp", dp, "--global-batch-size", 256, "--seq-length", 4096)
        assert result.exit_code == 3
        assert "the cheapest single change that fits: --dp 64 (TP1 PP1 DP64 mbs1 DO" in " ".join(result.stderr.split())
    assert invoke("evaluate", "--tp", 1, "--pp", 1, "--dp", 64, "--global-batch-size", 256, "--seq-length", 4096).exit_code == 0


@pytest.mark.parametrize("flags, fix", [(["--framework", "deepspeed", "--zero-stage", 0], "--zero-stage "),
                                        (["--framework", "torchtitan", "--fsdp", 0, "--recompute", "full"], "--fsdp 64")])
def test_the_cheapest_fix_shards_what_data_parallelism_replicates(flags, fix):
    """Llama-3 8B replicated over 64 GPUs holds 90 GiB of Adam state: a
    higher ZeRO stage (any, not only the next) or torchtitan's FSDP fits."""
    result = invoke("evaluate", *flags)
    assert result.exit_code == 3
    assert f"the cheapest single change that fits: {fix}" in " ".join(result.stderr.split())


def test_mxfp8_needs_blackwell(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: llama-3-8b\ncluster: h100-64.yaml\nglobal_batch_size: 512\nseq_length: 8192\nprecision: fp8\n"
                   "features: {fp8_recipe: mxfp8}\n")
    (tmp_path / "h100-64.yaml").write_text(open("examples/h100-64.yaml").read())
    result = invoke("evaluate", job, "--tp", 2, "--pp", 2)
    assert result.exit_code == 2 and "features.fp8_recipe" in one_line(result)


def test_a_field_given_twice_is_bad_input(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: llama-3-8b\ncluster: h100-64.yaml\nglobal_batch_size: 512\nseq_length: 8192\n"
                   "memory_headroom: 0.1\nmemory_headroom: 0.6\n")
    result = invoke("plan", job)
    assert result.exit_code == 2 and "memory_headroom" in one_line(result) and "line 6" in one_line(result)


@pytest.mark.parametrize("flag,value", [("--stack", "foo"), ("--memory-headroom", "abc"), ("--precision", "fp4")])
def test_a_bad_flag_value_is_blamed_on_the_flag(flag, value):
    result = invoke("plan", flag, value)
    assert result.exit_code == 2 and f"{flag}: expected" in one_line(result)


# --- outputs that cannot be written, reproducible --json, missing arguments ---------------

UNWRITABLE = [pytest.param("/proc/nope", id="proc"), pytest.param("/sys/x", id="sys"), pytest.param("x" * 300, id="name-too-long"),
              pytest.param("runs/" + "y" * 300 + "/out", id="folder-name-too-long")]


@pytest.fixture
def nothing_runs(monkeypatch):
    """The search (and the expert solver) fail the test if reached: --out is checked first."""

    def reached(*args, **kwargs):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr("loom.cli.app.search", reached)
    monkeypatch.setattr("loom.planner.search.experts.expert_problem", reached)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /sys are Linux's")
@pytest.mark.parametrize("out", UNWRITABLE)
@pytest.mark.parametrize("command", ["plan", "evaluate", "experts"])
def test_an_out_loom_cannot_write_is_bad_input_before_any_work(tmp_path, monkeypatch, nothing_runs, out, command):
    """/proc, /sys or a name too long: once FileNotFoundError, PermissionError
    or OSError after the search (exit 4); now exit 2 naming --out, first."""
    monkeypatch.chdir(tmp_path)
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps([[5, 1, 1, 1]]))
    args = {"plan": ["plan"], "evaluate": ["evaluate"], "experts": ["experts", loads, "--slots-per-gpu", "2", "--ep-size", "2"]}[command]
    result = invoke(*args, "--out", out)
    assert result.exit_code == 2, result.output
    assert one_line(result).startswith("error: --out:")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["loads.json"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /sys are Linux's")
@pytest.mark.parametrize("out", UNWRITABLE)
def test_a_profile_or_figure_loom_cannot_write_is_bad_input_naming_its_flag(plan_json, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "missing.log"  # never read: --out is checked first
    result = invoke("profile", "nccl-tests", log, "--out", f"{out}.json")
    assert result.exit_code == 2 and one_line(result).startswith("error: --out:")
    result = invoke("explain", plan_json, "--timeline", f"{out}.png")
    assert result.exit_code == 2 and one_line(result).startswith("error: --timeline:")


def test_writing_a_file_set_where_nothing_can_be_created_is_bad_input(tmp_path):
    """The write itself (the folder may change after the check): SpecError, not OSError."""
    from loom.planner.output.files import write_file_set, write_text_file
    from loom.planner.specs.errors import SpecError

    with pytest.raises(SpecError, match="--out"):
        write_file_set(tmp_path / ("z" * 300), {"a.txt": "a\n"})
    with pytest.raises(SpecError, match="--out"):
        write_text_file(tmp_path / ("z" * 300), "a\n", "--out")
    assert list(tmp_path.iterdir()) == []


def test_json_is_byte_identical_across_runs_and_is_plan_json(tmp_path):
    """--json once carried the search's wall time (plan.json a null there):
    two runs differed and the README's 'plan.json is the report --json
    prints' was not true. The wall time is on stderr."""
    first = invoke("plan", "--json", "--out", tmp_path / "a")
    second = invoke("plan", "--json")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert first.stdout_bytes == second.stdout_bytes
    assert (tmp_path / "a" / "plan.json").read_bytes() == first.stdout_bytes
    assert json.loads(first.stdout)["search"]["wall_time_s"] is None
    assert "searched" in first.stderr and " s" in first.stderr


@pytest.mark.parametrize("args, missing", [
    (["profile", "gemm", "llama-3-8b", "--gpu", "H100-SXM5-80GB"], "--out"),
    (["experts", "loads.json"], "--slots-per-gpu"),
    (["experts", "--slots-per-gpu", "2"], "LOADS"),
    (["explain"], "PLAN_FILE"),
    (["profile", "nccl-tests", "--out", "n.json"], "LOGS"),
])
def test_a_missing_required_argument_says_it_is_required(args, missing):
    """Once ``error: --out:  (see ...)``: the flag, then nothing."""
    result = invoke(*args)
    assert result.exit_code == 2
    line = one_line(result)
    assert line.startswith(f"error: {missing}: expected ") and "required" in line, line


def test_a_bad_flag_is_blamed_on_the_command_line_not_the_bundled_job():
    """With no job file the bundled example is read; a flag's bad value is
    the command line's fault, not that file's (the user never gave it)."""
    result = invoke("plan", "--precision", "fp9")
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: command line: --precision:") and "llama3-8b-h100" not in result.output


def test_launch_files_for_ranks_that_do_not_fill_whole_nodes_are_bad_input(tmp_path):
    """12 ranks on nodes of 8: no per-node launcher starts 8 on one and 4 on
    the other. Priced without --out; refused naming the degrees with it."""
    args = ["evaluate", "--framework", "torchtitan", "--global-batch-size", 96, "--dp", 6, "--pp", 2]
    assert invoke(*args).exit_code in (0, 3)
    result = invoke(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--tp x --pp x --dp x --cp" in one_line(result) and "whole nodes" in one_line(result)
    assert not (tmp_path / "out").exists()


def test_deepspeed_with_expert_tensor_parallelism_is_bad_input():
    result = invoke("evaluate", "--model", "mixtral-8x7b", "--framework", "deepspeed", "--global-batch-size", 256, "--seq-length", 4096,
                    "--ep", 8, "--etp", 2, "--zero-stage", 2)
    assert result.exit_code == 2 and "--etp" in one_line(result) and "DeepSpeed" in one_line(result)


@pytest.mark.parametrize("imbalance, expected", [("100", "at most 4 at any EP"), ("{8: 5}", "at most 4 at EP 8")])
def test_a_load_no_routing_can_reach_is_bad_input(tmp_path, imbalance, expected):
    """Mixtral sends each token to 2 of 8 experts: a rank receives at most
    min(2, its experts) copies of it, so at most 4x the mean."""
    job = tmp_path / "job.yaml"
    job.write_text(f"model: mixtral-8x7b\ncluster: {EXAMPLES / 'h100-64.yaml'}\nglobal_batch_size: 256\nseq_length: 4096\n"
                   f"features: {{moe_load_imbalance: {imbalance}}}\n")
    result = invoke("plan", job)
    assert result.exit_code == 2 and "features.moe_load_imbalance" in one_line(result) and expected in one_line(result)


@pytest.mark.parametrize("lines, field", [
    ("features: {overlap_moe_expert_parallel_comm: true}", "features.overlap_moe_expert_parallel_comm"),
    ("features: {moe_token_dispatcher: allgather}", "features.moe_token_dispatcher"),
    ("search: {moe_token_dispatcher: [alltoall, hybridep]}", "search.moe_token_dispatcher"),
    ("features: {moe_router_fusion: true}", "features.moe_router_fusion"),
    ("features: {overlap_grad_reduce: false}", "features.overlap_grad_reduce"),
])
def test_megatron_moe_features_with_torchtitan_are_bad_input_for_plan_too(tmp_path, lines, field):
    """Not "no layout passes the rules" (exit 3): the job asks for what
    torchtitan does not have, whatever the layout."""
    job = tmp_path / "job.yaml"
    job.write_text(f"model: deepseek-v2-lite\ncluster: {EXAMPLES / 'h100-64.yaml'}\nglobal_batch_size: 256\nseq_length: 4096\n"
                   f"framework: torchtitan\n{lines}\n")
    for command in ("plan", "evaluate") if field.startswith("features") else ("plan",):
        result = invoke(command, job)
        assert result.exit_code == 2 and field in one_line(result) and "torchtitan" in one_line(result), (command, result.output)


def test_a_reader_that_closes_stdout_does_not_stop_the_files(tmp_path):
    """``loom plan --out DIR | head -1``: the table's reader goes away after
    a line; the plan is still written and the exit is not a failed gate's 1."""
    import subprocess

    process = subprocess.Popen([sys.executable, "-m", "loom.cli", "plan", "--out", str(tmp_path / "out")], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    process.stdout.readline()
    process.stdout.close()
    assert process.wait(timeout=120) == 0
    assert (tmp_path / "out" / "plan.json").is_file()
    # explain's tables too (it printed through rich's own console, which exits 1 on a broken pipe): the
    # reader has gone before the first line
    explain = subprocess.Popen([sys.executable, "-m", "loom.cli", "explain", str(tmp_path / "out" / "plan.json")], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    explain.stdout.close()
    assert explain.wait(timeout=120) == 0


@pytest.mark.parametrize("lines, field", [
    ("model: llama-3-8b\nsearch: {ep: [8]}", "search.ep"),
    ("model: llama-3-8b\nsearch: {zero_stage: [3]}", "search.zero_stage"),
    ("model: mixtral-8x7b\nframework: deepspeed\nsearch: {etp: [2]}", "search.etp"),
    # Lists that combine to no layout at all: the knob whose list is to blame.
    ("model: llama-3-8b\nsearch: {tp: [3]}", "search.tp"),
    ("model: llama-3-8b\nsearch: {tp: [8], pp: [3]}", "search.pp"),
    ("model: llama-3-8b\nsearch: {pp: [1], vpp: [2]}", "search.vpp"),
    ("model: llama-3-8b\nsearch: {tp: [1], sequence_parallel: [true]}", "search.sequence_parallel"),
    # rules whose expectation differs per layout (each its own dp), or that sit on a job field a knob drives
    ("model: llama-3-8b\nsearch: {fsdp: [3]}", "search.fsdp"),
    ("model: llama-3-8b\nsearch: {micro_batch_size: [1024]}", "search.micro_batch_size"),
    # MoE knobs and features on a dense model, which it would ignore
    ("model: llama-3-8b\nsearch: {moe_token_dispatcher: [deepep]}", "search.moe_token_dispatcher"),
    ("model: llama-3-8b\nfeatures: {moe_load_imbalance: 1.3}", "features.moe_load_imbalance"),
    ("model: llama-3-8b\nfeatures: {overlap_moe_expert_parallel_comm: true}", "features.overlap_moe_expert_parallel_comm"),
    ("model: mixtral-8x7b\nfeatures: {moe_load_imbalance: {3: 1.5}}", "features.moe_load_imbalance"),  # EP 3 of 8 experts
])
def test_a_search_list_no_layout_can_run_is_bad_input(tmp_path, lines, field):
    """A rule that refuses every layout because of a value the search list
    asks for: bad input naming that list, as evaluate names the flag."""
    job = tmp_path / "job.yaml"
    job.write_text(f"{lines}\ncluster: {EXAMPLES / 'h100-64.yaml'}\nglobal_batch_size: 256\nseq_length: 4096\n")
    result = invoke("plan", job)
    assert result.exit_code == 2 and f"field '{field}'" in one_line(result), result.output


def test_nothing_fits_says_offload_was_not_searched(tmp_path):
    """Llama 3 405B on 64 H100 fits only with the optimizer on the host,
    which the search tries only when the job lists it: exit 3 says so."""
    job = tmp_path / "job.yaml"
    job.write_text(f"model: llama-3-405b\ncluster: {EXAMPLES / 'h100-64.yaml'}\nglobal_batch_size: 256\nseq_length: 4096\n")
    result = invoke("plan", job)
    assert result.exit_code == 3 and "optimizer offload is not searched" in one_line(result), result.output


@pytest.mark.parametrize("framework", ["megatron", "deepspeed", "torchtitan"])
def test_a_layout_larger_than_the_cluster_is_bad_input_with_out_too(tmp_path, framework):
    """--out adds the launch files' checks; a layout wider than the cluster is named first, not a crash."""
    result = runner.invoke(app, ["evaluate", "--dp", "128", "--framework", framework, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "at most the cluster's 64 GPUs" in result.output
    assert not (tmp_path / "x").exists()


def test_a_flag_refused_when_writing_files_is_blamed_on_the_flag(tmp_path):
    """--stack torchtitan-2412 prices the December 2024 benchmark but cannot be written; the flag set it, not the bundled job file."""
    result = runner.invoke(app, ["plan", "--framework", "torchtitan", "--stack", "torchtitan-2412", "--top-k", "1", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "command line: --stack" in result.output and "llama3-8b-h100.yaml" not in result.output
