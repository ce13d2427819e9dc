"""The link profiler, run for real with gloo across 4 local processes under
torchrun; its tournament schedule; the links profile loader; and the
nccl-tests importer on two logs in nccl-tests' printed format."""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.specs.errors import SpecError
from loom.profiles import links_profile, nccl_tests
from loom.profiles.links import all_reduce_group_sizes, launch_from_env, physical_gpu, round_robin_rounds
from loom.profiles.links_profile import AllReduce, LinksProfile, links_document, load_links_profile, parse_links_document
from loom.profiles.nccl_tests import parse_nccl_tests_log, read_nccl_tests_log

DATA = Path(__file__).parent / "data" / "nccl-tests"
ALL_REDUCE_LOG = DATA / "all_reduce_perf-2x8-h100.log"
SENDRECV_LOG = DATA / "sendrecv_perf-node000-node001.log"
WORLD = 4
runner = CliRunner()


def assert_tournament(rounds, n: int) -> None:
    """Every pair of 0..n-1 exactly once; no rank twice in a round."""
    pairs = [tuple(pair) for pairs in rounds for pair in pairs]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))
    for pairs_of_round in rounds:
        ranks = [rank for pair in pairs_of_round for rank in pair]
        assert len(ranks) == len(set(ranks)), pairs_of_round


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    """``loom profile links`` under torchrun, 4 gloo processes, small messages."""
    out = tmp_path_factory.mktemp("links") / "links.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "loom.cli", "profile", "links", "--out", str(out), "--message-bytes", "262144", "--repeats", "5", "--warmup", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stderr.replace("\n", "")
    return out


def test_profiler_measures_every_pair_on_four_processes(measured):
    document = json.loads(measured.read_text())
    assert (document["backend"], document["device"], document["kind"]) == ("gloo", "cpu", "links")
    assert document["gpus"] == [{"rank": r, "host": socket.gethostname(), "local_gpu": r} for r in range(WORLD)]
    for field in ("bandwidth_GBps", "latency_s"):
        matrix = document[field]
        assert len(matrix) == WORLD and all(len(row) == WORLD for row in matrix), field
        for i, j in itertools.product(range(WORLD), repeat=2):
            if i == j:
                assert matrix[i][j] is None
            else:
                assert matrix[i][j] == matrix[j][i] and 0 < matrix[i][j] < math.inf, (field, i, j)
    assert_tournament(document["rounds"], WORLD)
    assert len(document["rounds"]) == WORLD - 1


def test_profiler_measures_all_reduce_per_group_size(measured):
    entries = json.loads(measured.read_text())["all_reduce"]
    assert [(entry["group_size"], entry["ranks"]) for entry in entries] == [(2, [0, 1]), (4, [0, 1, 2, 3])]
    for entry in entries:
        n = entry["group_size"]
        assert entry["busbw_GBps"] > 0 and entry["message_bytes"] == 262144
        assert entry["algbw_GBps"] == pytest.approx(entry["message_bytes"] / entry["time_s"] / 1e9)
        assert entry["busbw_GBps"] == pytest.approx(entry["algbw_GBps"] * 2 * (n - 1) / n)


