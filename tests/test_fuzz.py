"""Malformed input through every command: no traceback, no hang, no half-written
output, and bad input named.

Valid seed files (a tiny model, a cluster, a job, layers/gemm/links/nccl-tests
profiles, a plan.json, nccl-tests logs, expert loads) are mutated by
hypothesis, structurally (a field deleted, replaced by a wrong type, an
out-of-range or non-finite number, an unknown field added) and as bytes
(truncated, binary, not UTF-8), and fed to the command that reads them, with
the others left valid. Flags get wrong values the same way. Every run must:

- exit 0 (the mutation happened to be valid), 2 (bad input) or 3 (valid but
  infeasible, saying what binds), never 1 (no gate is given) or 4 (a bug),
  with no traceback;
- on exit 2, print one ``error:`` line naming the file or flag and what was
  expected;
- on exit 0 with ``--json``, print a report that passes plan.schema.json and
  holds no NaN or infinity;
- on any other exit, leave ``--out`` unwritten;
- finish within TIME_LIMIT_S.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from loom.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
NCCL_LOGS = ROOT / "tests" / "data" / "nccl-tests"
PLAN_SCHEMA = json.loads((ROOT / "planner" / "output" / "plan.schema.json").read_text())
TIME_LIMIT_S = 20.0  # the slowest valid mutation here (a search of the tiny job) takes well under a second
FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))

runner = CliRunner()

MODEL = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 688, "vocab_size": 1000, "max_position_embeddings": 4096, "rope_theta": 500000.0,
         "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
CLUSTER = {"name": "tiny", "nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400,
           "hosts": ["a", "b"], "node_overrides": [{"node": "b", "nic_Gbps": 200}]}
JOB = {"model": "config.json", "cluster": "cluster.yaml", "global_batch_size": 32, "seq_length": 1024, "precision": "bf16",
       "framework": "megatron", "top_k": 3, "search": {"tp": [1, 2], "micro_batch_size": "auto"}}


def _invoke(folder: Path, args: list[str]):
    """Run loom in ``folder`` (relative paths resolve there)."""
    started = time.perf_counter()
    with _cwd(folder):
        result = runner.invoke(app, args)
    return result, time.perf_counter() - started


class _cwd:
    def __init__(self, folder: Path):
        self.folder, self.before = folder, None

    def __enter__(self):
        import os

        self.before = os.getcwd()
        os.chdir(self.folder)

    def __exit__(self, *exc):
        import os

        os.chdir(self.before)


def _links_profile() -> dict:
    """A measured links profile of CLUSTER's 16 GPUs."""
    gpus = [(host, g) for host in CLUSTER["hosts"] for g in range(8)]
    n = len(gpus)
    return {
        "schema_version": 1, "kind": "links", "backend": "nccl", "device": "NVIDIA H100", "torch_version": "2.13.0",
        "gpus": [{"rank": i, "host": host, "local_gpu": g} for i, (host, g) in enumerate(gpus)],
        "message_bytes": 1 << 26, "latency_message_bytes": 8, "repeats": 10, "warmup": 2,
        "bandwidth_GBps": [[None if i == j else (300.0 if gpus[i][0] == gpus[j][0] else 40.0) for j in range(n)] for i in range(n)],
        "latency_s": [[None if i == j else 1e-5 for j in range(n)] for i in range(n)],
        "rounds": [], "all_reduce": [],
    }


class Seeds(dict):
    """File name -> bytes, shown short in hypothesis's reports."""

    def __repr__(self) -> str:
        return f"<{len(self)} seed files>"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    """File name -> the valid bytes every example starts from."""
    folder = tmp_path_factory.mktemp("seeds")
    (folder / "config.json").write_text(json.dumps(MODEL))
    (folder / "cluster.yaml").write_text(yaml.safe_dump(CLUSTER))
    (folder / "job.yaml").write_text(yaml.safe_dump(JOB))
    shutil.copy(NCCL_LOGS / "all_reduce_perf-2x8-h100.log", folder / "all_reduce.log")
    (folder / "links.json").write_text(json.dumps(_links_profile()))
    (folder / "cluster-links.yaml").write_text(yaml.safe_dump({**CLUSTER, "links_profile": "links.json"}))
    (folder / "job-links.yaml").write_text(yaml.safe_dump({**JOB, "cluster": "cluster-links.yaml"}))
    (folder / "cluster-nccl.yaml").write_text(yaml.safe_dump({**CLUSTER, "nccl_tests": "nccl.json"}))
    (folder / "job-nccl.yaml").write_text(yaml.safe_dump({**JOB, "cluster": "cluster-nccl.yaml"}))
    loads = np.random.default_rng(0).zipf(1.5, (2, 16)).astype(float)
    (folder / "loads.json").write_text(json.dumps(loads.tolist()))
    for args in (
        ["profile", "nccl-tests", "all_reduce.log", "--out", "nccl.json"],
        ["profile", "layers", "config.json", "--gpu", "h100", "--seq-length", "128", "--kinds", "dense,head", "--repeats", "1", "--warmup", "0",
         "--out", "layers.json"],
        ["profile", "gemm", "config.json", "--gpu", "h100", "--tokens", "128", "--repeats", "1", "--warmup", "0", "--out", "gemm.json"],
        ["plan", "job.yaml", "--out", "planned"],
    ):
        result, _ = _invoke(folder, args)
        assert result.exit_code == 0, (args, result.output)
    shutil.copy(folder / "planned" / "plan.json", folder / "plan.json")
    return Seeds({path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()})


