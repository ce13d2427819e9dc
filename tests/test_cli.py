"""The ``loom`` command line: exit codes, messages, the JSON contract, launch
files and flags (ARCHITECTURE.md, "Interfaces that other tools and checks rely on").

Every test runs the real typer app in-process on small inputs built here
(one or two 8-GPU nodes), so the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import DEFAULT_JOB, load_job
from loom.planner.specs.model import load_model
from loom.planner.output.report import SCHEMA_FILE, json_schema
from loom.profiles.catalogue import GiB, find_gpu

runner = CliRunner()

CLUSTER = {"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
JOB = {"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 64, "seq_length": 4096}


# --- helpers ----------------------------------------------------------------


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_job(tmp_path: Path, nodes: int = 1, **fields) -> Path:
    """A job file in ``tmp_path`` beside its cluster file; ``fields`` override
    (a value of None removes the field)."""
    write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "nodes": nodes})
    data = {**JOB, **fields}
    return write_yaml(tmp_path / "job.yaml", {k: v for k, v in data.items() if v is not None})


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def flat(text: str) -> str:
    """Output with all whitespace removed: rich wraps stderr at 80 columns,
    which may break a long path or message over lines."""
    return re.sub(r"\s+", "", text)


def mentions(output: str, needle: str) -> bool:
    return flat(needle) in flat(output)


def assert_bad_input(result, *needles: str) -> None:
    """Exit 2, no traceback, and every needle (file name, field, ...) in the message."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught error
    assert "Traceback" not in result.output
    for needle in needles:
        assert mentions(result.output, needle), f"{needle!r} not in:\n{result.output}"


def plan_json(*args) -> dict:
    result = invoke("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- bad input: exit 2, naming the file and the field -------------------------


def test_missing_required_job_field(tmp_path):
    job = make_job(tmp_path, global_batch_size=None)
    assert_bad_input(invoke("plan", job), "job.yaml", "global_batch_size")
    with pytest.raises(SpecError) as info:
        load_job(job)
    assert info.value.source == str(job) and info.value.field == "global_batch_size"


def test_mistyped_field_beside_the_right_one(tmp_path):
    job = make_job(tmp_path, global_batch_sise=64)
    assert_bad_input(invoke("plan", job), "job.yaml", "global_batch_sise")
    with pytest.raises(SpecError) as info:
        load_job(job)
    assert info.value.field == "global_batch_sise"


def test_mistyped_field_instead_of_the_right_one_names_the_typo(tmp_path):
    """The usual typo: the field is misspelt, so the right one is also missing.
    The message must point at what the user wrote, not only at what is missing."""
    job = make_job(tmp_path, global_batch_size=None, global_batch_sise=64)
    result = invoke("plan", job)
    assert result.exit_code == 2
    with pytest.raises(SpecError) as info:
        load_job(job)
    assert info.value.field == "global_batch_sise", str(info.value)


def test_wrong_type(tmp_path):
    job = make_job(tmp_path, seq_length="long")
    assert_bad_input(invoke("plan", job), "job.yaml", "seq_length", "long")
    with pytest.raises(SpecError) as info:
        load_job(job)
    assert info.value.field == "seq_length"


def test_wrong_type_nested_field_is_named_with_its_path(tmp_path):
    job = make_job(tmp_path, search={"tp": ["two"]})
    assert_bad_input(invoke("plan", job), "job.yaml", "search.tp")


def test_unknown_gpu_in_cluster_yaml(tmp_path):
    job = make_job(tmp_path)
    write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "gpu": "H900"})
    assert_bad_input(invoke("plan", job), "cluster.yaml", "gpu", "H900")
    with pytest.raises(SpecError) as info:
        load_job(job)
    assert info.value.source.endswith("cluster.yaml") and info.value.field == "gpu"


def test_fp8_with_deepspeed_is_bad_input(tmp_path):
    """DeepSpeed's config has no fp8 switch: refuse before planning, not at emit time."""
    job = make_job(tmp_path, framework="deepspeed", precision="fp8")
    assert_bad_input(invoke("plan", job, "--out", tmp_path / "out"), "job.yaml", "precision", "fp8")
    assert not (tmp_path / "out").exists()


def test_unknown_model_flag(tmp_path):
    job = make_job(tmp_path)
    assert_bad_input(invoke("plan", job, "--model", "llama-9-8b"), "--model", "llama-9-8b")


