"""Learning from runs (issue #17): the log and trace readers on fixtures
written from the frameworks' own format strings (tests/data/run_logs, each
reader's docstring cites them), ``loom compare`` naming the terms that
disagree, ``loom calibrate`` and ``--profile calib.json``, the trial files,
and 200 mutated logs that must give exit 2 or parse, never a traceback."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loom.cli.app import app
from loom.profiles import calibration
from loom.profiles.run_logs import read_run_log
from loom.planner.specs.errors import SpecError
from loom.profiles.run_logs.record import GiB, MiB

LOGS = Path(__file__).parent / "data" / "run_logs"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llama3-8b-h100.yaml"
LAYOUT = ["--tp", "2", "--pp", "2", "--mbs", "1"]  # the layout the Megatron fixtures' argument dump states
runner = CliRunner()


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory) -> Path:
    """``loom evaluate`` of the bundled example at TP2 PP2 (DP16), saved."""
    out = tmp_path_factory.mktemp("plan")
    result = runner.invoke(app, ["evaluate", str(EXAMPLE), *LAYOUT, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "plan.json"


def test_megatron_core_0_15_log():
    log = read_run_log(LOGS / "megatron-v0.15.log")
    assert log.format == "megatron" and log.warmup_logs == 1 and log.warmup_iterations == 10
    assert log.step_time_s() == pytest.approx(statistics.median([7.4015, 7.3982, 7.4209]))
    peak = log.peak_memory
    assert (peak.rank, peak.max_reserved_bytes, peak.max_allocated_bytes) == (0, 33024.0 * MiB, 31002.25 * MiB)
    assert {m.rank for m in log.memory} == {0, 33}
    # the first timer block is of the warm-up interval
    assert log.timers_s["forward-backward"] == pytest.approx(7.3)
    assert log.timers_s["optimizer"] == pytest.approx(0.0213)
    assert log.framework_estimate_bytes == 30000.75 * MiB
    assert log.arguments["tensor_model_parallel_size"] == "2"
    assert log.arguments["a_very_long_argument_name_that_is_fifty_chars_long"] == "yes"


def test_megatron_core_0_16_first_iteration_line_is_warm_up_too():
    log = read_run_log(LOGS / "megatron-v0.16.log")
    # iteration 1 is printed without resetting the timer: the line after it averages from iteration 1
    assert log.warmup_logs == 2 and log.warmup_iterations == 5
    assert log.step_time_s() == pytest.approx(7.0)
    assert log.peak_memory.max_reserved_bytes == 36000.0 * MiB  # the later report, with the optimizer state
    assert log.timers_s["forward-backward"] == pytest.approx(6.9)  # INFO:megatron.core.timers: header


def test_megatron_2023_log_under_launcher_prefixes():
    log = read_run_log(LOGS / "megatron-23.04.log")
    assert log.step_time_s() == pytest.approx(statistics.median([1.2346, 1.2404]))
    assert log.peak_memory is None and log.timers_s == {}


def test_torchtitan_logs():
    log = read_run_log(LOGS / "torchtitan-0.2.log")
    assert log.format == "torchtitan" and log.parameters == 8_030_261_248
    assert [i.tokens_per_s_per_gpu for i in log.steady] == [6543, 6602, 6580]
    assert log.step_time_s(tokens_per_step_per_gpu=8192.0) == pytest.approx(8192.0 / 6580)
    assert log.peak_memory.max_reserved_bytes == pytest.approx(45.91 * GiB)
    old = read_run_log(LOGS / "torchtitan-2024.log")
    assert [i.tokens_per_s_per_gpu for i in old.steady] == [7245, 7300]


def test_deepspeed_log():
    log = read_run_log(LOGS / "deepspeed.log")
    assert log.format == "deepspeed"
    # every printed step is past the timer's two warm-up steps
    assert log.warmup_logs == 0
    assert log.step_time_s(samples_per_step=512) == pytest.approx(statistics.median(512 / rate for rate in (60.5, 71.2, 70.8, 71.0)))
    assert log.peak_memory.max_allocated_bytes == pytest.approx(38.75 * GiB)
    assert log.timers_s["fwd"] == pytest.approx(2.0215)  # global timers only, steps 1 and 2 left out
    assert log.timers_s["bwd_allreduce"] == pytest.approx(0.2)


def test_profiler_trace_classifies_kernels_and_exposure():
    log = read_run_log(LOGS / "trace-rank0.json")
    assert log.format == "chrome-trace" and log.rank == 0 and log.warmup_logs == 1 and len(log.steady) == 2
    assert log.step_time_s() == pytest.approx(0.1)
    busy = log.timers_s
    assert (busy["gemm"], busy["attention"], busy["elementwise"], busy["optimizer"]) == pytest.approx((0.04, 0.01, 0.005, 0.003))
    # TP by the args Kineto copies onto the kernel, DP by its launching CPU op, PP a bare SendRecv
    assert (busy["tp_comm"], busy["dp_comm"], busy["pp_comm"]) == pytest.approx((0.004, 0.01, 0.002))
    assert "tp_comm" not in log.exposed_s  # under the GEMM and the attention kernel
    assert (log.exposed_s["dp_comm"], log.exposed_s["idle"]) == pytest.approx((0.01, 0.03))


def test_a_profiler_schedule_that_starts_late_has_no_warm_up_step(tmp_path):
    trace = json.loads((LOGS / "trace-rank0.json").read_text())
    trace["traceEvents"] = [e for e in trace["traceEvents"] if not e["name"].endswith("#0")
                            and not (e.get("cat") == "kernel" and e["ts"] < 1_100_000)]
    path = tmp_path / "late.json"
    path.write_text(json.dumps(trace))
    log = read_run_log(path)
    assert log.warmup_logs == 0 and len(log.steady) == 2


def _megatron_log(step_ms: list[float], timers: dict[str, float], args: dict[str, int], batch: int | list[int] = 512) -> str:
    """A Megatron-LM log written with training_log's and Timers.log's format
    strings; ``batch``: the global batch of every line, or of each."""
    batches = batch if isinstance(batch, list) else [batch] * len(step_ms)
    lines = ["------------------------ arguments ------------------------"]
    lines += ["  {} {} {}".format(k, "." * (48 - len(k)), v) for k, v in sorted(args.items())]
    lines.append("-------------------- end of arguments ---------------------")
    for i, ms in enumerate(step_ms):
        lines.append(" iteration {:8d}/{:8d} |".format(10 * (i + 1), 10 * len(step_ms)) + " consumed samples: {:12d} |".format(5120 * (i + 1))
                     + " elapsed time per iteration (ms): {:.1f} |".format(ms) + " global batch size: {:5d} |".format(batches[i]))
        lines.append("(min, max) time across ranks (ms):")
        lines += ["    {}: ({:.2f}, {:.2f})".format((name + " ").ljust(48, "."), value * 0.99, value) for name, value in timers.items()]
    return "\n".join(lines) + "\n"


def small_job(folder: Path, framework: str = "megatron") -> Path:
    """Llama-3 8B on one node of 8 H100: a job whose search takes a fraction of a second."""
    (folder / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                     "nics_per_node": 8, "nic_Gbps": 400}))
    (folder / "job.yaml").write_text(json.dumps({"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 32,
                                                 "seq_length": 4096, "framework": framework}))
    return folder / "job.yaml"


ARGS = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "data_parallel_size": 16, "micro_batch_size": 1,
        "global_batch_size": 512, "seq_length": 8192}


def test_compare_names_the_term_that_is_30_percent_off(plan_json, tmp_path):
    plan = json.loads(plan_json.read_text())["plans"][0]
    predicted, breakdown = plan["predicted"]["step_time_s"], plan["predicted"]["breakdown_s"]
    optimizer = breakdown["optimizer"] + breakdown["dp_param_gather"]
    measured = 1.3 * predicted  # all of the extra time in the pipeline, none in the optimizer
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([measured * 1e3 * 1.5] + [measured * 1e3] * 3,
                                 {"forward-backward": (measured - optimizer) * 1e3, "optimizer": optimizer * 1e3}, ARGS))
    result = runner.invoke(app, ["compare", str(plan_json), str(log), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["measured"]["step_time_s"] == pytest.approx(measured, rel=1e-3)
    assert report["predicted"]["step_time_s"] == pytest.approx(predicted)
    assert report["warmup_iterations"] == 10 and report["steady_intervals"] == 3
    terms = [row for row in report["rows"] if row["quantity"] not in ("step time", "peak memory")]
    assert terms[0]["quantity"] == "forward-backward" and terms[0]["error"] == pytest.approx(1 / 1.3 - 1, abs=0.02)
    assert abs(terms[-1]["error"]) < 0.02  # the optimizer: where loom was right
    table = runner.invoke(app, ["compare", str(plan_json), str(log)])
    assert "forward-backward" in table.output and "the pipeline" in table.output


def test_compare_refuses_a_peak_beyond_the_gpu(plan_json, tmp_path):
    """A rank that reports more memory than its GPU holds ran elsewhere (or
    the log was edited): refused naming the line, not compared."""
    log = tmp_path / "train.log"
    memory = "[Rank 0] (after 10 iterations) memory (MB) | allocated: 1.0 | max allocated: 2.0 | reserved: 3.0 | max reserved: 200000.0"
    log.write_text(_megatron_log([7000.0] * 3, {}, ARGS) + memory + "\n")
    result = runner.invoke(app, ["compare", str(plan_json), str(log)])
    assert result.exit_code == 2 and "a peak within the GPU's" in result.output and "line " in result.output, result.output
    # On a mixed cluster the peak may be a larger GPU's than the fullest stage's (plan.json 1.8's per-stage capacities).
    report = json.loads(plan_json.read_text())
    memory = report["plans"][0]["memory"]
    other = 1 - memory["peak_stage"]
    memory["per_stage_capacity_bytes"][other] = 300_000 * 2**20
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(report))
    accepted = runner.invoke(app, ["compare", str(mixed), str(log)])
    assert accepted.exit_code == 0, accepted.output


def test_compare_refuses_a_log_of_another_layout(plan_json, tmp_path):
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([7000.0] * 3, {}, {**ARGS, "tensor_model_parallel_size": 4}))
    result = runner.invoke(app, ["compare", str(plan_json), str(log)])
    assert result.exit_code == 2
    assert "tensor_model_parallel_size" in result.output and "expected 2" in result.output


def test_compare_and_calibrate_refuse_a_log_of_another_precision(plan_json, tmp_path):
    """An fp8 run against a bf16 plan is another job: its argument dump says so."""
    precision = json.loads(plan_json.read_text())["precision"]
    log = tmp_path / "train.log"
    for arguments, named in (({"bf16": "True", "fp8": "hybrid"}, "fp8"), ({"bf16": "False", "fp16": "True", "fp8": "None"}, "fp16"),
                             ({"bf16": "False", "fp16": "False", "fp8": "None"}, "bf16"), ({"fp16": "True"}, "fp16"),
                             ({"fp16": "False"}, "tf32")):
        log.write_text(_megatron_log([7000.0] * 3, {}, {**ARGS, **arguments}))
        for command in (["compare", str(plan_json), str(log)],
                        ["calibrate", str(EXAMPLE), str(plan_json), str(log), "--out", str(tmp_path / "c.json")]):
            result = runner.invoke(app, command)
            assert result.exit_code == 2 and f"the plan's precision, {precision}" in result.output and named in result.output, result.output
    log.write_text(_megatron_log([7000.0] * 3, {}, {**ARGS, "bf16": "True", "fp8": "None"}))
    assert runner.invoke(app, ["compare", str(plan_json), str(log)]).exit_code == 0


def test_an_fp8_log_of_another_recipe_is_refused(tmp_path):
    """An fp8 plan's recipe (delayed, tensorwise, mxfp8, blockwise) sets its GEMM rate: a log of another is another job."""
    job = small_job(tmp_path)
    (tmp_path / "job.yaml").write_text(json.dumps({**json.loads(job.read_text()), "precision": "fp8", "features": {"fp8_recipe": "tensorwise"}}))
    made = runner.invoke(app, ["evaluate", str(job), "--tp", "2", "--pp", "1", "--mbs", "1", "--out", str(tmp_path / "plan")])
    assert made.exit_code == 0, made.output
    plan_json = tmp_path / "plan" / "plan.json"
    plan = json.loads(plan_json.read_text())["plans"][0]["parallel"]
    arguments = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "data_parallel_size": plan["dp"], "micro_batch_size": 1,
                 "global_batch_size": plan["global_batch_size"], "bf16": "True", "fp8": "hybrid"}
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([7000.0] * 3, {}, {**arguments, "fp8_recipe": "delayed"}, batch=plan["global_batch_size"]))
    result = runner.invoke(app, ["compare", str(plan_json), str(log)])
    assert result.exit_code == 2 and "fp8_recipe" in result.output and "tensorwise" in result.output and "delayed" in result.output, result.output
    log.write_text(_megatron_log([7000.0] * 3, {}, {**arguments, "fp8_recipe": "tensorwise"}, batch=plan["global_batch_size"]))
    assert runner.invoke(app, ["compare", str(plan_json), str(log)]).exit_code == 0


