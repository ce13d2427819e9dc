"""The optimizer on the host (planner/cost/offload.py): what it frees on the
GPU, what its step costs, the flags each framework gets, and a public report."""

from __future__ import annotations

import json

import pytest
from torchtitan.config import ConfigManager
from typer.testing import CliRunner

from conftest import make_job
from loom.cli.app import app
from loom.planner.cost import offload
from loom.planner.output.launch import launch_files
from loom.planner.output.megatron import megatron_args
from loom.planner.plan import evaluate
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Features, Job, stack_features
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.specs.stages import default_placement, uniform_stages
from loom.profiles.catalogue import find_gpu

GiB = 2**30


def _layout(**kwargs) -> Layout:
    return Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, recompute="full", **kwargs)


def test_offload_moves_the_optimizer_state_off_the_gpu():
    job = make_job("llama-3-8b", nodes=1, gbs=64, seq=4096)
    kept = evaluate(job, _layout(distributed_optimizer=True)).memory[0].breakdown_bytes
    moved = evaluate(job, _layout(distributed_optimizer=True, optimizer_offload=True)).memory[0].breakdown_bytes
    assert kept["optimizer_states"] > 5 * GiB and moved["optimizer_states"] == 0.0
    assert moved["weights"] == kept["weights"] and moved["gradients"] == kept["gradients"]
    titan = Job(model=load_model("llama-3-8b"), cluster=job.cluster, global_batch_size=64, seq_length=4096, framework="torchtitan",
                stack="torchtitan", features=stack_features("torchtitan", Features()))
    hosted = evaluate(titan, _layout(fsdp=8, optimizer_offload=True)).memory[0].breakdown_bytes
    assert hosted["weights"] == hosted["gradients"] == hosted["optimizer_states"] == 0.0  # CPUOffloadPolicy: all sharded state


def test_the_host_step_is_the_longer_of_the_copies_and_the_host_adam():
    h100 = find_gpu("H100")
    params = 1e9
    adam = params * offload.CPU_ADAM_BYTES_PER_PARAM / (h100.host_memory_GBps * 1e9)
    copies = params * offload.STEP_COPY_BYTES_PER_PARAM / (h100.pcie_GBps * offload.PCIE_PAYLOAD_EFFICIENCY * 1e9)
    assert offload.step_s(params, h100, "megatron") == pytest.approx(max(adam, copies))
    assert offload.step_s(params, h100, "torchtitan") == pytest.approx(adam)
    job = make_job("llama-3-8b", nodes=1, gbs=64, seq=4096)
    gpu_step = evaluate(job, _layout(distributed_optimizer=True)).step.breakdown_s["optimizer"]
    host_step = evaluate(job, _layout(distributed_optimizer=True, optimizer_offload=True)).step.breakdown_s["optimizer"]
    assert host_step > 10 * gpu_step  # the host's DRAM, not the GPU's HBM


def test_torchtitan_copies_each_shard_across_pcie_every_micro_batch():
    titan = Job(model=load_model("llama-3-8b"), cluster=make_job().cluster, global_batch_size=64, seq_length=4096, framework="torchtitan",
                stack="torchtitan", features=stack_features("torchtitan", Features()))
    layout = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=64, recompute="full", fsdp=8)
    plain = evaluate(titan, layout).step.breakdown_s["sharding_comm"]
    hosted = evaluate(titan, Layout(**{**layout.as_dict(), "optimizer_offload": True})).step.breakdown_s["sharding_comm"]
    assert hosted > plain


def test_each_framework_is_told_to_offload():
    job = make_job("llama-3-8b", nodes=1, gbs=64, seq=4096)
    layout = _layout(distributed_optimizer=True, optimizer_offload=True)
    args = megatron_args(job, layout, uniform_stages(job.model, layout))
    assert {"--optimizer-cpu-offload", "--use-precision-aware-optimizer", "--overlap-cpu-optimizer-d2h-h2d"} <= set(args)
    assert args[args.index("--optimizer-offload-fraction") + 1] == "1.0"
    titan = Job(model=load_model("llama-3-8b"), cluster=job.cluster, global_batch_size=64, seq_length=4096, framework="torchtitan",
                stack="torchtitan", features=stack_features("torchtitan", Features()))
    hosted = _layout(fsdp=8, optimizer_offload=True)
    files = launch_files(titan, hosted, uniform_stages(titan.model, hosted), default_placement(titan.cluster, 8))
    path = __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "job.toml"
    path.write_text(files["job.toml"])
    assert ConfigManager().parse_args(["--job.config_file", str(path)]).training.enable_cpu_offload