def test_unknown_model_in_job_file_names_the_job_file(tmp_path):
    job = make_job(tmp_path, model="llama-9-8b")
    assert_bad_input(invoke("plan", job), "llama-9-8b", "model")
    with pytest.raises(SpecError) as info:
        load_job(job)
    assert info.value.field == "model"
    assert info.value.source == str(job), f"blames {info.value.source!r}, but the name came from {job}"


def test_evaluate_tp_not_dividing_heads(tmp_path):
    job = make_job(tmp_path)
    heads = load_model("llama-3-8b").num_attention_heads
    assert heads % 3
    assert_bad_input(invoke("evaluate", job, "--tp", 3, "--dp", 2), "tp", str(heads))


def test_evaluate_batch_not_divisible_by_micro_batch_times_dp(tmp_path):
    job = make_job(tmp_path, global_batch_size=20)
    # 20 is not a multiple of mbs 4 x dp 4 = 16
    assert_bad_input(invoke("evaluate", job, "--tp", 2, "--dp", 4, "--mbs", 4), "global_batch_size", "16")


def test_malformed_job_yaml(tmp_path):
    make_job(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text("model: llama-3-8b\ncluster: cluster.yaml\nglobal_batch_size: [64\nseq_length: 4096\n")
    assert_bad_input(invoke("plan", job), "job.yaml", "YAML")


def test_job_file_that_is_not_a_mapping(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("- model\n- cluster\n")
    assert_bad_input(invoke("plan", job), "job.yaml")


def test_malformed_model_config_json(tmp_path):
    job = make_job(tmp_path)
    config = tmp_path / "broken" / "config.json"
    config.parent.mkdir()
    config.write_text('{"model_type": "llama", "hidden_size": 4096,\n')
    assert_bad_input(invoke("plan", job, "--model", config), "config.json", "JSON")


def test_model_config_missing_a_field(tmp_path):
    job = make_job(tmp_path)
    config = tmp_path / "nolayers" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 256, "num_attention_heads": 8,
                                  "intermediate_size": 688, "vocab_size": 1000, "max_position_embeddings": 4096}))
    assert_bad_input(invoke("plan", job, "--model", config), "config.json", "num_hidden_layers")


def test_user_text_with_brackets_is_printed_verbatim(tmp_path):
    """Messages quote the user's input; rich must not eat "[...]" in it as markup
    (paths, host lists like node[01-04] and gate texts can hold brackets)."""
    job = make_job(tmp_path)
    missing = tmp_path / "runs" / "[test]" / "config.json"
    assert_bad_input(invoke("plan", job, "--model", missing), "[test]")


def test_missing_cluster_file(tmp_path):
    job = make_job(tmp_path, cluster="no-such-cluster.yaml")
    assert_bad_input(invoke("plan", job), "job.yaml", "cluster", "no-such-cluster.yaml")


def test_missing_job_file(tmp_path):
    assert_bad_input(invoke("plan", tmp_path / "nope.yaml"), "nope.yaml")


@pytest.mark.parametrize("gate", ["mfu=>0.4", "speed>=1", "mfu>=", "mfu>=fast", "mfu>=1e999", "step_time_s<=nan"])
def test_bad_gate_expression(tmp_path, gate):
    job = make_job(tmp_path)
    assert_bad_input(invoke("plan", job, "--gate", gate), "--gate", gate)


def test_an_unquoted_gate_is_told_to_quote_it(tmp_path):
    """bash leaves 'mfu' of an unquoted --gate mfu>=0.4 and redirects stdout
    to a file '=0.4': the message says so."""
    job = make_job(tmp_path)
    result = subprocess.run(f"{sys.executable} -m loom.cli plan {job} --gate mfu>=0.4", shell=True, cwd=tmp_path,
                            capture_output=True, text=True, executable="/bin/bash")
    assert result.returncode == 2 and (tmp_path / "=0.4").exists()
    assert "--gate: " in result.stderr and "redirect" in result.stderr and "--gate 'mfu>=0.4'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_gate_fails_before_searching_or_writing(tmp_path):
    """A bad gate is bad input (2), even when the job is also infeasible (3),
    and nothing is written under --out."""
    job = make_job(tmp_path, model="llama-3-405b")
    out = tmp_path / "out"
    assert_bad_input(invoke("plan", job, "--gate", "speed>=1", "--out", out), "--gate")
    assert not out.exists() or not any(out.iterdir())


