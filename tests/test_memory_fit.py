"""Fit or not: the memory model against what Megatron-Core measured and what
public runs reported, the job's memory headroom, and ``loom evaluate`` of a
layout that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import make_cluster
from loom.cli.app import app
from loom.planner.plan import evaluate
from loom.planner.search.layouts import search
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.headroom import GiB, parse_headroom
from loom.planner.specs.job import Job, load_job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model, model_from_hf_config
from loom.profiles.published import NVIDIA_RUNS

# Megatron-LM's functional tests gpt3_7b_tp1_pp4_memory_speed and
# gpt3_7b_tp4_pp1_memory_speed (tests/functional_tests/test_cases/gpt/, at
# NVIDIA/Megatron-LM d98e8a6): a GPT with Megatron's defaults (GeLU,
# LayerNorm, learned positions, dropout 0.1), 32 layers of 4096, 8 query
# groups, untied, vocab 131073, seq 8192, bf16, distributed optimizer, on 8
# GPUs. The golden values are the last rank's peak allocated bytes
# (mem-max-allocated-bytes, torch.cuda.memory_stats), on DGX H100 and A100.
MEGATRON_CI_7B = {"model_type": "gpt2", "n_embd": 4096, "n_layer": 32, "n_head": 32, "num_key_value_heads": 8, "n_inner": 16384,
                  "vocab_size": 131073, "n_positions": 8192, "tie_word_embeddings": False, "resid_pdrop": 0.1}
MEGATRON_CI_CASES = [
    # (tp, pp, vpp, mbs, GPU, last rank's max allocated bytes)
    (1, 4, 8, 1, "H100", 60720852992.0),
    (1, 4, 8, 1, "A100-80GB", 60489064448.0),
    (4, 1, 1, 2, "H100", 57143791616.0),
    (4, 1, 1, 2, "A100-80GB", 58188115968.0),
]
# What the allocator's peak does not see: the CUDA context and NCCL's buffers
# live outside PyTorch's allocator, and fragmentation is reserved, not allocated.
OUTSIDE_ALLOCATED = ("cuda_context", "nccl_buffers", "allocator_fragmentation")


def cluster(gpu: str, nodes: int = 1):
    nvlink = {"H100": 450, "A100-80GB": 300, "A100-40GB": 300}[gpu]
    return parse_cluster({"nodes": nodes, "gpus_per_node": 8, "gpu": gpu, "nvlink_GBps": nvlink, "nics_per_node": 8, "nic_Gbps": 200}, "test")


@pytest.mark.parametrize("tp,pp,vpp,mbs,gpu,measured_bytes", MEGATRON_CI_CASES)
def test_peak_allocated_matches_megatron_cores_own_measurement(tp, pp, vpp, mbs, gpu, measured_bytes):
    """Nothing here was fitted to these runs: within 3% of what Megatron's CI
    measured on the last rank (the last pipeline stage)."""
    job = Job(model=model_from_hf_config(MEGATRON_CI_7B, "gpt3-7b", "test"), cluster=cluster(gpu), global_batch_size=8, seq_length=8192)
    layout = Layout(tp=tp, pp=pp, dp=8 // (tp * pp), cp=1, vpp=vpp, micro_batch_size=mbs, global_batch_size=8, distributed_optimizer=True)
    last = evaluate(job, layout).memory[-1]
    allocated = last.peak_bytes - sum(last.breakdown_bytes[term] for term in OUTSIDE_ALLOCATED)
    assert allocated == pytest.approx(measured_bytes, rel=0.03)


def test_llama2_7b_on_a100_40gb_does_not_fit():
    """Megatron-LM#606: Llama-2 7B, TP1 PP1 on 8 A100-40GB ran out of memory
    at a 64-token sequence: the model state alone is more than 40 GB, with or
    without the distributed optimizer."""
    job = Job(model=load_model("llama-2-7b"), cluster=cluster("A100-40GB"), global_batch_size=8, seq_length=64)
    for distributed in (False, True):
        layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8, distributed_optimizer=distributed)
        assert not evaluate(job, layout).fits


def test_qwen3_30b_a3b_tp2_pp2_ep4_fits():
    """Megatron-Bridge's CPU-offloading study ran Qwen3-30B-A3B on 16 H100,
    TP2 PP2 EP4, at 47.2 GB allocated (its recipe: seq 4096, micro batch 1)."""
    config = json.loads((NVIDIA_RUNS.parent / "models" / "qwen3-30b-a3b" / "config.json").read_text())
    job = Job(model=model_from_hf_config(config, "qwen3-30b-a3b", "test"), cluster=cluster("H100", nodes=2), global_batch_size=8, seq_length=4096)
    layout = Layout(tp=2, pp=2, dp=4, cp=1, ep=4, micro_batch_size=1, global_batch_size=8, sequence_parallel=True, distributed_optimizer=True)
    plan = evaluate(job, layout)
    assert plan.fits and plan.peak_memory.peak_bytes < 60 * GiB


def test_every_nvidia_run_that_loom_can_express_fits():
    """They all ran (shared/validation/nvidia_perf_runs.yaml)."""
    from loom.profiles.published import nvidia_runs

    runs = [run for run in nvidia_runs() if run.job is not None]
    assert len(runs) >= 30
    assert [run.row["id"] for run in runs if not evaluate(run.job, run.layout).fits] == []


@pytest.mark.parametrize("job_yaml", [
    # A new user's job: GPT-NeoX 20B on one node of 8 A100-80GB (its plans used to need 79.8 GiB).
    {"model": "gpt-neox-20b", "cluster": {"nodes": 1, "gpus_per_node": 8, "gpu": "A100-SXM4-80GB", "nvlink_GBps": 300, "nics_per_node": 8,
                                          "nic_Gbps": 200}, "global_batch_size": 32, "seq_length": 2048, "precision": "fp16", "top_k": 3,
     "framework": "deepspeed"},  # its parallel residual is not Megatron's layer (GPT-NeoX trains with DeepSpeed)
    # The bundled 70B example (its best plan used 79.3 of 79.6 GiB).
    None,
])
def test_plans_leave_the_memory_headroom(job_yaml, tmp_path):
    if job_yaml is None:
        path = Path(__file__).resolve().parents[1] / "examples" / "llama3-70b-h100-1024.yaml"
    else:
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(job_yaml))
    job = load_job(path)
    for plan in search(job, 3).plans:
        for memory, capacity in zip(plan.memory, plan.stage_capacity_bytes):
            assert memory.peak_bytes <= 0.95 * capacity


@pytest.mark.parametrize("text,capacity,expected", [(0.1, 80 * GiB, 8 * GiB), ("4 GiB", 80 * GiB, 4 * GiB), ("512 MiB", 80 * GiB, 0.5 * GiB),
                                                    ("8GB", 80 * GiB, 8e9), (0, 80 * GiB, 0)])
def test_headroom_is_a_fraction_or_a_size(text, capacity, expected):
    assert parse_headroom(text).of(capacity) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "four", "4 TB", "4"])
def test_a_headroom_that_is_neither_is_bad_input(bad, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": "llama-3-8b", "cluster": "h100-64.yaml", "global_batch_size": 512, "seq_length": 8192,
                                    "memory_headroom": bad}))
    with pytest.raises(SpecError) as error:
        load_job(path)
    assert error.value.field == "memory_headroom"


def test_a_headroom_gate_constrains_the_search_instead_of_failing_it(tmp_path):
    """--gate memory_headroom>=0.3 keeps the plans that leave 30% free; the
    best plan without it leaves less (so the gate would have failed)."""
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({"model": "gpt-neox-20b", "global_batch_size": 32, "seq_length": 2048, "precision": "fp16", "top_k": 3,
                                        "framework": "deepspeed",
                                        "cluster": {"nodes": 1, "gpus_per_node": 8, "gpu": "A100-SXM4-80GB", "nvlink_GBps": 300,
                                                    "nics_per_node": 8, "nic_Gbps": 200}}))
    runner = CliRunner()
    free = json.loads(runner.invoke(app, ["plan", str(job_file), "--json"]).stdout)["plans"][0]["memory"]["headroom"]
    assert free < 0.3
    result = runner.invoke(app, ["plan", str(job_file), "--json", "--gate", "memory_headroom>=0.3"])
    assert result.exit_code == 0, result.output
    assert all(plan["memory"]["headroom"] >= 0.3 for plan in json.loads(result.stdout)["plans"])


def test_evaluate_of_a_layout_that_does_not_fit_exits_3_and_writes_nothing(tmp_path):
    runner = CliRunner()
    args = ["evaluate", "--tp", "2", "--pp", "1", "--no-distributed-optimizer"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 3
    assert not (tmp_path / "out").exists()
    message = " ".join(result.stderr.split())
    assert "does not fit: stage 0 needs" in message and "GiB short" in message
    assert "the cheapest single change that fits: --distributed-optimizer" in message
    report = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert report["plans"][0]["memory"]["fits"] is False


def test_evaluate_warns_when_a_layout_fits_within_the_headroom_only():
    result = CliRunner().invoke(app, ["evaluate", "--tp", "4", "--pp", "2", "--memory-headroom", "0.9"])
    assert result.exit_code == 0
    assert "less than the 90% memory headroom" in " ".join(result.stderr.split())


def test_the_search_reports_the_headroom_it_could_not_leave():
    job = Job(model=load_model("llama-3-70b"), cluster=make_cluster(1), global_batch_size=64, seq_length=8192)
    from loom.planner.specs.errors import InfeasibleError

    with pytest.raises(InfeasibleError, match=r"after the 5% memory headroom"):
        search(job, 1)


def test_a_peak_memory_gate_constrains_the_search_like_the_headroom_gate(tmp_path):
    """--gate 'peak_memory_GiB<=X' keeps the plans that use at most X GiB
    (it failed on plan 1 while such plans existed); one no plan meets exits 3."""
    runner = CliRunner()
    best = json.loads(runner.invoke(app, ["plan", "--json"]).stdout)["plans"][0]["memory"]["peak_bytes_per_gpu"] / GiB
    cap = round(best - 15)
    result = runner.invoke(app, ["plan", "--json", "--gate", f"peak_memory_GiB<={cap}"])
    assert result.exit_code == 0, result.output
    assert all(plan["memory"]["peak_bytes_per_gpu"] <= cap * GiB for plan in json.loads(result.stdout)["plans"])
    impossible = runner.invoke(app, ["plan", "--json", "--gate", "peak_memory_GiB<=1"])
    assert impossible.exit_code == 3, impossible.output