def test_profile_validates_and_loads(measured):
    document = json.loads(measured.read_text())
    schema = json.loads(links_profile.SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(document, schema)
    profile = load_links_profile(measured)
    assert profile.hosts == (socket.gethostname(),) * WORLD and profile.local_gpus == tuple(range(WORLD))
    assert np.all(np.diag(profile.bandwidth_GBps) == np.inf) and np.all(np.diag(profile.latency_s) == 0)
    assert profile.bandwidth_GBps[0, 1] == document["bandwidth_GBps"][0][1]
    assert links_document(profile) == document  # the file round-trips


@pytest.mark.parametrize("n", range(2, 10))
def test_round_robin_rounds_are_a_tournament(n):
    rounds = round_robin_rounds(n)
    assert_tournament(rounds, n)
    assert len(rounds) == (n - 1 if n % 2 == 0 else n)
    assert all(len(pairs) == n // 2 for pairs in rounds)  # one bye per round when n is odd
    assert rounds == round_robin_rounds(n)


def test_all_reduce_group_sizes():
    assert all_reduce_group_sizes(8) == [2, 4, 8]
    assert all_reduce_group_sizes(6) == [2, 4, 6]
    assert all_reduce_group_sizes(16, max_group_size=4) == [2, 4]


def test_launch_from_torchrun_or_srun_environment():
    rendezvous = {"MASTER_ADDR": "node000", "MASTER_PORT": "29500"}
    torchrun = launch_from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", **rendezvous})
    srun = launch_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", **rendezvous})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank) == (5, 8, 1) and srun == torchrun
    with pytest.raises(SpecError) as error:
        launch_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"})
    assert error.value.field == "MASTER_ADDR"
    with pytest.raises(SpecError, match="torchrun"):
        launch_from_env({})


def test_cuda_visible_devices_map_to_the_nodes_gpu_numbers():
    assert physical_gpu(0, {"CUDA_VISIBLE_DEVICES": "3,1"}) == 3
    assert physical_gpu(1, {"CUDA_VISIBLE_DEVICES": "3,1"}) == 1
    assert physical_gpu(2, {}) == 2


def test_profile_links_outside_a_launcher_exits_2(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["profile", "links", "--out", str(tmp_path / "links.json")])
    assert result.exit_code == 2
    assert "torchrun" in result.output and "srun" in result.output
    assert not (tmp_path / "links.json").exists()


def test_modules_import_without_torch():
    """torch is optional: the planner reads profiles without it."""
    code = "import sys; sys.modules['torch'] = None; import loom.profiles.links, loom.cli.app"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def small_document() -> dict:
    """Two GPUs on node000 (NVLink) and one on node001."""
    bandwidth = np.array([[np.inf, 300.0, 40.0], [300.0, np.inf, 45.0], [40.0, 45.0, np.inf]])
    profile = LinksProfile(
        backend="nccl", device="NVIDIA H100 80GB HBM3", torch_version="2.13.0", hosts=("node000", "node000", "node001"),
        local_gpus=(0, 1, 0), message_bytes=1 << 26, latency_message_bytes=8, repeats=10, warmup=2,
        bandwidth_GBps=bandwidth, latency_s=np.where(np.isinf(bandwidth), 0.0, 1e-5), rounds=tuple(map(tuple, round_robin_rounds(3))),
        all_reduce=(AllReduce(2, (0, 1), 1 << 26, 4e-4, 167.8, 167.8),),
    )
    return links_document(profile)


@pytest.mark.parametrize(
    "break_it, field",
    [
        (lambda d: d["bandwidth_GBps"][1].__setitem__(2, 44.0), "bandwidth_GBps.1.2"),  # asymmetric
        (lambda d: d["latency_s"].pop(), "latency_s"),  # wrong shape: a row missing
        (lambda d: d["bandwidth_GBps"][0].append(1.0), "bandwidth_GBps.0"),  # wrong shape: a row too long
        (lambda d: d["bandwidth_GBps"][1].__setitem__(1, 900.0), "bandwidth_GBps.1.1"),  # a diagonal value
        (lambda d: d["bandwidth_GBps"][0].__setitem__(2, None), "bandwidth_GBps.0.2"),  # a pair missing
        (lambda d: d["latency_s"][0].__setitem__(1, -1e-5), "latency_s.0.1"),
        (lambda d: d["gpus"][2].__setitem__("rank", 0), "gpus.2.rank"),
        (lambda d: d["gpus"][1].__setitem__("local_gpu", 0), "gpus"),  # node000 GPU 0 twice
        (lambda d: d["all_reduce"][0].__setitem__("ranks", [0, 7]), "all_reduce.0.ranks"),
        (lambda d: d.__setitem__("kind", "nccl-tests"), "kind"),
        (lambda d: d.__setitem__("schema_version", 2), "schema_version"),
        # impossible numbers (JSON's NaN and Infinity, which Python writes and reads)
        (lambda d: d["bandwidth_GBps"][0].__setitem__(2, math.nan), "bandwidth_GBps.0.2"),
        (lambda d: d["bandwidth_GBps"][2].__setitem__(1, 0.0), "bandwidth_GBps.2.1"),
        (lambda d: d["latency_s"][1].__setitem__(2, math.inf), "latency_s.1.2"),
        (lambda d: d["all_reduce"][0].__setitem__("busbw_GBps", math.nan), "all_reduce.0.busbw_GBps"),
        (lambda d: d["all_reduce"][0].__setitem__("time_s", -4e-4), "all_reduce.0.time_s"),
    ],
)
def test_loader_rejects_malformed_profiles(tmp_path, break_it, field):
    document = small_document()
    parse_links_document(document, "ok.json")  # the unbroken document loads
    break_it(document)
    path = tmp_path / "links.json"
    path.write_text(json.dumps(document))
    with pytest.raises(SpecError) as error:
        load_links_profile(path)
    assert (error.value.source, error.value.field) == (str(path), field)


def test_a_cluster_on_an_impossible_links_profile_exits_2(tmp_path):
    """The planner prices links from the profile: an infinite bandwidth is bad input, not a plan."""
    document = small_document()
    document["bandwidth_GBps"][0][2] = document["bandwidth_GBps"][2][0] = math.inf
    (tmp_path / "links.json").write_text(json.dumps(document))
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 2, "gpus_per_node": 1, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 1,
                                                       "nic_Gbps": 400, "hosts": ["node000", "node001"], "links_profile": "links.json"}))
    result = runner.invoke(app, ["evaluate", "--cluster", str(tmp_path / "cluster.yaml"), "--model", "llama-3-8b"])
    shown = " ".join(result.output.split())
    assert result.exit_code == 2 and "links.json" in shown and "bandwidth_GBps.0.2" in shown and "finite" in shown, shown