# --- infeasible: exit 3, saying what binds -------------------------------------


def test_impossible_job_exits_3_and_says_what_binds(tmp_path):
    job = make_job(tmp_path, model="llama-3-405b")
    result = invoke("plan", job)
    assert result.exit_code == 3, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    capacity = find_gpu("H100").memory_bytes / GiB
    assert mentions(result.output, "GiB")
    assert mentions(result.output, f"{capacity:.1f}"), result.output
    needed = [float(x) for x in re.findall(r"([0-9]+(?:\.[0-9]+)?)\s*GiB", result.output)]
    assert max(needed) > capacity, "the message must show a need larger than the GPU"


# --- gates ------------------------------------------------------------------------


def test_failing_gate_exits_1_naming_it(tmp_path):
    job = make_job(tmp_path)
    result = invoke("plan", job, "--gate", "mfu>=0.99")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert mentions(result.output, "mfu>=0.99")


def test_passing_gates_exit_0(tmp_path):
    job = make_job(tmp_path)
    result = invoke("plan", job, "--gate", "memory_headroom>=0.0", "--gate", "mfu>0")
    assert result.exit_code == 0, result.output


def test_only_the_failing_gate_is_named(tmp_path):
    job = make_job(tmp_path)
    result = invoke("plan", job, "--gate", "memory_headroom>=0.0", "--gate", "step_time_s<=0.000001")
    assert result.exit_code == 1
    assert mentions(result.output, "step_time_s<=")
    assert not mentions(result.output, "memory_headroom>=")


def test_gate_checks_the_value_it_reports(tmp_path):
    """The gate is evaluated on the best plan's own numbers: a threshold just
    below the reported MFU passes, one just above fails."""
    job = make_job(tmp_path)
    mfu = plan_json(job)["plans"][0]["predicted"]["mfu"]
    assert invoke("plan", job, "--gate", f"mfu>={mfu * 0.99:.6f}").exit_code == 0
    assert invoke("plan", job, "--gate", f"mfu>={mfu * 1.01:.6f}").exit_code == 1


# --- the JSON report ----------------------------------------------------------------


def test_json_report_validates_against_the_shipped_schema(tmp_path):
    job = make_job(tmp_path, nodes=2)
    report = plan_json(job, "--top-k", 4)
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(report, schema)
    assert report["schema_version"]
    for key in ("candidates", "wall_time_s", "status", "gap"):
        assert key in report["search"]

    gpus = 2 * CLUSTER["gpus_per_node"]
    assert report["gpus"] == gpus and 1 <= len(report["plans"]) <= 4
    times = [plan["predicted"]["step_time_s"] for plan in report["plans"]]
    assert times == sorted(times), "plans must be ranked best (fastest) first"
    layers = load_model("llama-3-8b").num_layers
    for plan in report["plans"]:
        p = plan["parallel"]
        assert p["tp"] * p["pp"] * p["dp"] * p["cp"] == gpus
        assert p["global_batch_size"] == JOB["global_batch_size"]
        assert sum(stage["layers"] for stage in plan["stages"]) == layers
        assert len(plan["stages"]) == p["pp"]
        slots = [(run["rank"] + k, run["host"], run["gpu"] + k) for run in plan["placement"] for k in range(run["count"])]
        assert [rank for rank, _, _ in slots] == list(range(gpus))
        assert len({(host, gpu) for _, host, gpu in slots}) == gpus
        assert len(plan["placement"]) == 2  # Megatron's order: one run per node
        assert plan["memory"]["peak_bytes_per_gpu"] <= plan["memory"]["capacity_bytes"]


def test_schema_rejects_a_report_missing_a_contract_field(tmp_path):
    """The schema is not vacuous: dropping a field the contract names fails it."""
    report = plan_json(make_job(tmp_path), "--top-k", 1)
    schema = json.loads(SCHEMA_FILE.read_text())
    del report["plans"][0]["parallel"]["tp"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, schema)


def test_shipped_schema_is_in_sync_with_the_report_models():
    assert SCHEMA_FILE.read_text() == json_schema()