def test_compare_and_calibrate_refuse_a_log_of_another_global_batch(plan_json, tmp_path):
    """A log without an argument dump still prints each iteration's global
    batch: one of another batch is another job, whatever its step time."""
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([7000.0] * 3, {}, {}, batch=256))
    for command in (["compare", str(plan_json), str(log)],
                    ["calibrate", str(EXAMPLE), str(plan_json), str(log), "--out", str(tmp_path / "c.json")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "global batch size 512" in result.output and "got 256" in result.output, result.output
    assert not (tmp_path / "c.json").exists()


def test_compare_refuses_timing_a_batch_size_ramp_up(plan_json, tmp_path):
    """--rampup-batch-size grows the batch over the first samples: intervals
    timed before it reaches the plan's batch are of another step."""
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([7000.0] * 5, {}, ARGS, batch=[256, 384, 384, 512, 512]))
    result = runner.invoke(app, ["compare", str(plan_json), str(log)])
    assert result.exit_code == 2 and "ramp-up" in result.output and "got 384" in result.output, result.output


def test_calibrate_counts_a_run_once(plan_json, tmp_path):
    predicted = json.loads(plan_json.read_text())["plans"][0]["predicted"]["step_time_s"]
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([predicted * 1.1e3] * 4, {}, ARGS))
    result = runner.invoke(app, ["calibrate", str(EXAMPLE), str(plan_json), str(log), str(plan_json), str(log), "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 2 and "each run once" in result.output and not (tmp_path / "c.json").exists()


def test_calibrate_then_plan_with_it(plan_json, tmp_path):
    predicted = json.loads(plan_json.read_text())["plans"][0]["predicted"]["step_time_s"]
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([predicted * 1.1e3] * 4, {}, ARGS))  # the run is 10% slower than loom says
    out = tmp_path / "calib.json"
    result = runner.invoke(app, ["calibrate", str(EXAMPLE), str(plan_json), str(log), "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = calibration.read_calibration(out)
    assert document.gemm.value < 1 and document.gemm.value == document.attention.value == document.elementwise.value
    run = document.runs[0]
    assert run.calibrated_step_time_s == pytest.approx(run.measured_step_time_s, rel=1e-3)
    before = runner.invoke(app, ["evaluate", str(EXAMPLE), *LAYOUT, "--json"])
    after = runner.invoke(app, ["evaluate", str(EXAMPLE), *LAYOUT, "--json", "--profile", str(out)])
    assert after.exit_code == 0 and "measured, not estimated" in after.output
    step = lambda r: json.loads(r.stdout)["plans"][0]["predicted"]["step_time_s"]  # noqa: E731
    assert step(after) == pytest.approx(1.1 * step(before), rel=1e-3)


def test_calibrate_refuses_a_run_loom_cannot_be_describing(plan_json, tmp_path):
    predicted = json.loads(plan_json.read_text())["plans"][0]["predicted"]["step_time_s"]
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([predicted * 5e3] * 4, {}, ARGS))
    out = tmp_path / "calib.json"
    result = runner.invoke(app, ["calibrate", str(EXAMPLE), str(plan_json), str(log), "--out", str(out)])
    assert result.exit_code == 2 and "step time" in result.output and not out.exists()


def test_a_calibration_of_another_gpu_is_refused(plan_json, tmp_path):
    predicted = json.loads(plan_json.read_text())["plans"][0]["predicted"]["step_time_s"]
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([predicted * 1e3] * 3, {}, ARGS))
    out = tmp_path / "calib.json"
    assert runner.invoke(app, ["calibrate", str(EXAMPLE), str(plan_json), str(log), "--out", str(out)]).exit_code == 0
    document = json.loads(out.read_text())
    for field, value in (("gpu", "A100-SXM4-80GB"), ("precision", "banana"), ("framework", "pytorch-lightning")):
        out.write_text(json.dumps({**document, field: value}))
        result = runner.invoke(app, ["evaluate", str(EXAMPLE), *LAYOUT, "--profile", str(out)])
        assert result.exit_code == 2 and f"field '{field}'" in result.output, result.output
    # a GEMM factor learnt at fp8 does not apply to a bf16 job: not claimed as applied
    claimed = {}
    for precision in ("bf16", "fp8"):
        out.write_text(json.dumps({**document, "precision": precision, "attention": None, "elementwise": None}))
        result = runner.invoke(app, ["evaluate", str(EXAMPLE), *LAYOUT, "--profile", str(out)])
        assert result.exit_code == 0, result.output
        claimed[precision] = "gemm x" in result.output
    assert claimed == {"bf16": True, "fp8": False}


def test_calibration_schema_is_in_sync():
    assert calibration.SCHEMA_FILE.read_text() == calibration.schema_json()


def test_trials_write_each_plan_with_its_reports_on(tmp_path):
    job, out = small_job(tmp_path), tmp_path / "plans"
    for _ in range(2):  # the second rewrites the folder it wrote
        result = runner.invoke(app, ["plan", str(job), "--top-k", "3", "--trials", "2", "--out", str(out)])
        assert result.exit_code == 0, result.output
    best = json.loads((out / "plan.json").read_text())["plans"]
    for number in (1, 2):
        folder = out / f"trial-{number}"
        assert json.loads((folder / "plan.json").read_text())["plans"][0]["label"] == best[number - 1]["label"]
        script = (folder / "train.sh").read_text()
        assert "--train-iters 30" in script and "--log-throughput" in script and "--timing-log-level 1" in script
    assert "--log-throughput" not in (out / "train.sh").read_text()
    # the trial folders feed loom calibrate directly: trial 1 ran as predicted, trial 2 20% slower
    for number, slower in ((1, 1.0), (2, 1.2)):
        predicted = best[number - 1]["predicted"]["step_time_s"]
        (out / f"trial-{number}" / "train.log").write_text(_megatron_log([predicted * 1e3 * slower] * 3, {}, {}, batch=32))
    calib = tmp_path / "calib.json"
    fitted = runner.invoke(app, ["calibrate", str(job), str(out / "trial-1"), str(out / "trial-2"), "--out", str(calib)])
    assert fitted.exit_code == 0, fitted.output
    document = calibration.read_calibration(calib)
    assert 1 / 1.2 < document.gemm.value < 1.0 and [run.layout for run in document.runs] == [plan["label"] for plan in best[:2]]
    # the re-ranked plan, set against the fastest run measured
    replanned = runner.invoke(app, ["plan", str(job), "--top-k", "1", "--profile", str(calib)])
    assert replanned.exit_code == 0, replanned.output
    assert "measured, not estimated" in replanned.output and best[0]["label"] in replanned.output.split("fastest run")[1]


def test_more_trials_than_top_k_say_so_and_leave_the_plan_alone(tmp_path):
    """--trials 3 with --top-k 1 writes the one plan kept and says how to get
    more; asking for trials never changes plan 1 (how many plans the search
    keeps can: uneven splits are tried on those kept)."""
    job, out = small_job(tmp_path), tmp_path / "plans"
    result = runner.invoke(app, ["plan", str(job), "--top-k", "1", "--trials", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.glob("trial-*")) == ["trial-1"] and "raise --top-k" in result.output
    plain = runner.invoke(app, ["plan", str(job), "--top-k", "1", "--json"])
    assert json.loads(plain.stdout)["plans"][0]["label"] == json.loads((out / "plan.json").read_text())["plans"][0]["label"]


def test_trials_need_an_out_folder():
    result = runner.invoke(app, ["plan", str(EXAMPLE), "--trials", "2"])
    assert result.exit_code == 2 and "--trials" in result.output


def _mutated(text: str, rng: random.Random) -> str:
    """One of: truncated, a number turned to junk, a line dropped or repeated, bytes spliced in."""
    kind = rng.randrange(5)
    if kind == 0:
        return text[: rng.randrange(len(text))]
    if kind == 1:
        digits = [i for i, c in enumerate(text) if c.isdigit()]
        at = rng.choice(digits)
        return text[:at] + rng.choice(["nan", "-1", "1e999", "x", "", ",", "9" * 400, "inf"]) + text[at + 1:]
    lines = text.splitlines()
    at = rng.randrange(len(lines))
    if kind == 2:
        return "\n".join(lines[:at] + lines[at + 1:])
    if kind == 3:
        return "\n".join(lines[: at + 1] + lines[at:])
    return text[:at] + "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(1, 40))) + text[at:]


def test_200_mutated_logs_exit_2_or_parse_never_a_traceback(plan_json, tmp_path):
    rng = random.Random(17)
    sources = sorted(LOGS.iterdir())
    codes = []
    for index in range(200):
        source = rng.choice(sources)
        path = tmp_path / f"{index}{source.suffix}"
        path.write_bytes(_mutated(source.read_text(), rng).encode("utf-8", errors="surrogatepass"))
        result = runner.invoke(app, ["compare", str(plan_json), str(path), "--json"])
        assert result.exit_code in (0, 2), f"{source.name} mutation {index}: exit {result.exit_code}: {result.output[-400:]}"
        assert "Traceback" not in result.output
        if result.exit_code == 2:
            assert result.output.count("\n") == 1 and str(path) in result.output  # one line naming the file
        codes.append(result.exit_code)
    assert codes.count(2) >= 50  # the mutations do break most logs


def test_compare_a_job_with_the_layout_its_megatron_log_prints(plan_json):
    result = runner.invoke(app, ["compare", str(EXAMPLE), str(LOGS / "megatron-v0.15.log"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["plan"] == json.loads(plan_json.read_text())["plans"][0]["label"] == "TP2 PP2 DP16 mbs1 SP DO"
    assert report["predicted"]["step_time_s"] == pytest.approx(json.loads(plan_json.read_text())["plans"][0]["predicted"]["step_time_s"])
    refused = runner.invoke(app, ["compare", str(EXAMPLE), str(LOGS / "torchtitan-0.2.log")])
    assert refused.exit_code == 2 and "argument dump" in refused.output


def test_megatron_arguments_give_interleaving_and_block_recompute():
    from loom.planner.calibrate.megatron_layout import layout_from_arguments
    from loom.planner.specs.errors import SpecError
    from loom.planner.specs.job import load_job

    job = load_job(EXAMPLE)
    arguments = {"tensor_model_parallel_size": "2", "pipeline_model_parallel_size": "4", "data_parallel_size": "8", "micro_batch_size": "1",
                 "global_batch_size": "512", "num_layers_per_virtual_pipeline_stage": "2", "recompute_granularity": "full",
                 "recompute_method": "block", "recompute_num_layers": "3", "sequence_parallel": "True", "num_layers": "32"}
    layout = layout_from_arguments(job, arguments, "train.log")
    assert (layout.vpp, layout.recompute, layout.recompute_num_layers, layout.sequence_parallel) == (4, "full", 3, True)
    assert layout_from_arguments(job, {**arguments, "recompute_method": "uniform"}, "train.log").recompute_num_layers == 0
    with pytest.raises(SpecError, match="num_layers"):
        layout_from_arguments(job, {**arguments, "num_layers": "80"}, "train.log")
    # Megatron fills expert_tensor_parallel_size with TP even for a dense model: no experts, no ETP.
    assert layout_from_arguments(job, {**arguments, "expert_tensor_parallel_size": "2"}, "train.log").etp == 1


@pytest.mark.parametrize("framework", ["torchtitan", "deepspeed"])
def test_trial_files_load_in_their_frameworks(framework, tmp_path, monkeypatch):
    result = runner.invoke(app, ["plan", str(small_job(tmp_path, framework)), "--top-k", "1", "--trials", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    trial = tmp_path / "out" / "trial-1"
    if framework == "torchtitan":
        from torchtitan.config import ConfigManager

        config = ConfigManager().parse_args(["--job.config_file", str(trial / "job.toml")])
        assert (config.training.steps, config.metrics.log_freq, config.profiling.enable_profiling) == (30, 5, True)
    else:
        from deepspeed.runtime import config as ds_config_module

        monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda: 0)
        dp = json.loads((trial / "plan.json").read_text())["plans"][0]["parallel"]["dp"]
        mpu = type("Mpu", (), {"get_data_parallel_world_size": lambda self: dp})()
        config = ds_config_module.DeepSpeedConfig(json.loads((trial / "ds_config.json").read_text()), mpu=mpu)
        assert (config.steps_per_print, config.wall_clock_breakdown) == (5, True)
        # the trial folder's own ds_config.json is not taken for a trace; a run at loom's pace calibrates to 1
        plan = json.loads((trial / "plan.json").read_text())["plans"][0]
        rate = plan["parallel"]["global_batch_size"] / plan["predicted"]["step_time_s"]
        (trial / "train.log").write_text("".join(
            f"[Rank 0] epoch=0/micro_step={step}/global_step={step}, RunningAvgSamplesPerSec={rate}, CurrSamplesPerSec={rate}, "
            "MemAllocated=20.0GB, MaxMemAllocated=30.0GB\n" for step in (5, 10, 15)))
        fitted = runner.invoke(app, ["calibrate", str(tmp_path / "job.yaml"), str(trial), "--out", str(tmp_path / "calib.json")])
        assert fitted.exit_code == 0, fitted.output
        assert calibration.read_calibration(tmp_path / "calib.json").gemm.value == pytest.approx(1.0, abs=1e-3)


def _trace_of(plan_json: Path, path: Path, gemm_speed: float) -> None:
    """A two-step trace of the plan's stage 0 whose GEMMs run ``gemm_speed`` x loom's rate, TP collectives 25% slower."""
    from loom.planner.calibrate.fit import plan_of
    from loom.planner.output.report import read_report
    from loom.planner.specs.job import load_job

    report = read_report(plan_json)
    plan = plan_of(load_job(EXAMPLE), report, report.plans[0], str(plan_json))
    kernels, tp_busy = plan.step.stage_kernels[0], plan.step.stage_tp_busy_s[0]
    # attention and elementwise as predicted
    durations = [("sm90_xmma_gemm_bf16bf16_bf16f32", kernels.gemm_s / gemm_speed, {}), ("flash_fwd_kernel", kernels.attention_s, {}),
                 ("vectorized_elementwise_kernel", kernels.elementwise_s, {}),
                 ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", tp_busy * 1.25, {"Process Group Description": "TENSOR_MODEL_PARALLEL_GROUP"})]
    window_us = 2e6 * sum(seconds for _, seconds, _ in durations)
    events = []
    for step in (1, 2):  # a profiler schedule that starts after warm-up
        start = step * window_us
        events.append({"ph": "X", "cat": "gpu_user_annotation", "name": f"ProfilerStep#{step}", "ts": start, "dur": window_us, "pid": 0, "tid": 1})
        for name, seconds, args in durations:
            events.append({"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": seconds * 1e6, "pid": 0, "tid": 7, "args": {"device": 0, **args}})
            start += seconds * 1e6
    path.write_text(json.dumps({"distributedInfo": {"rank": 0}, "traceEvents": events}))


def test_calibrate_from_a_trace_learns_each_kernel_kind_and_the_tp_link(plan_json, tmp_path):
    trace = tmp_path / "rank0.json"
    _trace_of(plan_json, trace, 0.9)
    out = tmp_path / "calib.json"
    result = runner.invoke(app, ["calibrate", str(EXAMPLE), str(plan_json), str(trace), "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = calibration.read_calibration(out)
    assert document.gemm.value == pytest.approx(0.9) and "trace" in document.gemm.source
    assert (document.attention.value, document.elementwise.value) == pytest.approx((1.0, 1.0))
    assert document.nvlink.value == pytest.approx(0.8) and document.network is None  # TP2 within a node
    _trace_of(plan_json, trace, 1.6)  # GEMMs past the H100's bf16 peak
    result = runner.invoke(app, ["calibrate", str(EXAMPLE), str(plan_json), str(trace), "--out", str(tmp_path / "fast.json")])
    assert result.exit_code == 2 and "peak" in result.output and str(trace) in result.output


def test_torchtitan_skips_validation_lines_and_keeps_one_ranks_steps(tmp_path):
    line = "[rank{r}]:[titan] 2025-07-21 15:57:42,774 - root - INFO - {kind}step: {step:2}  loss: 7.00000  memory: {gib:5.2f}GiB(50.00%)  tps: {tps:,}  tflops: 300.00  mfu: 30.00%"
    lines = []
    for step, tps in ((1, 500), (5, 6000), (10, 6100), (15, 6050)):
        for rank, gib in ((0, 40.0), (7, 45.5)):  # under PP, LOG_RANK=0,7: the last rank has the loss
            lines.append(line.format(r=rank, kind="", step=step, gib=gib, tps=tps + rank))
        if step == 10:
            lines.append(line.format(r=7, kind="validate ", step=step, gib=45.5, tps=9999))
    path = tmp_path / "titan.log"
    path.write_text("\n".join(lines) + "\n")
    log = read_run_log(path)
    assert [i.tokens_per_s_per_gpu for i in log.steady] == [6007, 6107, 6057]  # rank 7's, validation left out
    assert {m.rank: m.max_reserved_bytes for m in log.memory} == {0: 40.0 * GiB, 7: 45.5 * GiB}
    assert log.peak_memory.rank == 7


def _v016_line(iteration: int, total: int, ms: float) -> str:
    return (f" [2026-03-01 12:00:00.123456] iteration {iteration:8d}/{total:8d} |" + " consumed samples: {:12d} |".format(iteration * 8)
            + " elapsed time per iteration (ms): {:.1f} |".format(ms) + " global batch size: {:5d} |".format(8))


def test_a_resumed_megatron_0_16_run_skips_its_own_first_iterations(tmp_path):
    # resumed at 5000, log interval 5: 5001 is the unreset first-iteration line, 5005 averages from it
    lines = [_v016_line(5001, 5020, 30000.0), _v016_line(5005, 5020, 10040.0)]
    lines += [_v016_line(it, 5020, 6250.0) for it in (5010, 5015, 5020)]
    path = tmp_path / "resumed.log"
    path.write_text("\n".join(lines) + "\n")
    log = read_run_log(path)
    assert log.warmup_logs == 2 and log.warmup_iterations == 5
    assert log.step_time_s() == pytest.approx(6.25)


# srun -l pads its task ids to the widest one's width; srun around torchrun stacks both labels
@pytest.mark.parametrize("label", ["63: ", "  7: ", "[default0]:", "  7: [default0]:", "node01: [default0]:"])
def test_megatron_timers_every_option_and_prefix(tmp_path, label):
    body = [_v016_line(it, 30, ms) for it, ms in ((10, 9000.0), (20, 7000.0), (30, 7000.0))]
    lines = []
    for index, line in enumerate(body):
        lines.append(label + line)
        lines += [label + text for text in ("times across ranks (ms):", "  forward-backward:", "     rank  0: 6800.00", "     rank  1: 6900.00")]
        lines.append("[Rank 32] (after 10 iterations) memory (MB) | allocated: 1.0 | max allocated: 2.0 | reserved: 3.0 | max reserved: 4.0")
        lines += [label + text for text in ("  optimizer:", "     rank  0: 20.00", "     rank  1: 25.00")]
    path = tmp_path / "srun.log"
    path.write_text("\n".join([label + "------------------------ arguments ------------------------", label + "  log_interval .... 10",
                               label + "-------------------- end of arguments ---------------------", *lines]) + "\n")
    log = read_run_log(path)
    assert log.arguments == {"log_interval": "10"} and log.warmup_logs == 2  # core 0.16's timestamps: its first line is the first iteration's
    assert log.timers_s == pytest.approx({"forward-backward": 6.9, "optimizer": 0.025})  # the slowest rank, foreign lines between


def test_a_step_spans_every_streams_annotation(tmp_path):
    trace = json.loads((LOGS / "trace-rank0.json").read_text())
    extra = [dict(e, tid=99, ts=e["ts"] - 10_000, dur=20_000) for e in trace["traceEvents"] if e.get("cat") == "gpu_user_annotation"]
    for order in ("first", "last"):
        events = extra + trace["traceEvents"] if order == "first" else trace["traceEvents"] + extra
        path = tmp_path / f"{order}.json"
        path.write_text(json.dumps({**trace, "traceEvents": events}))
        assert read_run_log(path).step_time_s() == pytest.approx(0.11)  # from 10 ms before the kernels' stream to its end


def test_deepspeed_skips_a_step_too_short_to_time(tmp_path):
    text = (LOGS / "deepspeed.log").read_text().replace("CurrSamplesPerSec=71.2", "CurrSamplesPerSec=inf")
    path = tmp_path / "ds.log"
    path.write_text(text)
    assert [i.samples_per_s for i in read_run_log(path).steady] == [60.5, 70.8, 71.0]


def test_an_mxfp8_jobs_own_trial_calibrates(tmp_path):
    """precision mxfp8 is saved as fp8 with fp8_recipe mxfp8: calibrate reads
    it back as mxfp8, not as fp8 with the stack's default recipe."""
    job = small_job(tmp_path)
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "B200", "nvlink_GBps": 900,
                                                       "nics_per_node": 8, "nic_Gbps": 400}))
    (tmp_path / "job.yaml").write_text(json.dumps({**json.loads(job.read_text()), "precision": "mxfp8"}))
    out = tmp_path / "plans"
    made = runner.invoke(app, ["plan", str(job), "--top-k", "1", "--trials", "1", "--out", str(out)])
    assert made.exit_code == 0, made.output
    predicted = json.loads((out / "trial-1" / "plan.json").read_text())["plans"][0]["predicted"]["step_time_s"]
    (out / "trial-1" / "train.log").write_text(_megatron_log([predicted * 1e3] * 3, {}, {}, batch=32))
    fitted = runner.invoke(app, ["calibrate", str(job), str(out / "trial-1"), "--out", str(tmp_path / "calib.json")])
    assert fitted.exit_code == 0, fitted.output
    assert calibration.read_calibration(tmp_path / "calib.json").gemm.value == pytest.approx(1.0, abs=1e-3)


def test_calibrate_prices_the_plan_as_it_was_made(tmp_path):
    job, out = small_job(tmp_path), tmp_path / "plans"
    made = runner.invoke(app, ["plan", str(job), "--top-k", "1", "--stack", "megatron-bridge", "--trials", "1", "--out", str(out)])
    assert made.exit_code == 0, made.output
    predicted = json.loads((out / "trial-1" / "plan.json").read_text())["plans"][0]["predicted"]["step_time_s"]
    (out / "trial-1" / "train.log").write_text(_megatron_log([predicted * 1e3] * 3, {}, {}, batch=32))
    calib = tmp_path / "calib.json"
    fitted = runner.invoke(app, ["calibrate", str(job), str(out / "trial-1"), "--out", str(calib)])
    assert fitted.exit_code == 0, fitted.output
    run = calibration.read_calibration(calib).runs[0]
    assert run.predicted_step_time_s == pytest.approx(predicted)  # the bridge stack's features, not the YAML's
    assert calibration.read_calibration(calib).gemm.value == pytest.approx(1.0, abs=1e-3)
    # a second run into the folder keeps the user's log: refused, naming it
    again = runner.invoke(app, ["plan", str(job), "--top-k", "1", "--trials", "1", "--out", str(out)])
    assert again.exit_code == 2 and "trial-1/train.log" in again.output
    # and the calibration cannot overwrite an input, nor be applied twice
    clobber = runner.invoke(app, ["calibrate", str(job), str(out / "trial-1"), "--out", str(out / "trial-1" / "train.log")])
    assert clobber.exit_code == 2 and "--out" in clobber.output
    twice = runner.invoke(app, ["plan", str(job), "--profile", str(calib), "--profile", str(calib)])
    assert twice.exit_code == 2 and "one calibration per GPU type" in twice.output


def test_calibrate_refuses_memory_and_speed_no_plan_explains(plan_json, tmp_path):
    predicted = json.loads(plan_json.read_text())["plans"][0]["predicted"]["step_time_s"]
    log = tmp_path / "train.log"
    memory = "[Rank 0] (after 10 iterations) memory (MB) | allocated: 1.0 | max allocated: 79000.0 | reserved: 79000.0 | max reserved: 79000.0"
    log.write_text(_megatron_log([predicted * 1e3] * 3, {}, ARGS) + memory + "\n")
    result = runner.invoke(app, ["calibrate", str(EXAMPLE), str(plan_json), str(log), "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 2 and str(log) in result.output and "GiB" in result.output
    log.write_text(_megatron_log([predicted * 1e3 / 5] * 3, {}, ARGS))  # 5x faster than loom: past the GPU's peak rates
    result = runner.invoke(app, ["calibrate", str(EXAMPLE), str(plan_json), str(log), "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 2 and "faster than the GPU's peak" in result.output


def test_torchtitan_without_an_output_filter_repeats_each_step(tmp_path):
    line = "step: {step:2}  loss: 7.00000  memory: {gib:5.2f}GiB(50.00%)  tps: {tps:,}  tflops: 300.00  mfu: 30.00%"
    lines = [line.format(step=step, gib=40.0 + copy, tps=tps + copy) for step, tps in ((1, 500), (5, 6000), (10, 6100)) for copy in range(4)]
    path = tmp_path / "titan.log"
    path.write_text("\n".join(lines) + "\n")
    log = read_run_log(path)
    assert [i.tokens_per_s_per_gpu for i in log.steady] == [6000, 6100]  # the first copy of each step
    assert log.peak_memory.max_reserved_bytes == 43.0 * GiB


@pytest.mark.parametrize("name", ["megatron-v0.15.log", "torchtitan-0.2.log", "deepspeed.log"])
def test_a_line_cut_short_is_left_out_at_the_end_and_refused_before_it(name, tmp_path):
    lines = (LOGS / name).read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if "iteration" in line or "tps:" in line or "CurrSamplesPerSec" in line)
    cut = lines[last][: lines[last].index("elapsed" if "iteration" in lines[last] else "tps:" if "tps:" in lines[last] else "CurrSamples") + 20]
    whole = read_run_log(LOGS / name)
    (tmp_path / "end.log").write_text("\n".join(lines[:last] + [cut]) + "\n")
    assert len(read_run_log(tmp_path / "end.log").intervals) == len(whole.intervals) - 1
    (tmp_path / "middle.log").write_text("\n".join(lines[:last] + [cut] + lines[last:]) + "\n")
    with pytest.raises(SpecError, match="cut short"):
        read_run_log(tmp_path / "middle.log")


def test_compare_checks_a_traces_rank_and_counts_collectives_of_no_group(plan_json, tmp_path):
    trace = json.loads((LOGS / "trace-rank0.json").read_text())
    for event in trace["traceEvents"]:
        event.get("args", {}).pop("Process Group Description", None)
    path = tmp_path / "old-torch.json"
    path.write_text(json.dumps(trace))
    report = json.loads(runner.invoke(app, ["compare", str(plan_json), str(path), "--json"]).stdout)
    assert report["measured"]["terms"]["comm"] > 0  # the TP and DP kernels, named by no group
    # ... set against all of loom's communication once, not again group by group at 0
    assert "tp_comm" not in report["measured"]["terms"] and "dp_comm" not in report["measured"]["terms"]
    named = json.loads(runner.invoke(app, ["compare", str(plan_json), str(LOGS / "trace-rank0.json"), "--json"]).stdout)
    assert "comm" not in named["measured"]["terms"] and named["measured"]["terms"]["dp_comm"] > 0
    path.write_text(json.dumps({**trace, "distributedInfo": {"rank": 1000}}))
    result = runner.invoke(app, ["compare", str(plan_json), str(path)])
    assert result.exit_code == 2 and "distributedInfo.rank" in result.output


def test_calibrate_never_replaces_what_is_not_a_calibration(plan_json, tmp_path):
    other = tmp_path / "cluster.yaml"
    other.write_text("nodes: 8\n")
    log = tmp_path / "train.log"
    log.write_text(_megatron_log([7000.0] * 3, {}, ARGS))
    result = runner.invoke(app, ["calibrate", str(EXAMPLE), str(plan_json), str(log), "--out", str(other)])
    assert result.exit_code == 2 and other.read_text() == "nodes: 8\n"


def test_a_megatron_run_that_stopped_before_logging_says_so(plan_json, tmp_path):
    log = tmp_path / "crash.log"
    log.write_text(_megatron_log([], {}, ARGS) + "RuntimeError: CUDA out of memory\n")
    result = runner.invoke(app, ["compare", str(plan_json), str(log)])
    assert result.exit_code == 2 and "logged none" in result.output


def _deepspeed_pipeline_log(iteration_s: list[float], batch: int, every: int, timers_ms: dict[str, float]) -> str:
    """A PipelineEngine's rank-0 stdout, in its own formats (deepspeed/runtime/pipe/engine.py
    train_batch, utils/timer.py Timers.log): the timers are sums over ``every`` steps."""
    lines = []
    for index, seconds in enumerate(iteration_s):
        if timers_ms:
            lines.append("time (ms) | " + " | ".join(f"{name}: {every * ms:.2f}" for name, ms in timers_ms.items()))
        lines.append(f"steps: {every * (index + 1)} loss: 10.4321 iter time (s): {seconds:0.3f} samples/sec: {batch / seconds:0.3f}")
    return "\n".join(lines) + "\n"


def test_deepspeed_pipeline_log_is_compared_and_calibrated(tmp_path):
    """A DeepSpeed pipeline run prints no throughput-timer line (PipelineEngine
    skips DeepSpeedEngine.step): its 'steps: ... iter time (s)' lines time it."""
    job, out = small_job(tmp_path, "deepspeed"), tmp_path / "plan"
    made = runner.invoke(app, ["evaluate", str(job), "--tp", "1", "--pp", "2", "--mbs", "1", "--zero-stage", "1", "--out", str(out)])
    assert made.exit_code == 0, made.output
    plan = json.loads((out / "plan.json").read_text())["plans"][0]
    predicted, bubble = plan["predicted"]["step_time_s"], plan["predicted"]["breakdown_s"]["pipeline_bubble"]
    measured = 1.2 * predicted
    log = tmp_path / "train.log"
    log.write_text(_deepspeed_pipeline_log([3 * measured, measured, measured, measured], 32, 5,
                                           {"pipe_recv_input": 1e3 * bubble / 2, "pipe_recv_grad": 1e3 * bubble / 2}))
    read = read_run_log(log)
    assert read.format == "deepspeed" and [(i.first, i.last) for i in read.intervals] == [(1, 5), (6, 10), (11, 15), (16, 20)]
    assert read.timers_s["pipe_recv_input"] == pytest.approx(bubble / 2, abs=1e-5)  # per step, the warm-up sum left out
    result = runner.invoke(app, ["compare", str(out / "plan.json"), str(log), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["measured"]["step_time_s"] == pytest.approx(measured, abs=1e-3) and report["warmup_iterations"] == 5
    pipe = next(row for row in report["rows"] if row["quantity"] == "pipeline send/recv (pipe timers)")
    assert pipe["measured"] == pytest.approx(bubble, abs=1e-5)
    fitted = runner.invoke(app, ["calibrate", str(job), str(out / "plan.json"), str(log), "--out", str(tmp_path / "calib.json")])
    assert fitted.exit_code == 0, fitted.output
    assert calibration.read_calibration(tmp_path / "calib.json").gemm.value < 1.0  # a slower run than loom's pace
    assert "no memory measured" in fitted.output  # a pipeline prints no memory figure
    # Each line's samples/sec x iter time is its global batch: a run of another batch is refused.
    log.write_text(_deepspeed_pipeline_log([3 * measured, measured, measured, measured], 16, 5, {}))
    other = runner.invoke(app, ["compare", str(out / "plan.json"), str(log)])
    assert other.exit_code == 2 and "global batch size 32" in other.output and "got 16" in other.output, other.output
    # A line cut short before the log's end is bad input, not a skipped interval.
    lines = _deepspeed_pipeline_log([measured] * 4, 32, 5, {}).splitlines()
    log.write_text("\n".join([*lines[:2], lines[2][:30], lines[3]]) + "\n")
    cut = runner.invoke(app, ["compare", str(out / "plan.json"), str(log)])
    assert cut.exit_code == 2 and "line 3" in cut.output and "cut short" in cut.output, cut.output


def test_a_deepspeed_log_of_another_engine_is_refused(tmp_path):
    """PipelineEngine prints 'steps:' lines, DeepSpeedEngine throughput lines:
    which one a log has says whether the run had a pipeline."""
    job = small_job(tmp_path, "deepspeed")
    plans = {}
    for pp in (1, 2):
        out = tmp_path / f"pp{pp}"
        made = runner.invoke(app, ["evaluate", str(job), "--tp", "1", "--pp", str(pp), "--mbs", "1", "--zero-stage", "1", "--out", str(out)])
        assert made.exit_code == 0, made.output
        plans[pp] = out / "plan.json"
    log = tmp_path / "train.log"
    log.write_text(_deepspeed_pipeline_log([1.0] * 4, 32, 5, {}))
    result = runner.invoke(app, ["compare", str(plans[1]), str(log)])
    assert result.exit_code == 2 and "a log of 1 pipeline stage(s)" in result.output and "with a pipeline" in result.output, result.output
    log.write_text("".join(f"[Rank 0] epoch=0/micro_step={s}/global_step={s}, RunningAvgSamplesPerSec=30.0, CurrSamplesPerSec=30.0, "
                           "MemAllocated=20.0GB, MaxMemAllocated=30.0GB\n" for s in (5, 10, 15)))
    result = runner.invoke(app, ["compare", str(plans[2]), str(log)])
    assert result.exit_code == 2 and "a log of 2 pipeline stage(s)" in result.output and "without a pipeline" in result.output, result.output


def test_compare_and_calibrate_refuse_a_torchtitan_log_of_another_model(tmp_path):
    """torchtitan prints its model's size: a 70B run's log set against an 8B
    plan is refused by compare as by calibrate."""
    job, out = small_job(tmp_path, "torchtitan"), tmp_path / "plan"
    made = runner.invoke(app, ["plan", str(job), "--top-k", "1", "--out", str(out)])
    assert made.exit_code == 0, made.output
    text = (LOGS / "torchtitan-0.2.log").read_text()
    log = tmp_path / "train.log"
    log.write_text(text)
    assert runner.invoke(app, ["compare", str(out / "plan.json"), str(log)]).exit_code == 0
    log.write_text(text.replace("8,030,261,248", "70,553,706,496"))
    for command in (["compare", str(out / "plan.json"), str(log)],
                    ["calibrate", str(job), str(out / "plan.json"), str(log), "--out", str(tmp_path / "c.json")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "total parameters" in result.output and "70,553,706,496" in result.output, result.output