def printed_busbw(path: Path) -> tuple[list[float], list[float], float]:
    """The out-of-place and in-place busbw columns and the average, read
    straight from the text (columns 8 and 12 of every row)."""
    text = path.read_text()
    rows = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    average = float(re.search(r"# Avg bus bandwidth\s*:\s*(\S+)", text).group(1))
    return [float(row[7]) for row in rows], [float(row[11]) for row in rows], average


@pytest.mark.parametrize("path, op, gpus", [(ALL_REDUCE_LOG, "all_reduce", 16), (SENDRECV_LOG, "sendrecv", 2)])
def test_nccl_tests_import_gives_the_printed_bus_bandwidths(path, op, gpus):
    run = read_nccl_tests_log(path)
    out_of_place, in_place, average = printed_busbw(path)
    assert [row.out_of_place.busbw_GBps for row in run.rows] == out_of_place
    assert [row.in_place.busbw_GBps for row in run.rows] == in_place
    assert run.avg_busbw_GBps == average
    assert run.op == op and len(run.gpus) == gpus
    assert [row.size_bytes for row in run.rows] == [8 << k for k in range(31)]
    assert {gpu.host for gpu in run.gpus} == ({"node000", "node001"})


def test_nccl_tests_import_reads_versions_and_unchecked_cells():
    all_reduce, sendrecv = read_nccl_tests_log(ALL_REDUCE_LOG), read_nccl_tests_log(SENDRECV_LOG)
    assert all_reduce.nccl_tests_version == "2.19.6" and sendrecv.nccl_tests_version is None
    assert all(row.in_place.wrong is None and row.out_of_place.wrong == 0 for row in sendrecv.rows)
    assert all_reduce.gpus[9].model_dump() == {"rank": 9, "host": "node001", "local_gpu": 1, "device": "NVIDIA H100 80GB HBM3"}


def test_nccl_tests_columns_are_found_by_name():
    """Per-iteration columns (-I 1) sit between the cells; the busbw is still found."""
    text = ALL_REDUCE_LOG.read_text().replace("#wrong     time", "#wrong    i_min     time")
    text = re.sub(r"^(( +\S+){9})", r"\1    12.5", text, flags=re.M)
    run = parse_nccl_tests_log(text, "all_reduce_perf.log")
    assert [row.in_place.busbw_GBps for row in run.rows] == printed_busbw(ALL_REDUCE_LOG)[1]


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda text: re.sub(r"# Avg bus bandwidth.*\n", "", text), "Avg bus bandwidth"),
        (lambda text: "\n".join(line for line in text.splitlines() if line.startswith("#")), "rows"),
        (lambda text: text.replace("Out of bounds values : 0 OK", "Out of bounds values : 3 FAILED"), "Out of bounds values"),
        (lambda text: text.replace("# Collective test starting: all_reduce_perf\n", ""), "op"),
    ],
)
def test_nccl_tests_import_names_what_is_wrong(edit, field):
    with pytest.raises(SpecError) as error:
        parse_nccl_tests_log(edit(ALL_REDUCE_LOG.read_text()), "run.log")
    assert (error.value.source, error.value.field) == ("run.log", field)