# --- launch files and determinism ---------------------------------------------------------


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def test_out_writes_megatron_files(tmp_path):
    job = make_job(tmp_path)
    out = tmp_path / "out"
    result = invoke("plan", job, "--out", out)
    assert result.exit_code == 0, result.output
    files = _files(out)
    assert {"train.sh", "slurm.sbatch", "plan.json"} <= set(files)
    report = json.loads(files["plan.json"])
    jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()))
    best = report["plans"][0]["parallel"]
    train = files["train.sh"].decode()
    assert f"--tensor-model-parallel-size {best['tp']}" in train
    assert f"--global-batch-size {best['global_batch_size']}" in train
    assert (out / "train.sh").stat().st_mode & 0o111, "train.sh must be executable"


def test_out_writes_deepspeed_files(tmp_path):
    job = make_job(tmp_path)
    out = tmp_path / "out"
    result = invoke("plan", job, "--framework", "deepspeed", "--out", out)
    assert result.exit_code == 0, result.output
    files = _files(out)
    # The job's cluster names no hosts: launch.sh writes the hostfile from the nodes it is given.
    assert {"ds_config.json", "launch.sh", "plan.json"} <= set(files)
    assert "train.sh" not in files and "hostfile" not in files
    ds_config = json.loads(files["ds_config.json"])
    assert ds_config["train_batch_size"] == JOB["global_batch_size"]
    report = json.loads(files["plan.json"])
    assert report["framework"] == "deepspeed"
    assert all(plan["parallel"]["tp"] == 1 for plan in report["plans"])


def test_a_deepspeed_plan_without_a_pipeline_says_to_checkpoint_layers(tmp_path):
    """DeepSpeed cannot switch full recompute on for a plain model from its
    config: the user's script must checkpoint each layer, and loom says so
    on stderr and in launch.sh."""
    job = make_job(tmp_path)
    out = tmp_path / "out"
    result = invoke("evaluate", job, "--framework", "deepspeed", "--zero-stage", "3", "--recompute", "full", "--out", out)
    assert result.exit_code == 0, result.output
    assert "note: your training script must wrap each layer's forward in deepspeed.checkpointing.checkpoint" in result.output
    assert "# It must also wrap each layer's forward in" in (out / "launch.sh").read_text()
    plain = invoke("evaluate", job, "--framework", "deepspeed", "--zero-stage", "3", "--out", tmp_path / "plain")
    assert plain.exit_code == 0 and "checkpoint" not in plain.output


def test_launch_files_are_byte_identical_across_runs(tmp_path):
    for framework in ("megatron", "deepspeed"):
        job = make_job(tmp_path, nodes=2, framework=framework)
        first, second = tmp_path / f"{framework}-a", tmp_path / f"{framework}-b"
        assert invoke("plan", job, "--out", first).exit_code == 0
        assert invoke("plan", job, "--out", second).exit_code == 0
        a, b = _files(first), _files(second)
        assert set(a) == set(b)
        for name in sorted(set(a) - {"plan.json"}):
            assert a[name] == b[name], f"{framework}: {name} differs between identical runs"


def test_plan_json_is_byte_identical_across_runs(tmp_path):
    """"Same inputs, byte-identical outputs" (issue 2) includes plan.json."""
    job = make_job(tmp_path)
    assert invoke("plan", job, "--out", tmp_path / "a").exit_code == 0
    assert invoke("plan", job, "--out", tmp_path / "b").exit_code == 0
    a, b = (tmp_path / "a" / "plan.json").read_bytes(), (tmp_path / "b" / "plan.json").read_bytes()
    assert a == b, "plan.json differs between identical runs (a wall-clock field?)"


def test_failing_gate_still_writes_the_report_and_exits_1(tmp_path):
    """Decision: a gate is a policy check on a valid plan, so the launch files and
    plan.json are still written (CI archives plan.json to show why the gate
    failed); the exit code alone says the gate failed. The files are the same as
    an ungated run's, and plan.json is the very report printed by --json (the
    search's wall time is null in both, so that they are reproducible)."""
    job = make_job(tmp_path)
    gated, plain = tmp_path / "gated", tmp_path / "plain"
    result = invoke("plan", job, "--json", "--out", gated, "--gate", "mfu>=0.99")
    assert result.exit_code == 1
    assert mentions(result.stderr, "mfu>=0.99")
    files = _files(gated)
    assert {"train.sh", "slurm.sbatch", "plan.json"} <= set(files)
    assert files["plan.json"] == result.stdout_bytes
    assert json.loads(result.stdout)["search"]["wall_time_s"] is None
    assert invoke("plan", job, "--out", plain).exit_code == 0
    assert files["train.sh"] == _files(plain)["train.sh"]