# --- what a mutation may put in a field ---------------------------------------
WRONG = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from([0, -1, 1e308, -1e-308, 10**400, "nan", "1e999", "", " ", "🙂", "0x10", "1_000", [[[[]]]], {"": None}]),
)


def _paths(document, prefix=()) -> list[tuple]:
    """Every key path of a JSON-like document (the root excluded)."""
    found = []
    items = document.items() if isinstance(document, dict) else enumerate(document) if isinstance(document, list) else ()
    for key, value in items:
        found.append((*prefix, key))
        if len(found) < 400:  # the links matrices: their first rows are enough
            found += _paths(value, (*prefix, key))[:400]
    return found


@st.composite
def mutated_document(draw, document):
    """``document`` with one field deleted, replaced or given an unknown sibling."""
    document = copy.deepcopy(document)
    path = draw(st.sampled_from(_paths(document)))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "unknown"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "unknown" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8)) + "_x"] = draw(WRONG)
    else:
        parent[path[-1]] = draw(WRONG)
    return document


@st.composite
def corrupted_bytes(draw, data: bytes):
    """``data`` cut short, spliced with random bytes, not UTF-8, or empty."""
    action = draw(st.sampled_from(["truncate", "splice", "latin1", "empty", "binary"]))
    if action == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if action == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    if action == "latin1":
        return data + "\nnoté: ü".encode("latin-1")
    return b"" if action == "empty" else draw(st.binary(min_size=1, max_size=64))


def _serialise(name: str, document) -> bytes:
    if name.endswith(".json"):
        return json.dumps(document).encode()  # NaN and Infinity as Python writes them
    return yaml.safe_dump(document, allow_unicode=True).encode()


def _parse(name: str, data: bytes):
    return json.loads(data) if name.endswith(".json") else yaml.safe_load(data)


# --- what each file is read by --------------------------------------------------
def _evaluate(job: str) -> list[str]:
    return ["evaluate", job, "--tp", "2", "--json", "--out", "out"]


CONSUMERS = {
    "job.yaml": [["plan", "job.yaml", "--json", "--out", "out"], _evaluate("job.yaml")],
    "cluster.yaml": [["plan", "job.yaml", "--json", "--out", "out"], _evaluate("job.yaml")],
    "config.json": [["plan", "job.yaml", "--json", "--out", "out"], _evaluate("job.yaml")],
    "links.json": [_evaluate("job-links.yaml")],
    "nccl.json": [_evaluate("job-nccl.yaml")],
    "layers.json": [[*_evaluate("job.yaml"), "--profile", "layers.json"]],
    "gemm.json": [[*_evaluate("job.yaml"), "--profile", "gemm.json"]],
    "plan.json": [["explain", "plan.json"], ["explain", "plan.json", "--plan", "2", "--schedule", "1f1b"]],
    "loads.json": [["experts", "loads.json", "--slots-per-gpu", "3", "--ep-size", "16", "--gpus-per-node", "8", "--time-limit", "2",
                    "--out", "out"]],
    "all_reduce.log": [["profile", "nccl-tests", "all_reduce.log", "--out", "out.json"]],
}