@pytest.mark.parametrize("framework, flags, field", [
    ("megatron", ["--no-distributed-optimizer"], "--offload-optimizer"),  # the HybridDeviceOptimizer wraps the distributed one
    ("deepspeed", ["--zero-stage", "0"], "--offload-optimizer"),  # offload_optimizer needs a ZeRO stage
    ("torchtitan", ["--dp", "1"], "--offload-optimizer"),  # CPUOffloadPolicy is FSDP2's
])
def test_offload_where_the_framework_cannot_is_bad_input(tmp_path, framework, flags, field):
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                       "nics_per_node": 8, "nic_Gbps": 400}))
    (tmp_path / "job.yaml").write_text(json.dumps({"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 64,
                                                   "seq_length": 4096, "framework": framework}))
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--offload-optimizer", *flags])
    assert result.exit_code == 2, result.output
    assert field in result.output.replace("\n", "")


def test_llamafactory_5977_zero3_on_rtx_3090_needs_offload():
    """hiyouga/LlamaFactory#5977: Llama-3 8B full fine-tuning on 8 RTX 3090
    (24 GB), fp16, ZeRO-3, micro batch 1, 1,024 tokens, gradient
    checkpointing: out of memory; with the optimizer (and weights) offloaded
    to the CPU it ran at 13 GB per card. loom puts ZeRO-3 inside the memory
    headroom (what it cannot see: allocator slack, DeepSpeed's start-up)
    and so never recommends it, and the offloaded run well clear of it."""
    cluster = parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "RTX-3090-24GB", "nvlink_GBps": 12, "nics_per_node": 1,
                             "nic_Gbps": 100}, "rtx3090")
    job = Job(model=load_model("llama-3-8b"), cluster=cluster, global_batch_size=16, seq_length=1024, precision="fp16", framework="deepspeed")
    zero3 = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=16, zero_stage=3, fsdp=8, recompute="full")
    plain, offloaded = evaluate(job, zero3), evaluate(job, Layout(**{**zero3.as_dict(), "optimizer_offload": True}))
    assert not plain.leaves_headroom
    assert offloaded.leaves_headroom and offloaded.peak_memory.peak_bytes < 13 * 10**9


def test_bf16_optimizer_states():
    """Megatron's precision-aware optimizer with bf16 moments keeps 6 bytes
    per parameter (two bf16 moments and the fp32 master's 16-bit remainder)
    where Adam in fp32 keeps 12; torchtitan's training.dtype bfloat16 keeps
    every weight, gradient and moment in bf16 (8 bytes per parameter)."""
    bf16 = Features(optimizer_states="bf16")
    job = make_job("llama-3-8b", nodes=1, gbs=64, seq=4096)
    layout = _layout(distributed_optimizer=True)
    fp32_states = evaluate(job, layout).memory[0].breakdown_bytes["optimizer_states"]
    bf16_states = evaluate(Job(**{**job.__dict__, "features": bf16}), layout).memory[0].breakdown_bytes["optimizer_states"]
    assert bf16_states == pytest.approx(fp32_states / 2)
    args = megatron_args(Job(**{**job.__dict__, "features": bf16}), layout, uniform_stages(job.model, layout))
    assert args[args.index("--exp-avg-dtype") + 1] == args[args.index("--exp-avg-sq-dtype") + 1] == "bf16"
    assert "--use-precision-aware-optimizer" in args
    titan = Job(model=load_model("llama-3-8b"), cluster=job.cluster, global_batch_size=64, seq_length=4096, framework="torchtitan",
                stack="torchtitan", features=stack_features("torchtitan", bf16))
    sharded = _layout(fsdp=8)
    state = evaluate(titan, sharded).memory[0].breakdown_bytes
    params = state["weights"] / 2  # bf16
    assert state["gradients"] == pytest.approx(2 * params) and state["optimizer_states"] == pytest.approx(4 * params)
    files = launch_files(titan, sharded, uniform_stages(titan.model, sharded), default_placement(titan.cluster, 8))
    path = __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "job.toml"
    path.write_text(files["job.toml"])
    assert ConfigManager().parse_args(["--job.config_file", str(path)]).training.dtype == "bfloat16"


@pytest.mark.parametrize("framework, flags, field", [
    ("deepspeed", [], "features.optimizer_states"),  # no bf16 optimizer written for DeepSpeed
    ("megatron", ["--no-distributed-optimizer"], "--distributed-optimizer"),  # the precision-aware optimizer is the distributed one
])
def test_bf16_states_where_the_framework_cannot_are_bad_input(tmp_path, framework, flags, field):
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                       "nics_per_node": 8, "nic_Gbps": 400}))
    (tmp_path / "job.yaml").write_text(json.dumps({"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 64,
                                                   "seq_length": 4096, "framework": framework, "features": {"optimizer_states": "bf16"}}))
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "job.yaml"), *flags])
    assert result.exit_code == 2, result.output
    assert field in result.output.replace("\n", "")