# --- flags override the file ------------------------------------------------------------


def test_flags_override_the_job_file(tmp_path):
    job = make_job(tmp_path)
    base = plan_json(job)
    report = plan_json(job, "--global-batch-size", 128, "--seq-length", 2048, "--model", "llama-2-7b", "--top-k", 2)
    assert base["model"] == "llama-3-8b" and base["seq_length"] == JOB["seq_length"]
    assert report["model"] == "llama-2-7b"
    assert report["seq_length"] == 2048
    assert len(report["plans"]) == 2
    assert all(plan["parallel"]["global_batch_size"] == 128 for plan in report["plans"])
    assert sum(stage["layers"] for stage in report["plans"][0]["stages"]) == load_model("llama-2-7b").num_layers


def test_cluster_precision_and_framework_flags_override_the_file(tmp_path):
    job = make_job(tmp_path)
    write_yaml(tmp_path / "two-nodes.yaml", {**CLUSTER, "nodes": 2, "gpu": "A100"})
    report = plan_json(job, "--cluster", tmp_path / "two-nodes.yaml", "--precision", "fp16", "--framework", "deepspeed", "--top-k", 1)
    assert report["gpus"] == 16
    assert report["precision"] == "fp16"
    assert report["framework"] == "deepspeed"
    assert report["plans"][0]["memory"]["capacity_bytes"] == find_gpu("A100").memory_bytes


# --- the bundled example --------------------------------------------------------------


def _bundled() -> dict:
    return yaml.safe_load(DEFAULT_JOB.read_text())


def test_plan_without_a_job_file_plans_the_bundled_example():
    result = invoke("plan", "--json", "--top-k", 1)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == _bundled()["model"]
    assert report["plans"][0]["parallel"]["global_batch_size"] == _bundled()["global_batch_size"]


def test_loom_with_no_arguments_plans_the_bundled_example():
    result = invoke()
    assert result.exit_code == 0, f"{result.exception!r}\n{result.output}"
    assert result.exception is None
    assert _bundled()["model"] in result.output


# --- evaluate -----------------------------------------------------------------------------


def test_evaluate_reports_exactly_the_layout_given(tmp_path):
    job = make_job(tmp_path)
    report = json.loads(invoke(
        "evaluate", job, "--json", "--tp", 2, "--pp", 2, "--dp", 2, "--vpp", 2, "--mbs", 2,
        "--recompute", "selective", "--recompute-modules", "core_attn,mlp", "--sequence-parallel", "--distributed-optimizer",
    ).stdout)
    assert len(report["plans"]) == 1
    parallel = report["plans"][0]["parallel"]
    assert parallel == {
        "tp": 2, "pp": 2, "dp": 2, "cp": 1, "ep": 1, "etp": 1, "vpp": 2, "micro_batch_size": 2,
        "global_batch_size": JOB["global_batch_size"], "sequence_parallel": True, "recompute": "selective",
        "recompute_modules": ["core_attn", "mlp"], "recompute_num_layers": 0,
        "zero_stage": 0, "distributed_optimizer": True, "fsdp": 0, "reshard_after_forward": True, "optimizer_offload": False,
    }
    stages = report["plans"][0]["stages"]
    assert len(stages) == 2 and all(len(stage["layer_ranges"]) == 2 for stage in stages)


def test_evaluate_negative_flags_are_honoured(tmp_path):
    job = make_job(tmp_path)
    result = invoke("evaluate", job, "--json", "--tp", 4, "--pp", 1, "--dp", 2, "--mbs", 1,
                    "--recompute", "full", "--no-sequence-parallel", "--no-distributed-optimizer")
    assert result.exit_code == 0, result.output
    parallel = json.loads(result.stdout)["plans"][0]["parallel"]
    assert (parallel["tp"], parallel["pp"], parallel["dp"]) == (4, 1, 2)
    assert parallel["sequence_parallel"] is False and parallel["distributed_optimizer"] is False
    assert parallel["recompute"] == "full"


