"""The layer and GEMM profilers (``loom profile layers | gemm``) and what
``--profile`` does to a plan, on CPU with small models.

The central check: for every layer kind and recompute mode, the bytes a real
PyTorch layer keeps for backward equal the memory estimator's count plus the
bookkeeping tensors the estimator leaves out, each listed in ``bookkeeping``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.cost import host
from loom.planner.cost.shape import Shape
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Features
from loom.planner.specs.model import model_from_hf_config
from loom.profiles import layer_profile
from loom.profiles.catalogue import find_gpu
from loom.profiles.gemm import fit_curve, fitted_time_s
from loom.profiles.layer_profile import GemmPoint, Spread
from loom.profiles import gemm, layers
from loom.profiles.layers import Grid, estimated_saved_bytes, rank_shapes, saved_bytes
from loom.profiles.torch_blocks import RankShape, build

runner = CliRunner()
LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 2,
         "num_hidden_layers": 4, "vocab_size": 1024, "max_position_embeddings": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
GPT = {"model_type": "gpt2", "n_embd": 256, "n_head": 8, "n_layer": 2, "vocab_size": 1024, "n_positions": 1024, "n_inner": 1024}
QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
             "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 1024,
             "max_position_embeddings": 4096, "num_experts": 16, "num_experts_per_tok": 4, "decoder_sparse_step": 1, "mlp_only_layers": [],
             "rms_norm_eps": 1e-6}
MODELS = {name: model_from_hf_config(config, name, "test") for name, config in
          [("tiny-llama", LLAMA), ("tiny-gpt", GPT), ("tiny-qwen3-moe", QWEN3_MOE)]}


def bookkeeping(kind: str, shape: RankShape, recompute: str) -> int:
    """What a PyTorch layer keeps that the estimator does not count (it is
    not proportional to the hidden size):

    - embedding: the token ids (int64) and the mask of ids outside this
      rank's vocabulary slice (bool): 9 bytes per token;
    - head: the loss's int64 targets: 8 bytes per token;
    - MoE layer: per routed copy of a token, the router's top-k expert id, the
      sort order and the source token (int64 each) and its fp32 routing
      probability (28 bytes); the aux loss's expert-load constants (fp32 per
      expert) and the loss itself (4 bytes). None under full recompute.
    - dense layer: nothing (its fused norms keep no fp32 statistics here;
      Transformer Engine's keep 4 bytes per token more).
    """
    if kind == "embedding":
        return 9 * shape.tokens
    if kind == "head":
        return 8 * shape.tokens
    if kind == "moe" and recompute != "full":
        moe = shape.model.moe
        return 28 * shape.local_tokens * moe.top_k + 4 * moe.num_experts + 4
    return 0


CASES = [
    (name, kind, tp, recompute)
    for name, model in MODELS.items()
    for kind, shape in rank_shapes(model, Grid(tp=(1, 2), micro_batch_size=(2,), seq_length=(128,)))
    for tp in [shape.tp]
    for recompute in (("none", "selective", "full") if kind in ("dense", "moe") else ("none",))
]


@pytest.mark.parametrize("name, kind, tp, recompute", CASES)
def test_saved_bytes_equal_the_memory_estimate(name, kind, tp, recompute):
    """Measured with saved_tensors_hooks, once per storage."""
    model = MODELS[name]
    shape = RankShape(model, tp, 2, 128, sequence_parallel=tp > 1, ep=2 if kind == "moe" else 1)
    measured = saved_bytes(build(kind, shape, torch.bfloat16, torch.device("cpu"), recompute))
    assert measured == estimated_saved_bytes(kind, shape, recompute) + bookkeeping(kind, shape, recompute)


def test_every_model_family_and_kind_is_covered():
    kinds = {(name, kind) for name, kind, _, _ in CASES}
    assert {("tiny-llama", "dense"), ("tiny-gpt", "dense"), ("tiny-qwen3-moe", "moe")} <= kinds
    assert {kind for _, kind in kinds} == {"dense", "moe", "embedding", "head"}


def test_rotary_models_keep_q_and_k_twice():
    """The fused QKV output stays alive through V's view while RoPE writes
    new Q and K: what the estimator learned from this profiler."""
    llama = MODELS["tiny-llama"]
    shape = RankShape(llama, 1, 2, 128, sequence_parallel=False)
    measured = saved_bytes(build("dense", shape, torch.bfloat16, torch.device("cpu")))
    tokens, q, kv = shape.tokens, llama.q_size, llama.kv_size
    korthikanti = 2 * tokens * (4 * llama.hidden_size + q + 2 * kv + q + 3 * llama.ffn_hidden_size) + 4 * 2 * 8 * 128
    assert measured - korthikanti == 2 * tokens * (q + kv)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny Llama config, a job on the bundled 64 x H100 cluster, and a
    layers profile of it at tp 1 and 2, sequence 256 (run through the CLI)."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny.json").write_text(json.dumps(LLAMA))
    (folder / "job.yaml").write_text("model: tiny.json\ncluster: h100-64.yaml\nglobal_batch_size: 128\nseq_length: 256\n")
    profile = folder / "layers.json"
    result = runner.invoke(app, ["profile", "layers", str(folder / "tiny.json"), "--gpu", "h100", "--tp", "1,2", "--micro-batch-size", "2",
                                 "--seq-length", "256", "--repeats", "2", "--warmup", "1", "--out", str(profile)])
    assert result.exit_code == 0, result.output
    return folder


def test_profile_json_matches_its_schema(tiny_files):
    document = json.loads((tiny_files / "layers.json").read_text())
    schema = json.loads(layer_profile.SCHEMA_FILES["layers"].read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(document, schema)
    assert document["device"] == "cpu" and document["gpu"] == "H100-SXM5-80GB" and document["torch_version"] == torch.__version__
    entries = {(e["kind"], e["tp"]): e for e in document["entries"]}
    assert set(entries) == {(kind, tp) for kind in ("dense", "embedding", "head") for tp in (1, 2)}
    dense = entries["dense", 2]
    assert dense["dims"]["heads"] == 4 and dense["dims"]["local_tokens"] == dense["dims"]["tokens"] // 2 == 256
    assert dense["forward"]["min_s"] <= dense["forward"]["median_s"] <= dense["forward"]["max_s"]
    assert dense["saved_bytes"]["full"] < dense["saved_bytes"]["selective"] < dense["saved_bytes"]["none"]


def test_shipped_schemas_match_the_models():
    for kind, path in layer_profile.SCHEMA_FILES.items():
        assert path.read_text() == layer_profile.schema_json(kind)


def _evaluate(folder, *extra: str) -> dict:
    result = runner.invoke(app, ["evaluate", str(folder / "job.yaml"), "--mbs", "2", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_profile_replaces_the_layer_times_and_bytes_with_the_measured_ones(tiny_files):
    profile = json.loads((tiny_files / "layers.json").read_text())
    entries = {(e["kind"], e["tp"]): e for e in profile["entries"]}
    estimated = _evaluate(tiny_files)["plans"][0]
    measured = _evaluate(tiny_files, "--profile", str(tiny_files / "layers.json"))
    plan = measured["plans"][0]
    assert measured["profiles"] == [str(tiny_files / "layers.json")]
    assert set(plan["sources"].values()) == {"measured", "estimated"} and plan["sources"]["dense_time"] == "measured"
    assert set(estimated["sources"].values()) == {"estimated"}
    # One stage with every layer (tp 1, no communication inside the chunk):
    chunk = plan["schedule"]["stages"][0][0]
    layers = LLAMA["num_hidden_layers"]
    tiny_shape = Shape(model_from_hf_config(LLAMA, "tiny", "tiny.json"), tp=1, cp=1, micro_batch_size=2, sequence_parallel=False, seq_length=256,
                       precision="bf16", features=Features())
    for pass_, field in (("forward", "forward_s"), ("backward", "backward_s")):
        expected = layers * entries["dense", 1][pass_]["median_s"] + entries["embedding", 1][pass_]["median_s"] + entries["head", 1][pass_]["median_s"]
        assert chunk[field] == pytest.approx(expected, rel=1e-9)
        assert chunk[field] != pytest.approx(estimated["schedule"]["stages"][0][0][field], rel=0.01)
        # The profile's own estimates are the plan's without it.
        estimate = sum(count * entries[kind, 1][f"estimated_{field}"] for kind, count in (("dense", layers), ("embedding", 1), ("head", 1)))
        # ... plus the host time the estimated layers leave exposed (cost/host.py), none once measured.
        gpu_layers_s = layers * entries["dense", 1][f"estimated_{field}"]
        host_s = layers * host.layer_host_s(tiny_shape, find_gpu("H100"), "dense", backward=pass_ == "backward")
        assert estimated["schedule"]["stages"][0][0][field] == pytest.approx(estimate + max(0.0, host_s - gpu_layers_s), rel=1e-9)
    saved = layers * entries["dense", 1]["saved_bytes"]["none"] + entries["embedding", 1]["saved_bytes"]["none"] + entries["head", 1]["saved_bytes"]["none"]
    assert chunk["activation_bytes"] == pytest.approx(saved, rel=1e-9)


def test_unmeasured_shapes_are_interpolated_from_the_measured_ratio(tiny_files, tmp_path):
    """Between profiled token counts the planner scales its estimate by
    measured / estimated, interpolated linearly in log(tokens)."""
    from loom.planner.cost.layers import decoder_layer, shape_of
    from loom.planner.specs.job import load_job
    from loom.planner.specs.layout import Layout

    document = json.loads((tiny_files / "layers.json").read_text())
    measured_256 = next(e for e in document["entries"] if (e["kind"], e["tp"]) == ("dense", 2))
    longer = json.loads(json.dumps(measured_256))  # a made-up measurement at sequence 1024, 3x slower
    longer["seq_length"], longer["dims"]["tokens"], longer["dims"]["local_tokens"] = 1024, 2048, 1024
    longer["forward"] = {key: 3 * value for key, value in measured_256["forward"].items()}
    document["entries"].append(longer)
    profile = tmp_path / "layers.json"
    profile.write_text(json.dumps(document))

    layout = Layout(tp=2, pp=1, dp=32, cp=1, micro_batch_size=2, global_batch_size=128, sequence_parallel=True)
    plain = {seq: load_job(tiny_files / "job.yaml", {"seq_length": seq}) for seq in (256, 512, 1024)}
    gpu = plain[256].cluster.slowest.gpu

    def estimate(seq):
        return decoder_layer(shape_of(plain[seq], layout), gpu).total_s

    ratios = [measured_256["forward"]["median_s"] / estimate(256), longer["forward"]["median_s"] / estimate(1024)]
    profiled = load_job(tiny_files / "job.yaml", {"seq_length": 512, "profiles": [str(profile)]})
    # 1024 tokens lie halfway between 512 and 2048 in log(tokens)
    assert decoder_layer(shape_of(profiled, layout), gpu).total_s == pytest.approx(estimate(512) * sum(ratios) / 2, rel=1e-9)
    sources = _evaluate(tiny_files, "--tp", "2", "--seq-length", "512", "--profile", str(profile))["plans"][0]["sources"]
    assert sources["dense_time"] == "interpolated" and sources["head_time"] == "interpolated"


def test_profile_of_another_model_or_gpu_is_refused(tiny_files, tmp_path):
    document = json.loads((tiny_files / "layers.json").read_text())
    document["model"]["hidden_size"] = 512  # a consistent profile of another model
    for entry in document["entries"]:
        entry["dims"]["hidden_size"] = 512
    other_model = tmp_path / "other.json"
    other_model.write_text(json.dumps(document))
    result = runner.invoke(app, ["evaluate", str(tiny_files / "job.yaml"), "--profile", str(other_model)])
    assert result.exit_code == 2 and "model.hidden_size" in result.output and str(other_model) in result.output.replace("\n", "")
    document = json.loads((tiny_files / "layers.json").read_text())
    document["gpu"] = "A100"
    other_gpu = tmp_path / "a100.json"
    other_gpu.write_text(json.dumps(document))
    result = runner.invoke(app, ["evaluate", str(tiny_files / "job.yaml"), "--profile", str(other_gpu)])
    assert result.exit_code == 2 and "gpu" in result.output and "H100-SXM5-80GB" in result.output


def _set(document: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        document = document[int(part)] if isinstance(document, list) else document[part]
    document[int(last) if isinstance(document, list) else last] = value


@pytest.mark.parametrize("path, value, field", [
    ("entries.0.forward.median_s", math.nan, "entries.0.forward.median_s"),
    ("entries.0.backward.max_s", math.inf, "entries.0.backward.max_s"),
    ("entries.0.forward.min_s", 10.0, "entries.0.forward"),  # min above the median
    ("entries.0.saved_bytes.selective", -1, "entries.0.saved_bytes.selective"),
    ("entries.0.estimated_saved_bytes.full", math.inf, "entries.0.estimated_saved_bytes.full"),
    ("entries.0.estimated_forward_s", 0.0, "entries.0.estimated_forward_s"),
    ("model.dropout", 1.5, "model.dropout"),
    ("schema_version", 2, "schema_version"),
    ("gpu", "H1000", "gpu"),
])
def test_layers_profile_with_impossible_numbers_is_refused(tiny_files, tmp_path, path, value, field):
    document = json.loads((tiny_files / "layers.json").read_text())
    _set(document, path, value)
    bad = tmp_path / "layers.json"
    bad.write_text(json.dumps(document))
    with pytest.raises(SpecError) as error:
        layer_profile.read_profile(bad)
    assert (error.value.source, error.value.field) == (str(bad), field)


@pytest.mark.parametrize("edit, field", [
    (lambda d: _set(d, "fit.gemm_efficiency", 50.0), "fit.gemm_efficiency"),  # gave MFU 170%
    (lambda d: _set(d, "fit.gemm_efficiency", 0.0), "fit.gemm_efficiency"),
    (lambda d: _set(d, "fit.k_overhead", math.inf), "fit.k_overhead"),
    (lambda d: _set(d, "fit.peak_tflops", 500.0), "fit.peak_tflops"),  # not the H100's
    (lambda d: _set(d, "points.0.tflops", 2 * d["points"][0]["tflops"]), "points.0"),  # not what its time says
    (lambda d: _set(d, "points.1.time.max_s", -1.0), "points.1.time.max_s"),
    # 2,000 TFLOP/s: consistent with itself, but no H100
    (lambda d: _set(d, "points.2", {**d["points"][2], "time": dict.fromkeys(("median_s", "min_s", "max_s"), 2 * math.prod(
        d["points"][2][x] for x in "mnk") / 2000e12), "tflops": 2000.0}), "points.2.time.median_s"),
    (lambda d: _set(d, "dtype", "fp8"), "dtype"),
])
def test_gemm_profile_with_impossible_numbers_is_refused(gemm_file, tmp_path, edit, field):
    document = json.loads(gemm_file.read_text())
    edit(document)
    bad = tmp_path / "gemm.json"
    bad.write_text(json.dumps(document))
    with pytest.raises(SpecError) as error:
        layer_profile.read_profile(bad)
    assert (error.value.source, error.value.field) == (str(bad), field)


def test_planning_with_an_impossible_gemm_profile_exits_2(tiny_files, gemm_file, tmp_path):
    document = json.loads(gemm_file.read_text())
    document["fit"]["gemm_efficiency"] = 50.0
    bad = tmp_path / "gemm.json"
    bad.write_text(json.dumps(document))
    result = runner.invoke(app, ["evaluate", str(tiny_files / "job.yaml"), "--mbs", "2", "--profile", str(bad)])
    shown = " ".join(result.output.split()).replace(" ", "")
    assert result.exit_code == 2 and str(bad).replace(" ", "") in shown and "fit.gemm_efficiency" in shown and "lessthanorequalto1" in shown


@pytest.mark.parametrize("args, field", [
    (["--tp", "3"], "tp"),  # does not divide the heads
    (["--tp", "one"], "tp"),
    (["--kinds", "dense,mlp"], "kinds"),
    (["--dtype", "fp8"], "dtype"),
    (["--tp", "2", "--seq-length", "255"], "seq_length"),  # sequence parallelism splits it
])
def test_profile_layers_bad_input_exits_2(tiny_files, tmp_path, args, field):
    out = tmp_path / "layers.json"
    result = runner.invoke(app, ["profile", "layers", str(tiny_files / "tiny.json"), "--gpu", "h100", "--out", str(out), *args])
    assert result.exit_code == 2 and (field in result.output or f"--{field.replace('_', '-')}:" in result.output)
    assert not out.exists()


def test_profile_layers_refuses_what_it_cannot_build(tmp_path):
    result = runner.invoke(app, ["profile", "layers", "deepseek-v3", "--gpu", "h100", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "latent attention" in " ".join(result.output.split())
    moe = tmp_path / "moe.json"
    moe.write_text(json.dumps(QWEN3_MOE))
    result = runner.invoke(app, ["profile", "layers", str(moe), "--gpu", "h100", "--tp", "2", "--no-sequence-parallel", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "sequence_parallel" in " ".join(result.output.split())


def test_profile_layers_refuses_expert_parallelism_it_cannot_apply(tiny_files, tmp_path):
    """EP on a dense model, EP that does not divide the experts, EP with no
    MoE layer among --kinds; and a kind the model does not have."""
    moe = tmp_path / "moe.json"
    moe.write_text(json.dumps(QWEN3_MOE))
    dense = str(tiny_files / "tiny.json")
    cases = [
        ([dense, "--ep", "3"], "--ep: expected 1: tiny is dense"),
        ([dense, "--ep", "1,2"], "--ep: expected 1: tiny is dense"),
        ([str(moe), "--ep", "3"], "--ep: expected a divisor of moe's 16 experts (got 3)"),
        ([str(moe), "--ep", "2", "--kinds", "embedding,head"], "--ep: expected 1 unless --kinds includes moe"),
        ([dense, "--kinds", "moe"], "--kinds: expected a layer kind tiny has (dense, embedding, head) (got 'moe')"),
        ([str(moe), "--kinds", "dense"], "--kinds: expected a layer kind moe has (moe, embedding, head) (got 'dense')"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["profile", "layers", *args, "--gpu", "h100", "--seq-length", "64", "--repeats", "1", "--warmup", "0",
                                     "--out", str(tmp_path / "x.json")])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)
    assert not (tmp_path / "x.json").exists()


def test_profile_gemm_refuses_a_tp_that_does_not_divide_the_model(tiny_files, tmp_path):
    result = runner.invoke(app, ["profile", "gemm", str(tiny_files / "tiny.json"), "--gpu", "h100", "--tp", "1,3", "--tokens", "64",
                                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "g.json")])
    assert result.exit_code == 2 and "--tp: expected a divisor of tiny's num_attention_heads = 8 (got 3)" in " ".join(result.output.split())
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("command, args, flag", [
    ("layers", ["--seq-length", str(10**12)], "--seq-length"),  # one sequence is already too long
    ("layers", ["--seq-length", "64", "--micro-batch-size", str(10**11)], "--micro-batch-size"),
    ("layers", ["--kinds", "embedding", "--seq-length", str(10**13)], "--seq-length"),  # an embedding keeps nothing, but holds its output
    ("gemm", ["--tokens", str(10**12)], "--tokens"),
])
def test_profiles_too_large_for_memory_exit_2_before_allocating(tiny_files, tmp_path, command, args, flag):
    """Far beyond any machine's memory: refused with the flag, the largest
    value that fits and the value given, not an allocator failure."""
    result = runner.invoke(app, ["profile", command, str(tiny_files / "tiny.json"), "--gpu", "h100", *args, "--repeats", "1", "--warmup", "0",
                                 "--out", str(tmp_path / "x.json")])
    shown = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{flag}: expected at most " in shown and "GiB of cpu memory" in shown, shown
    assert f"(got {args[args.index(flag) + 1]})" in shown
    assert not (tmp_path / "x.json").exists()


def _limit(error: SpecError) -> int:
    return int(re.match(r"at most ([\d,]+):", error.expected).group(1).replace(",", ""))


def test_the_memory_bound_is_the_largest_value_that_fits(monkeypatch):
    """With 64 MiB of memory: the limit each message states fits, one more does not."""
    monkeypatch.setattr(layers, "memory_bytes", lambda device: 64 * 2**20)
    cpu, model = torch.device("cpu"), MODELS["tiny-llama"]
    shape = RankShape(model, 2, 1, 10**6, sequence_parallel=True)
    with pytest.raises(SpecError) as error:
        layers.check_memory([("dense", shape)], cpu)
    seq = _limit(error.value)
    assert error.value.source == "--seq-length" and error.value.got == 10**6
    assert layers.least_bytes("dense", RankShape(model, 2, 1, seq, True)) <= 64 * 2**20 < layers.least_bytes("dense", RankShape(model, 2, 1, seq + 1, True))
    layers.check_memory([("dense", RankShape(model, 2, 1, seq - seq % 2, True))], cpu)  # the limit itself passes

    with pytest.raises(SpecError) as error:
        layers.check_memory([("head", RankShape(model, 1, 10**4, 256, False))], cpu)
    mbs = _limit(error.value)
    assert error.value.source == "--micro-batch-size" and 1 <= mbs < 10**4
    layers.check_memory([("head", RankShape(model, 1, mbs, 256, False))], cpu)

    with pytest.raises(SpecError) as error:
        gemm.check_memory(model, (1,), (10**7,), "bf16", cpu)
    tokens = _limit(error.value)
    largest = max(gemm.operand_bytes(*mnk, "bf16") for mnk in gemm.model_gemms(model, (1,), (tokens,)))
    assert error.value.source == "--tokens" and largest <= 64 * 2**20
    with pytest.raises(SpecError):
        gemm.check_memory(model, (1,), (tokens + 1,), "bf16", cpu)


@pytest.mark.parametrize("failure", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                 "2147483648 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_running_out_of_device_memory_is_bad_input(tiny_files, tmp_path, monkeypatch, failure):
    """Under the bound but still out of memory (the bound is a lower one, or
    another process holds memory): exit 2 naming the flag, not a crash."""
    def out_of_memory(*args, **kwargs):
        raise failure

    monkeypatch.setattr(layers, "build", out_of_memory)
    result = runner.invoke(app, ["profile", "layers", str(tiny_files / "tiny.json"), "--gpu", "h100", "--seq-length", "64", "--micro-batch-size", "4",
                                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "x.json")])
    shown = " ".join(result.output.split())
    assert result.exit_code == 2 and "--micro-batch-size: expected a smaller value: the dense layer at tp 1, micro batch 4" in shown, shown


def test_profile_on_cpu_needs_the_gpu_it_stands_for(tiny_files, tmp_path):
    result = runner.invoke(app, ["profile", "layers", str(tiny_files / "tiny.json"), "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "--gpu" in result.output


GEMM_SHAPES = [(m, n, k) for m in (512, 4096) for n in (1024, 3072, 8192) for k in (256, 1024, 8192)]


def gemm_point(m: int, n: int, k: int, seconds: float) -> GemmPoint:
    return GemmPoint(m=m, n=n, k=k, time=Spread(median_s=seconds, min_s=seconds, max_s=seconds), tflops=layer_profile.gemm_tflops(m, n, k, seconds))


def curve_points(truth: layer_profile.GemmFit) -> list[GemmPoint]:
    """GEMM_SHAPES timed exactly as the curve ``truth`` says, on an H100."""
    h100 = find_gpu("h100")
    return [gemm_point(m, n, k, fitted_time_s(gemm_point(m, n, k, 1.0), truth, h100)) for m, n, k in GEMM_SHAPES]


def test_gemm_fit_recovers_the_curve_it_was_generated_from():
    truth = layer_profile.GemmFit(peak_tflops=989.0, gemm_efficiency=0.7, k_overhead=256, rms_log_error=0.0)
    fit = fit_curve(curve_points(truth), find_gpu("h100"), "bf16")
    assert fit.gemm_efficiency == pytest.approx(0.7, rel=1e-6) and fit.k_overhead == 256 and fit.rms_log_error < 1e-9


def test_gemm_fit_caps_the_efficiency_at_one():
    """Times 5% faster than gemm_efficiency 1 allows (under the 10% peak
    tolerance): the best fit within (0, 1] is 1, not 1.05."""
    truth = layer_profile.GemmFit.model_construct(peak_tflops=989.0, gemm_efficiency=1.05, k_overhead=256, rms_log_error=0.0)
    fit = fit_curve(curve_points(truth), find_gpu("h100"), "bf16")
    assert fit.gemm_efficiency == 1.0 and fit.rms_log_error > 0


def test_gemm_fit_refuses_gemms_faster_than_the_named_gpu():
    """2,000 TFLOP/s in bf16 is no H100 (989): the --gpu is wrong."""
    seconds = 2 * 8192**3 / 2000e12
    points = [gemm_point(8192, 8192, 8192, seconds), gemm_point(4096, 8192, 8192, seconds)]
    with pytest.raises(SpecError) as error:
        fit_curve(points, find_gpu("h100"), "bf16")
    assert (error.value.source, error.value.field) == ("--gpu", "gpu") and "2000 TFLOP/s" in error.value.expected


@pytest.fixture(scope="module")
def gemm_file(tiny_files) -> Path:
    """A gemm profile of the tiny Llama, labelled H100 (run through the CLI)."""
    out = tiny_files / "gemm.json"
    result = runner.invoke(app, ["profile", "gemm", str(tiny_files / "tiny.json"), "--gpu", "h100", "--tokens", "256", "--repeats", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_gemm_profile_recalibrates_the_gpu(tiny_files, gemm_file):
    out = gemm_file
    document = json.loads(out.read_text())
    jsonschema.validate(document, json.loads(layer_profile.SCHEMA_FILES["gemm"].read_text()))
    assert all(math.isclose(p["tflops"], 2 * p["m"] * p["n"] * p["k"] / p["time"]["median_s"] / 1e12) for p in document["points"])
    plain = _evaluate(tiny_files)["plans"][0]
    calibrated = _evaluate(tiny_files, "--profile", str(out))["plans"][0]
    assert calibrated["sources"]["gemm_efficiency"] == "measured"
    # A CPU is far slower than the H100 these numbers are labelled as: the GEMMs slow down.
    assert calibrated["predicted"]["step_time_s"] > 2 * plain["predicted"]["step_time_s"]


def test_planner_modules_import_without_torch():
    code = "import sys; sys.modules['torch'] = None; import loom.planner.cost.measured, loom.profiles.layer_profile, loom.cli.app"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("device_name, catalogue", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM5-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"),
    ("AMD Instinct MI300X", "MI300X"),
])
def test_the_gpu_is_recognised_from_its_cuda_name(monkeypatch, device_name, catalogue):
    from loom.cli.profile_layers import _detected_gpu

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert _detected_gpu(torch.device("cuda")).name == find_gpu(catalogue).name


def test_layers_keep_what_megatron_cores_own_layers_keep():
    """megatron-core's SelfAttention (fused QKV, torch.split, RoPE, output
    projection; SDPA as the core) and MLP (fused bias-SwiGLU) against the
    profiler's: the same bytes, but for the cos and sin tables megatron's
    unfused RoPE computes per call for Q and for K (Transformer Engine's
    fused RoPE keeps none)."""
    seq = 128
    probe = Path(__file__).with_name("megatron_layer_probe.py")
    result = subprocess.run([sys.executable, str(probe), json.dumps(LLAMA), str(seq)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(result.stdout.strip().splitlines()[-1])
    head_dim = MODELS["tiny-llama"].head_dim
    assert saved["megatron"]["attention"] - saved["loom"]["attention"] == 4 * seq * head_dim * 2
    assert saved["megatron"]["mlp"] == saved["loom"]["mlp"] == 2 * seq * (LLAMA["hidden_size"] + 3 * LLAMA["intermediate_size"])


def test_explain_says_which_figures_were_measured(tiny_files, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["evaluate", str(tiny_files / "job.yaml"), "--mbs", "2", "--profile", str(tiny_files / "layers.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    shown = " ".join(runner.invoke(app, ["explain", str(out / "plan.json")]).output.split())
    assert "from measurements: dense time, dense activations" in shown


@pytest.mark.parametrize("name, kind", sorted({(name, kind) for name, kind, _, _ in CASES}))
def test_layers_keep_every_tensor_on_their_device(name, kind):
    """There is no GPU here: the meta device stands in for one, and any
    tensor left on the CPU (a table, a constant, an index) fails the pass."""
    shape = RankShape(MODELS[name], 2, 2, 128, sequence_parallel=True, ep=2 if kind == "moe" else 1)
    for recompute in ("none", "selective", "full"):
        layer = build(kind, shape, torch.bfloat16, torch.device("meta"), recompute)
        out = layer.forward(*layer.input())
        out.backward(torch.ones_like(out))
        assert out.device.type == "meta"


def test_custom_autograd_functions_give_pytorchs_gradients():
    """The stand-ins whose maths is exact: the loss, the sequence-parallel
    GEMM (gather = repeat, its backward = the sum of the shares) and recompute."""
    from loom.profiles.torch_blocks import GatheredLinear, VocabParallelCrossEntropy, recomputed

    torch.manual_seed(0)
    logits, targets, weight = torch.randn(6, 9, requires_grad=True), torch.randint(0, 9, (6,)), torch.randn(5, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    cases = [
        (lambda: VocabParallelCrossEntropy.apply(logits, targets), lambda: torch.nn.functional.cross_entropy(logits, targets, reduction="none")),
        (lambda: GatheredLinear.apply(x, weight, 2), lambda: torch.nn.functional.linear(x.repeat(2, 1), weight)),
        (lambda: recomputed(lambda t, w: t.sin() @ w.t(), x, weight), lambda: x.sin() @ weight.t()),
    ]
    for ours, reference in cases:
        grads = []
        for run in (ours, reference):
            out = run()
            leaves = [logits, x, weight]
            grads.append([out.detach(), *torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)])
        for a, b in zip(*grads):
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_a_profile_whose_entries_time_another_model_is_refused(tiny_files, tmp_path):
    document = json.loads((tiny_files / "layers.json").read_text())
    document["entries"][0]["dims"]["hidden_size"] *= 2  # the entry claims the model's name but another width
    (tmp_path / "other.json").write_text(json.dumps(document))
    with pytest.raises(SpecError, match=r"field 'entries\.0\.dims\.hidden_size'") as raised:
        layer_profile.read_profile(tmp_path / "other.json")
    assert len(str(raised.value)) < 300  # names the field, not the whole document
    document["entries"][0]["dims"]["hidden_size"] //= 2
    document["entries"].append(document["entries"][0])  # one shape measured twice
    (tmp_path / "twice.json").write_text(json.dumps(document))
    with pytest.raises(SpecError, match=r"each shape measured once"):
        layer_profile.read_profile(tmp_path / "twice.json")


def test_a_profile_faster_than_the_gpu_is_bad_input(tiny_files, tmp_path):
    """Schema-valid but impossible: layer times a millionth of the measured
    ones put the model's FLOPs far above the GPU's peak. Bad input naming
    the profile, not an MFU of thousands of percent (or a crash)."""
    profile = json.loads((tiny_files / "layers.json").read_text())
    for entry in profile["entries"]:
        for pass_ in ("forward", "backward"):
            entry[pass_] = {stat: value * 1e-6 for stat, value in entry[pass_].items()}
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps(profile))
    for command in ("plan", "evaluate"):
        result = runner.invoke(app, [command, str(tiny_files / "job.yaml"), "--profile", str(fast)])
        assert result.exit_code == 2 and "fast.json" in result.output and "peak" in result.output, result.output


def test_a_profile_measured_on_a_cpu_says_so(tiny_files):
    """The tiny profile ran on this machine's CPU (device: cpu) for an H100
    cluster: the plan uses it, and warns that its times are not a GPU's."""
    result = runner.invoke(app, ["evaluate", str(tiny_files / "job.yaml"), "--mbs", "2", "--profile", str(tiny_files / "layers.json")])
    assert result.exit_code == 0 and "measured on a CPU" in result.output, result.output
    plain = runner.invoke(app, ["evaluate", str(tiny_files / "job.yaml"), "--mbs", "2"])
    assert "measured on a CPU" not in plain.output