def _job_file(tmp_path, **fields):
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                       "nics_per_node": 8, "nic_Gbps": 400}))
    job = {"model": "llama-3-70b", "cluster": "cluster.yaml", "global_batch_size": 64, "seq_length": 4096, **fields}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    return tmp_path / "job.yaml"


def test_offload_on_one_data_parallel_rank_is_planned_and_its_fix_reproduces(tmp_path):
    """Llama-3 70B on 8 H100 at TP8 needs the optimizer off the GPU: the
    search finds it (the distributed optimizer over one rank is what Megatron
    offloads), evaluate turns the distributed optimizer on by itself, and the
    cheapest fix it prints, typed back, is accepted and fits."""
    runner = CliRunner()
    job = _job_file(tmp_path, search={"tp": [8], "pp": [1], "cp": [1], "optimizer_offload": [True], "recompute": ["full"]})
    assert runner.invoke(app, ["plan", str(job)]).exit_code == 0
    assert runner.invoke(app, ["evaluate", str(job), "--tp", "8", "--dp", "1", "--recompute", "full", "--offload-optimizer"]).exit_code == 0
    base = ["evaluate", str(job), "--tp", "8", "--dp", "1", "--recompute", "full"]
    refused = runner.invoke(app, base)
    assert refused.exit_code == 3
    fix = " ".join(refused.output.split()).split("the cheapest single change that fits: ")[1].split(" (")[0]
    assert runner.invoke(app, [*base, *fix.split()]).exit_code == 0


def test_the_host_step_covers_the_experts_shard():
    """The offloaded step runs over the same partition the memory holds:
    routed experts over expert data parallel, not over DP."""
    from loom.planner.cost.memory import optimizer_partition, stage_params

    job = make_job("mixtral-8x7b", nodes=8, gbs=64, seq=4096)
    layout = Layout(tp=1, pp=1, dp=64, cp=1, ep=8, micro_batch_size=1, global_batch_size=64, recompute="full",
                    distributed_optimizer=True, optimizer_offload=True)
    plan = evaluate(job, layout)
    params = optimizer_partition(stage_params(job.model, layout, plan.stages[0]), layout)
    assert params > 5 * stage_params(job.model, layout, plan.stages[0]).total / 64
    assert plan.step.breakdown_s["optimizer"] == pytest.approx(offload.step_s(params, job.cluster.slowest.gpu, "megatron"), rel=1e-6)


def test_bf16_moments_keep_the_whole_master_off_bf16():
    """Megatron keeps the master as 16-bit remainders only for bf16 models
    (without fp8, or with delayed scaling): fp16 keeps 8 bytes, not 6."""
    job = make_job("llama-3-8b", nodes=1, gbs=64, seq=4096)
    layout = _layout(distributed_optimizer=True)
    states = {}
    for precision in ("bf16", "fp16"):
        priced = Job(**{**job.__dict__, "precision": precision, "features": Features(optimizer_states="bf16")})
        states[precision] = evaluate(priced, layout).memory[0].breakdown_bytes["optimizer_states"]
    assert states["fp16"] == pytest.approx(states["bf16"] * 8 / 6)


def test_deepspeed_offload_copies_accumulating_gradients_every_micro_batch():
    """ZeRO-2 with offload copies each gradient to the host after every
    backward and back before the next (2m - 1 copies of 16-bit gradients a
    step, stage_1_and_2.py async_accumulate_grad_in_cpu_via_gpu); one
    micro batch copies nothing of the kind."""
    job = Job(model=load_model("llama-3-8b"), cluster=make_job().cluster, global_batch_size=256, seq_length=4096, framework="deepspeed")
    copies = {}
    for batch in (64, 256):
        layout = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=batch, recompute="full", zero_stage=2,
                        optimizer_offload=True)
        copies[batch] = evaluate(Job(**{**job.__dict__, "global_batch_size": batch}), layout).step.breakdown_s["offload_copies"]
    params = evaluate(job, Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=256, recompute="full",
                                  zero_stage=2)).memory[0].breakdown_bytes["weights"] / 2
    assert copies[64] == 0.0
    assert copies[256] == pytest.approx(7 * offload.pcie_link(job.cluster.slowest.gpu).seconds(2 * params), rel=1e-6)