def _run_and_check(seeds: dict[str, bytes], changed: dict[str, bytes], args: list[str], blamed: list[str]) -> int:
    """Write the seeds with ``changed`` over them, run ``args`` and check the
    module docstring's rules; ``blamed``: what an exit-2 message may name."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in {**seeds, **changed}.items():
            (folder / name).write_bytes(data)
        result, seconds = _invoke(folder, args)
        code, stderr = result.exit_code, result.stderr
        if currently_in_test_context():
            event(f"{args[0]} exit {code}")  # the outcome mix: pytest --hypothesis-show-statistics
        context = f"loom {' '.join(args)} -> {code}\n{stderr[-1500:]}"
        assert seconds < TIME_LIMIT_S, context
        assert code in (0, 2, 3), context
        assert "Traceback" not in result.output and "internal error" not in stderr, context
        if code == 2:
            lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
            assert len(lines) == 1 and lines[0].startswith("error: "), context
            assert any(name in lines[0] for name in blamed), context
            assert "expected" in lines[0] or "No such option" in lines[0] or "Missing" in lines[0], context
        if code == 3:
            assert any(line.startswith("infeasible: ") for line in stderr.splitlines()), context
        if code == 0 and "--json" in args:
            report = json.loads(result.stdout, parse_constant=lambda constant: pytest.fail(f"{constant} in the report\n{context}"))
            jsonschema.validate(report, PLAN_SCHEMA)
        out = [arg for flag, arg in zip(args, args[1:]) if flag == "--out"]
        if code != 0 and out:
            assert not (folder / out[0]).exists(), f"--out written on exit {code}\n{context}"
    return code


FILES = sorted(CONSUMERS)
# Each file may be blamed by its own name, or a file that names it (a job names
# its cluster and model; a cluster its profiles; evaluate blames layout flags).
BLAMED = {
    "job.yaml": ["job.yaml", "--"], "cluster.yaml": ["cluster.yaml", "job.yaml", "--"], "config.json": ["config.json", "job.yaml", "--"],
    "links.json": ["links.json", "cluster-links.yaml"], "nccl.json": ["nccl.json", "cluster-nccl.yaml"],
    "layers.json": ["layers.json"], "gemm.json": ["gemm.json"], "plan.json": ["plan.json", "--plan", "--schedule"],
    "loads.json": ["loads.json", "--"], "all_reduce.log": ["all_reduce.log"],
}


@settings(FUZZ, max_examples=360)
@given(data=st.data())
def test_mutated_files_are_named_or_planned(seeds, data):
    """360 files with one field deleted, mistyped, out of range or unknown."""
    name = data.draw(st.sampled_from([name for name in FILES if name != "all_reduce.log"]), label="file")
    document = data.draw(mutated_document(_parse(name, seeds[name])), label="document")
    args = data.draw(st.sampled_from(CONSUMERS[name]), label="command")
    _run_and_check(seeds, {name: _serialise(name, document)}, args, BLAMED[name])


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_corrupt_files_are_named(seeds, data):
    """120 files cut short, spliced with random bytes, not UTF-8 or empty:
    exit 2 naming the file (a cut that leaves a valid file may plan)."""
    name = data.draw(st.sampled_from(FILES), label="file")
    args = data.draw(st.sampled_from(CONSUMERS[name]), label="command")
    _run_and_check(seeds, {name: data.draw(corrupted_bytes(seeds[name]), label="bytes")}, args, BLAMED[name])


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_mutated_nccl_tests_rows_are_named(seeds, data):
    """40 nccl-tests logs with one number of one result row replaced."""
    lines = seeds["all_reduce.log"].decode().splitlines()
    rows = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#") and line.split()[0].isdigit()]
    row = data.draw(st.sampled_from(rows), label="row")
    tokens = lines[row].split()
    column = data.draw(st.integers(0, len(tokens) - 1), label="column")
    tokens[column] = data.draw(st.sampled_from(["nan", "inf", "-1", "-0.5", "1e999", "x", "", "3", "N/A", "99999999999999999999"]), label="value")
    lines[row] = "  ".join(tokens)
    args = CONSUMERS["all_reduce.log"][0]
    _run_and_check(seeds, {"all_reduce.log": "\n".join(lines).encode()}, args, BLAMED["all_reduce.log"])


FLAG_VALUES = st.one_of(
    st.integers(-(2**40), 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=10),
    st.sampled_from(["0", "-1", "nan", "inf", "1e9", "", "1,2", "abc", "bf16", "full", "4 GiB", "mfu", "mfu>=", "a/b/c.png", "x.txt"]),
)
# Flags per command (with what keeps the run short), each fuzzed alone.
FLAGS = {
    ("plan", "job.yaml", "--json", "--out", "out"): ["--model", "--cluster", "--global-batch-size", "--seq-length", "--precision",
                                                     "--framework", "--stack", "--memory-headroom", "--top-k", "--gate", "--profile"],
    ("evaluate", "job.yaml", "--json", "--out", "out"): ["--tp", "--pp", "--dp", "--cp", "--ep", "--etp", "--vpp", "--mbs", "--recompute",
                                                         "--recompute-modules", "--recompute-num-layers", "--zero-stage",
                                                         "--global-batch-size", "--seq-length", "--memory-headroom", "--gate"],
    ("explain", "plan.json"): ["--plan", "--schedule", "--timeline", "--candidates"],
    ("experts", "loads.json", "--time-limit", "2", "--out", "out"): ["--slots-per-gpu", "--ep-size", "--gpus-per-node", "--cross-node-cost",
                                                                    "--cross-gpu-cost", "--dense-layers", "--cluster", "--trace"],
    ("profile", "gemm", "config.json", "--gpu", "h100", "--repeats", "1", "--warmup", "0", "--out", "out.json"): ["--tp", "--dtype",
                                                                                                                 "--device"],
    ("profile", "layers", "config.json", "--gpu", "h100", "--seq-length", "64", "--repeats", "1", "--warmup", "0",
     "--out", "out.json"): ["--tp", "--micro-batch-size", "--ep", "--kinds", "--dtype", "--device", "--gpu"],
    ("profile", "nccl-tests", "all_reduce.log", "--out", "out.json"): ["--out"],
    # Valid values stop at the launcher check (no torchrun here): exit 2 as well.
    ("profile", "links", "--out", "out.json"): ["--message-bytes", "--repeats", "--warmup", "--max-group-size"],
}
# Flags that name a file: an error may name the file instead of the flag.
FILE_FLAGS = {"--model", "--cluster", "--profile", "--trace", "--timeline", "--candidates", "--out"}


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_bad_flag_values_are_named(seeds, data):
    """200 commands with one flag given a wrong value: exit 2 naming the
    flag, or a plan if the value happened to be valid."""
    base = data.draw(st.sampled_from(sorted(FLAGS)), label="command")
    flag = data.draw(st.sampled_from(FLAGS[base]), label="flag")
    value = data.draw(FLAG_VALUES, label="value")
    if base[0] == "experts":  # what it needs besides the fuzzed flag
        base = (*base, *([] if flag == "--slots-per-gpu" else ["--slots-per-gpu", "3"]),
                *([] if flag in ("--ep-size", "--cluster") else ["--ep-size", "16"]))
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in value) or "."  # Path('') is '.'
    blamed = [flag, *([shown] if flag in FILE_FLAGS else []), *(["environment"] if base[:2] == ("profile", "links") else [])]
    code = _run_and_check(seeds, {}, [*base, flag, value], blamed)
    if base[0] in ("plan", "evaluate") and flag in ("--tp", "--pp", "--mbs", "--top-k") and not _is_whole_number(value):
        assert code == 2


def _is_whole_number(text: str) -> bool:
    """'4' or '4.0' (which typer takes for 4)."""
    try:
        number = float(text)
    except ValueError:
        return False
    return math.isfinite(number) and number.is_integer()


def test_a_yaml_bomb_is_refused_quickly(seeds):
    """Nested aliases ("billion laughs") expand to 9^9 values: refused from
    the file's own size, not by expanding them."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = ("\n".join([yaml.safe_dump(CLUSTER).strip(), *lines]) + "\n").encode()
    started = time.perf_counter()
    assert _run_and_check(seeds, {"cluster.yaml": bomb}, _evaluate("job.yaml"), ["cluster.yaml"]) == 2
    assert time.perf_counter() - started < 5


def test_the_seeds_plan(seeds):
    """The harness's own control: unmutated, every consumer exits 0."""
    for name, commands in CONSUMERS.items():
        for args in commands:
            assert _run_and_check(seeds, {}, args, BLAMED[name]) == 0, (name, args)


def test_no_report_number_is_impossible(seeds):
    """A valid plan's JSON holds finite, non-negative times and bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        result, _ = _invoke(folder, ["plan", "job.yaml", "--json"])
    report = json.loads(result.stdout)

    def numbers(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from ((f"{key}.{path}", number) for path, number in numbers(item))
        elif isinstance(value, list):
            for item in value:
                yield from numbers(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield "", value

    found = list(numbers(report["plans"]))
    assert found and all(math.isfinite(number) for _, number in found)
    assert all(number >= 0 for path, number in found if path.endswith(("_s.", "_bytes.", "_s", "_bytes")))