def test_evaluate_of_the_best_plan_predicts_the_same_step_time(tmp_path):
    """plan and evaluate share one model: evaluating plan's best layout gives its numbers."""
    job = make_job(tmp_path)
    best = plan_json(job, "--top-k", 1)["plans"][0]
    p = best["parallel"]
    args = ["--tp", p["tp"], "--pp", p["pp"], "--dp", p["dp"], "--cp", p["cp"], "--vpp", p["vpp"],
            "--mbs", p["micro_batch_size"], "--recompute", p["recompute"],
            "--sequence-parallel" if p["sequence_parallel"] else "--no-sequence-parallel",
            "--distributed-optimizer" if p["distributed_optimizer"] else "--no-distributed-optimizer", "--fsdp", p["fsdp"],
            "--reshard-after-forward" if p["reshard_after_forward"] else "--no-reshard-after-forward",
            "--offload-optimizer" if p["optimizer_offload"] else "--no-offload-optimizer"]
    result = invoke("evaluate", job, "--json", *args)
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)["plans"][0]
    assert again["parallel"] == p
    assert again["predicted"]["step_time_s"] == pytest.approx(best["predicted"]["step_time_s"], rel=1e-9)


# --- output a person reads ----------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _widest(text: str) -> int:
    return max(len(line.rstrip()) for line in text.splitlines())


def test_the_plan_table_fits_80_columns_with_a_legend():
    """A 42-character MoE label stays on one line of an 80-column table, and
    the legend says what each of its words means."""
    label = "TP2 PP2x2 DP16 EP8 mbs1 SP sel:act+norm DO"
    result = invoke("evaluate", EXAMPLES / "llama3-8b-h100.yaml", "--model", "mixtral-8x7b", "--tp", "2", "--pp", "2", "--vpp", "2",
                    "--ep", "8", "--recompute", "selective", "--recompute-modules", "moe_act,layernorm")
    assert result.exit_code == 0, result.output
    assert _widest(result.stdout) <= 80 and any(label in line for line in result.stdout.splitlines())
    legend = " ".join(result.stdout.split())
    for words in ("TP, PP, DP, EP: tensor, pipeline, data, expert parallel", "PPaxb: a stages of b virtual stages each",
                  "mbs: micro batch size", "SP: sequence parallel", "sel: selective recompute", "DO: distributed optimizer",
                  "act moe_act, norm layernorm"):
        assert words in legend, words
    placed = invoke("plan", EXAMPLES / "llama3-8b-h100-degraded.yaml", "--top-k", "3")
    assert placed.exit_code == 0 and _widest(placed.stdout) <= 80 and " placed" in placed.stdout


@pytest.mark.parametrize("command", [["plan"], ["evaluate"], ["explain"], ["experts"], ["profile", "layers"], ["profile", "gemm"],
                                     ["profile", "links"], ["profile", "nccl-tests"]])
def test_help_fits_80_columns_and_names_every_option_whole(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and _widest(result.stdout) <= 80
    options = re.findall(r"^\s+(--[a-z0-9-]+)", result.stdout, flags=re.M)
    assert options and not any(option.endswith("…") for option in options)
    assert "…" not in result.stdout


def test_an_evaluated_etp_survives_the_report(tmp_path):
    """plan.json carries etp (schema 1.7): before, an evaluated --etp 2 was
    dropped, and loom calibrate re-priced the plan with experts unsplit."""
    from loom.planner.calibrate.fit import plan_of
    from loom.planner.output.report import read_report

    job = make_job(tmp_path, nodes=2, model="mixtral-8x7b")
    out = tmp_path / "out"
    result = invoke("evaluate", job, "--tp", 2, "--ep", 8, "--etp", 2, "--pp", 1, "--dp", 8, "--sequence-parallel", "--out", out)
    assert result.exit_code == 0, result.output
    report = read_report(out / "plan.json")
    assert report.plans[0].parallel.etp == 2
    assert plan_of(load_job(job), report, report.plans[0], "plan.json").layout.etp == 2


def test_evaluate_shows_the_gpus_a_layout_leaves_idle(tmp_path):
    """TP8 PP3 DP2 runs on 48 of 64 GPUs: the table says so, as plan.json's idle_gpus does."""
    job = make_job(tmp_path, nodes=8)
    result = invoke("evaluate", job, "--tp", 8, "--pp", 3, "--dp", 2)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "layout" in line)
    row = next(line for line in result.output.splitlines() if "TP8 PP3 DP2" in line)
    assert header.split()[-1] == "idle" and row.split()[-1] == "16"


def test_an_empty_model_flag_is_blamed_on_the_flag(tmp_path):
    result = invoke("evaluate", make_job(tmp_path), "--model", "")
    assert result.exit_code == 2 and "--model" in result.output and "job.yaml" not in result.output, result.output