def test_nccl_tests_import_names_the_line_of_a_bad_number():
    lines = ALL_REDUCE_LOG.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.split()[:1] == ["1048576"])
    tokens = lines[number - 1].split()
    tokens[5] = tokens[5].replace(".", ",")  # the out-of-place time, in a decimal-comma locale
    lines[number - 1] = "  ".join(tokens)
    with pytest.raises(SpecError) as error:
        parse_nccl_tests_log("\n".join(lines), "run.log")
    assert error.value.field == f"line {number}" and error.value.got == tokens[5]


def _edit_cell(column: int, value: str, size: int = 1048576) -> tuple[str, int]:
    """The all-reduce log with column ``column`` of the row of ``size`` bytes
    set to ``value``, and that row's line number."""
    lines = ALL_REDUCE_LOG.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.split()[:1] == [str(size)])
    tokens = lines[number - 1].split()
    tokens[column] = value
    lines[number - 1] = "  ".join(tokens)
    return "\n".join(lines) + "\n", number


# Columns of a row: size count type redop root | time algbw busbw #wrong | time algbw busbw #wrong
@pytest.mark.parametrize("column, value, cell", [
    (5, "nan", "out_of_place.time_us"),
    (5, "0.00", "out_of_place.time_us"),
    (9, "-12.5", "in_place.time_us"),
    (6, "inf", "out_of_place.algbw_GBps"),
    (7, "-nan", "out_of_place.busbw_GBps"),
    (11, "-3.2", "in_place.busbw_GBps"),
    (8, "5", "out_of_place.wrong"),  # the result check failed: the timing is of a broken run
    (12, "1e+06", "in_place.wrong"),  # printed with %g
    (8, "nan", "out_of_place.wrong"),
])
def test_nccl_tests_rows_with_impossible_numbers_are_refused(column, value, cell):
    text, number = _edit_cell(column, value)
    with pytest.raises(SpecError) as error:
        parse_nccl_tests_log(text, "run.log")
    assert (error.value.source, error.value.field) == ("run.log", f"line {number} (size 1048576 B).{cell}")


def test_nccl_tests_run_that_moved_nothing_is_refused():
    """16 GPUs whose largest message shows 0 GB/s (maxBytes far too small
    to measure): nothing to calibrate the links with."""
    lines = [line for line in ALL_REDUCE_LOG.read_text().splitlines() if not line.split()[:1] or not line.split()[0].isdigit() or int(line.split()[0]) <= 64]
    with pytest.raises(SpecError) as error:
        parse_nccl_tests_log("\n".join(lines), "run.log")
    assert error.value.field == "rows" and "largest message (64 B)" in error.value.expected


def test_profile_nccl_tests_with_a_failed_check_exits_2(tmp_path):
    text, number = _edit_cell(8, "3")
    log = tmp_path / "all_reduce_perf.log"
    log.write_text(text)
    out = tmp_path / "nccl.json"
    result = runner.invoke(app, ["profile", "nccl-tests", str(SENDRECV_LOG), str(log), "--out", str(out)])
    shown = " ".join(result.output.split())
    assert result.exit_code == 2 and str(log) in shown and f"line {number} (size 1048576 B).out_of_place.wrong" in shown, shown
    assert "nccl-tests found wrong values" in shown and "(got 3.0)" in shown
    assert not out.exists()


def test_profile_nccl_tests_command_writes_a_valid_profile(tmp_path):
    out = tmp_path / "nccl.json"
    result = runner.invoke(app, ["profile", "nccl-tests", str(ALL_REDUCE_LOG), str(SENDRECV_LOG), "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    jsonschema.validate(document, json.loads(nccl_tests.SCHEMA_FILE.read_text()))
    assert [run["op"] for run in document["runs"]] == ["all_reduce", "sendrecv"]
    assert document["runs"][1]["rows"][-1]["out_of_place"]["busbw_GBps"] == printed_busbw(SENDRECV_LOG)[0][-1]
    bad = runner.invoke(app, ["profile", "nccl-tests", str(tmp_path / "missing.log"), "--out", str(out)])
    assert bad.exit_code == 2 and "missing.log" in bad.output


def test_shipped_schemas_match_the_models():
    assert links_profile.SCHEMA_FILE.read_text() == links_profile.json_schema()
    assert nccl_tests.SCHEMA_FILE.read_text() == nccl_tests.json_schema()
    schema = json.loads(links_profile.SCHEMA_FILE.read_text())
    document = small_document()
    jsonschema.validate(document, schema)
    del document["latency_s"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)
