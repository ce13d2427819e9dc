"""The Megatron-LM launch files, checked by megatron-core itself: the emitted
flags build a ``TransformerConfig`` (whose __post_init__ validates them),
``RankGenerator`` forms the groups loom assumes, and ``train.sh`` run per host
(with torchrun replaced by a recorder) realises the placement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.parallel_state import RankGenerator
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend, LayerType

from loom.planner.specs.cluster import parse_cluster
from loom.planner.output.launch import launch_files
from loom.planner.output.megatron import megatron_args, train_sh
from loom.planner.specs.job import Features, Job, stack_features
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.specs.stages import Chunk, Placement, Stage, default_placement, split_stages, uniform_stages


def make_cluster(nodes: int, hosts: list[str] | None = None, named: bool = True):
    """A cluster of H100 nodes, named node000... unless ``hosts`` names them
    otherwise or ``named`` is False (then the launch files take whichever nodes they are given)."""
    spec = {"nodes": nodes, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    names = hosts or [f"node{i:03d}" for i in range(nodes)]
    return parse_cluster({**spec, **({"hosts": names} if named else {})}, "test")


def uneven_stages(layout: Layout, sizes: list[int]) -> list[Stage]:
    """Stages with ``sizes[i]`` decoder layers on virtual stage i."""
    n = layout.tp * layout.cp * layout.dp
    chunks, first = [], 0
    for i, size in enumerate(sizes):
        chunks.append(Chunk(first, size, embedding=i == 0, head=i == len(sizes) - 1))
        first += size
    return [
        Stage(s, tuple(chunks[v * layout.pp + s] for v in range(layout.vpp)), range(s * n, (s + 1) * n))
        for s in range(layout.pp)
    ]


GPT3 = load_model("gpt3-175b")
LLAMA = load_model("llama-3-8b")

CASES = {
    # GPT-3: learned positions, biases, LayerNorm, GeLU; interleaved, selective recompute.
    "gpt3-vpp-selective": (
        Job(model=GPT3, cluster=make_cluster(8), global_batch_size=64, seq_length=2048),
        Layout(tp=8, pp=8, dp=1, cp=1, micro_batch_size=1, global_batch_size=64, vpp=2,
               sequence_parallel=True, recompute="selective", distributed_optimizer=True),
        None,
    ),
    # Llama-3: GQA, SwiGLU, RMSNorm, RoPE; context parallel, full recompute.
    "llama-cp-full": (
        Job(model=LLAMA, cluster=make_cluster(2), global_batch_size=128, seq_length=8192),
        Layout(tp=2, pp=2, dp=2, cp=2, micro_batch_size=1, global_batch_size=128,
               sequence_parallel=True, recompute="full", distributed_optimizer=True),
        None,
    ),
    # fp32 weights with TF32 GEMMs: no --bf16, unfused attention (no flash kernel takes fp32).
    "llama-tf32": (
        Job(model=LLAMA, cluster=make_cluster(1), global_batch_size=64, seq_length=2048, precision="tf32",
            features=Features(flash_attention=False)),
        Layout(tp=2, pp=1, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, distributed_optimizer=True),
        None,
    ),
    # fp8 with plain data parallelism and unfused attention.
    "llama-fp8-dp": (
        Job(model=LLAMA, cluster=make_cluster(1), global_batch_size=64, seq_length=4096, precision="fp8",
            features=Features(flash_attention=False)),
        Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=2, global_batch_size=64),
        None,
    ),
    # NVIDIA's performance recipes: bf16 gradients, fp8 weights gathered in
    # fp8 with current scaling, TE's fused loss, TP comm overlap.
    "llama-fp8-bridge": (
        Job(model=LLAMA, cluster=make_cluster(2), global_batch_size=64, seq_length=8192, precision="fp8", stack="megatron-bridge",
            features=stack_features("megatron-bridge", Features())),
        Layout(tp=2, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, distributed_optimizer=True),
        None,
    ),
    # MXFP8 on Blackwell: fp8 weights reuse the gradient buffer for their all-gather.
    "llama-mxfp8-b200": (
        Job(model=LLAMA, cluster=parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "B200", "nvlink_GBps": 900, "nics_per_node": 8,
                                                "nic_Gbps": 400}, "test"),
            global_batch_size=64, seq_length=8192, precision="fp8",
            features=stack_features("megatron-bridge", Features(fp8_recipe="mxfp8"))),
        Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True),
        None,
    ),
    # Partial recomputation: the first 2 layers of each model chunk (block).
    "llama-block-recompute": (
        Job(model=LLAMA, cluster=make_cluster(2), global_batch_size=64, seq_length=8192),
        Layout(tp=2, pp=2, dp=4, cp=1, vpp=2, micro_batch_size=1, global_batch_size=64, sequence_parallel=True,
               recompute="full", recompute_num_layers=2, distributed_optimizer=True),
        None,
    ),
    # Selective recomputation of named modules.
    "llama-recompute-modules": (
        Job(model=LLAMA, cluster=make_cluster(1), global_batch_size=64, seq_length=8192),
        Layout(tp=2, pp=2, dp=2, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True,
               recompute="selective", recompute_modules=("core_attn", "mlp"), distributed_optimizer=True),
        None,
    ),
    # An uneven interleaved split, written as --pipeline-model-parallel-layout.
    "llama-uneven-vpp": (
        Job(model=LLAMA, cluster=make_cluster(2), global_batch_size=64, seq_length=4096),
        Layout(tp=2, pp=4, dp=2, cp=1, micro_batch_size=1, global_batch_size=64, vpp=2, sequence_parallel=True),
        [3, 4, 4, 5, 5, 4, 4, 3],
    ),
}


def build(name: str):
    job, layout, sizes = CASES[name]
    stages = uneven_stages(layout, sizes) if sizes else uniform_stages(job.model, layout)
    return job, layout, stages


def parse_flags(args: list[str]) -> dict[str, object]:
    """``--flag value`` -> {"flag": "value"}; a bare ``--flag`` -> True;
    ``--flag a b`` (argparse's nargs="+") -> {"flag": ["a", "b"]}."""
    flags: dict[str, object] = {}
    for i, token in enumerate(args):
        if token.startswith("--"):
            values = []
            for following in args[i + 1:]:
                if following.startswith("--"):
                    break
                values.append(following)
            flags[token[2:]] = True if not values else values[0] if len(values) == 1 else values
    return flags


def transformer_config(flags: dict) -> TransformerConfig:
    """Map the flags onto TransformerConfig as Megatron-LM's
    core_transformer_config_from_args does (vpp as validate_args derives it)."""
    tp, pp = int(flags["tensor-model-parallel-size"]), int(flags["pipeline-model-parallel-size"])
    num_layers = int(flags["num-layers"])
    vpp = None
    if "num-layers-per-virtual-pipeline-stage" in flags:
        vpp = num_layers // pp // int(flags["num-layers-per-virtual-pipeline-stage"])
    dtype = torch.float16 if "fp16" in flags else torch.bfloat16 if "bf16" in flags else torch.float32
    recompute_layers = flags.get("recompute-num-layers")
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=int(flags["hidden-size"]),
        num_attention_heads=int(flags["num-attention-heads"]),
        num_query_groups=int(flags["num-query-groups"]) if "group-query-attention" in flags else None,
        ffn_hidden_size=int(flags["ffn-hidden-size"]),
        gated_linear_unit="swiglu" in flags,
        activation_func=F.silu if "swiglu" in flags else F.gelu,
        normalization=flags["normalization"],
        add_bias_linear="disable-bias-linear" not in flags,
        add_qkv_bias="add-qkv-bias" in flags,
        hidden_dropout=float(flags["hidden-dropout"]),
        attention_dropout=float(flags["attention-dropout"]),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_model_parallel_layout=flags.get("pipeline-model-parallel-layout"),
        num_layers_in_first_pipeline_stage=int(flags["decoder-first-pipeline-num-layers"]) if "decoder-first-pipeline-num-layers" in flags else None,
        num_layers_in_last_pipeline_stage=int(flags["decoder-last-pipeline-num-layers"]) if "decoder-last-pipeline-num-layers" in flags else None,
        context_parallel_size=int(flags["context-parallel-size"]),
        sequence_parallel="sequence-parallel" in flags,
        recompute_granularity=flags.get("recompute-granularity"),
        recompute_method=flags.get("recompute-method"),
        recompute_num_layers=int(recompute_layers) if recompute_layers else None,
        recompute_modules=_listed(flags.get("recompute-modules")),
        bf16="bf16" in flags,
        fp16="fp16" in flags,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        fp8=flags.get("fp8-format"),
        fp8_recipe=flags.get("fp8-recipe", "delayed"),
        fp8_param="fp8-param-gather" in flags,
        cross_entropy_loss_fusion="cross-entropy-loss-fusion" in flags,
        cross_entropy_fusion_impl=flags.get("cross-entropy-fusion-impl", "native"),
        attention_backend=AttnBackend[flags["attention-backend"]],
    )


def _listed(value: object) -> list[str] | None:
    """A flag's values as a list (one value parses as a string)."""
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def ddp_config(flags: dict) -> DistributedDataParallelConfig:
    """The gradient buffer's settings as Megatron-LM's training.py passes
    them to DistributedDataParallel (accumulate_allreduce_grads_in_fp32 ->
    grad_reduce_in_fp32; validate_args turns it on for bf16 unless
    --grad-reduce-in-bf16)."""
    bf16 = "bf16" in flags
    fp32 = "accumulate-allreduce-grads-in-fp32" in flags or (bf16 and "grad-reduce-in-bf16" not in flags)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=fp32,
        use_distributed_optimizer="use-distributed-optimizer" in flags,
        fp8_param_gather="fp8-param-gather" in flags,
        reuse_grad_buf_for_mxfp8_param_ag="reuse-grad-buf-for-mxfp8-param-ag" in flags,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_args_build_a_valid_transformer_config(name):
    job, layout, stages = build(name)
    flags = parse_flags(megatron_args(job, layout, stages))
    config = transformer_config(flags)
    model = job.model
    assert config.num_query_groups == model.num_query_groups
    assert config.gated_linear_unit == model.gated_mlp
    assert config.add_bias_linear == model.linear_bias
    assert (flags["position-embedding-type"] == "learned_absolute") == model.learned_position_embeddings
    assert ("untie-embeddings-and-output-weights" in flags) == (not model.tied_embeddings)
    assert config.sequence_parallel == layout.sequence_parallel
    assert (config.virtual_pipeline_model_parallel_size or 1) == layout.vpp
    expected_recompute = {"none": None, "selective": "selective", "full": "full"}[layout.recompute]
    assert config.recompute_granularity == expected_recompute
    if layout.recompute == "selective":
        assert tuple(config.recompute_modules) == layout.selective_modules
    if layout.recompute == "full":
        assert (config.recompute_method, config.recompute_num_layers) == (
            ("block", layout.recompute_num_layers) if layout.recompute_num_layers else ("uniform", 1))
    assert int(flags["global-batch-size"]) == layout.global_batch_size
    assert int(flags["micro-batch-size"]) == layout.micro_batch_size
    assert ("use-distributed-optimizer" in flags) == layout.distributed_optimizer
    kernel = {"cudnn": "fused", "flash2": "flash"}[job.features.attention_kernel]
    assert flags["attention-backend"] == (kernel if job.features.flash_attention else "unfused")
    if job.precision == "fp8":
        assert config.fp8 == "hybrid" and config.bf16
        assert config.fp8_recipe == job.features.fp8_recipe
    assert config.cross_entropy_loss_fusion == (job.features.cross_entropy_fusion != "none")
    ddp = ddp_config(flags)
    # tf32: fp32 parameters, so the gradient buffer is fp32 without the flag (param.dtype).
    assert ddp.grad_reduce_in_fp32 == (job.features.grad_reduce_in_fp32 and job.precision != "tf32")
    assert (config.params_dtype == torch.float32) == (job.precision == "tf32")
    fp8_weights = job.precision == "fp8" and job.features.fp8_param_gather and layout.distributed_optimizer
    assert config.fp8_param == ddp.fp8_param_gather == fp8_weights
    assert ddp.reuse_grad_buf_for_mxfp8_param_ag == (fp8_weights and job.features.fp8_recipe == "mxfp8")


def test_uneven_split_is_the_stages_layer_counts():
    job, layout, stages = build("llama-uneven-vpp")
    config = transformer_config(parse_flags(megatron_args(job, layout, stages)))
    # megatron-core's parsed layout: layer types per [pp rank][virtual stage].
    parsed = config.pipeline_model_parallel_layout.layout
    for stage in stages:
        for v, chunk in enumerate(stage.chunks):
            layers = parsed[stage.index][v]
            assert layers.count(LayerType.decoder) == chunk.num_layers
            assert (LayerType.embedding in layers) == chunk.embedding
            assert (LayerType.loss in layers) == chunk.head


@pytest.mark.parametrize("name", sorted(CASES))
def test_rank_generator_groups_match_loom_stages(name):
    job, layout, stages = build(name)
    flags = parse_flags(megatron_args(job, layout, stages))
    tp, pp, cp = (int(flags[f]) for f in ("tensor-model-parallel-size", "pipeline-model-parallel-size", "context-parallel-size"))
    dp = layout.world_size // (tp * pp * cp)
    ranks = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    for group in ranks.get_ranks("pp"):
        assert all(rank in stage.ranks for stage, rank in zip(stages, group))
    for stage in stages:
        assert sorted(group[stage.index] for group in ranks.get_ranks("pp")) == list(stage.ranks)
    # TP groups are contiguous blocks; DP groups stride over tp * cp ranks.
    assert ranks.get_ranks("tp") == [list(range(i, i + tp)) for i in range(0, layout.world_size, tp)]
    for group in ranks.get_ranks("dp"):
        assert group == [group[0] + k * tp * cp for k in range(dp)]


def test_interleaving_needs_micro_batches_in_multiples_of_pp():
    job, layout, _ = build("gpt3-vpp-selective")
    odd = Layout(**{**layout.as_dict(), "global_batch_size": 60})  # 60 micro batches over PP8
    with pytest.raises(ValueError, match="interleaving"):
        megatron_args(job, odd, uniform_stages(job.model, odd))


def test_sequence_parallel_without_tp_is_refused():
    job, layout, _ = build("llama-fp8-dp")
    bad = Layout(**{**layout.as_dict(), "sequence_parallel": True})
    with pytest.raises(ValueError, match="sequence parallelism"):
        megatron_args(job, bad, uniform_stages(job.model, bad))


# --- train.sh realises the placement ---------------------------------------

FAKE_TORCHRUN = """#!{python}
import json, os, sys
with open(os.environ["CAPTURE"], "w") as out:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, out)
"""


def run_train_sh(tmp_path: Path, script: str, host: str, extra_env: dict | None = None) -> dict:
    """Run train.sh as ``host`` with torchrun replaced by a recorder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "torchrun"
    fake.write_text(FAKE_TORCHRUN.format(python=sys.executable))
    fake.chmod(0o755)
    (tmp_path / "train.sh").write_text(script)
    capture = tmp_path / f"{host}.json"
    inherited = {"NODE_RANK", "LOOM_NODE_RANK", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "SLURMD_NODENAME"}
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", LOOM_HOST=host, CAPTURE=str(capture), **(extra_env or {}))
    subprocess.run(["bash", str(tmp_path / "train.sh")], env=env, check=True)
    return json.loads(capture.read_text())


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def placement_from_launch(tmp_path: Path, script: str, hosts: list[str], named: bool = True) -> list[tuple[str, int]]:
    """rank -> (host, GPU) as torchrun would start it: rank = node_rank * nproc + local_rank,
    local rank i on the i-th visible GPU. Without host names, ``hosts`` are the
    job's nodes in the order the scheduler numbers them."""
    gpus: dict[int, tuple[str, int]] = {}
    for index, host in enumerate(hosts):
        got = run_train_sh(tmp_path, script, host, None if named else {"LOOM_NODE_INDEX": str(index), "MASTER_ADDR": "rank-0-node"})
        node_rank, nproc = int(flag(got["argv"], "--node-rank")), int(flag(got["argv"], "--nproc-per-node"))
        visible = got["env"].get("CUDA_VISIBLE_DEVICES")
        devices = [int(d) for d in visible.split(",")] if visible else list(range(nproc))
        for local in range(nproc):
            gpus[node_rank * nproc + local] = (host, devices[local])
    return [gpus[rank] for rank in range(len(gpus))]


def permuted_placement() -> tuple[Job, Layout, Placement]:
    """Host b first, with its GPUs pairwise swapped; host a second, in order."""
    job = Job(model=LLAMA, cluster=make_cluster(2, hosts=["a", "b"]), global_batch_size=64, seq_length=4096)
    layout = Layout(tp=2, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True)
    swapped = [1, 0, 3, 2, 5, 4, 7, 6]
    placement = Placement(gpus=tuple([("b", g) for g in swapped] + [("a", g) for g in range(8)]))
    return job, layout, placement


def test_train_sh_realises_a_permuted_placement(tmp_path):
    job, layout, placement = permuted_placement()
    script = train_sh(job, layout, uniform_stages(job.model, layout), placement)
    assert placement_from_launch(tmp_path, script, ["a", "b"]) == list(placement.gpus)
    got = run_train_sh(tmp_path, script, "a")
    assert flag(got["argv"], "--master-addr") == "b"  # the host of rank 0
    assert got["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "--mock-data" in got["argv"]


def test_train_sh_default_placement_and_overrides(tmp_path):
    job, layout, _ = build("llama-cp-full")
    placement = default_placement(job.cluster, layout.world_size)
    script = train_sh(job, layout, uniform_stages(job.model, layout), placement)
    assert placement_from_launch(tmp_path, script, job.cluster.hosts) == list(placement.gpus)
    # Neither a platform's NODE_RANK nor an inherited CUDA_VISIBLE_DEVICES moves the ranks.
    got = run_train_sh(tmp_path, script, "node001", {"NODE_RANK": "0", "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert flag(got["argv"], "--node-rank") == "1"
    assert got["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    got = run_train_sh(tmp_path, script, "node000", {"LOOM_NODE_RANK": "1", "DATA_PATH": "0.7 /d/a 0.3 /d/b"})
    assert flag(got["argv"], "--node-rank") == "1"
    argv = got["argv"]
    assert argv[argv.index("--data-path") + 1 : argv.index("--data-path") + 5] == ["0.7", "/d/a", "0.3", "/d/b"]
    assert "--mock-data" not in argv


def test_without_host_names_train_sh_runs_on_the_nodes_the_scheduler_gives(tmp_path):
    """No hosts in the cluster: the job's node i (SLURM_NODEID) stands for the
    cluster's node i, here node rank 1 - i; rank 0 runs on its node of the
    allocation; each node's GPUs in the planned order; the sbatch pins no
    node list."""
    job, layout, _ = build("llama-cp-full")
    job = Job(model=job.model, cluster=make_cluster(2, named=False), global_batch_size=job.global_batch_size, seq_length=job.seq_length)
    gpus = [("node001", g) for g in (7, 6, 5, 4, 3, 2, 1, 0)] + [("node000", g) for g in range(8)]
    placement = Placement(gpus=tuple(gpus))
    files = launch_files(job, layout, uniform_stages(job.model, layout), placement)
    assert not any(line.startswith("#SBATCH --nodelist") for line in files["slurm.sbatch"].splitlines())
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text('#!/bin/bash\nprintf "gpu-42\\ngpu-17\\n"\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_NODELIST": "gpu-[17,42]"}
    for node, visible in ((1, "7,6,5,4,3,2,1,0"), (0, "0,1,2,3,4,5,6,7")):
        got = run_train_sh(tmp_path, files["train.sh"], f"host{node}", {**slurm, "SLURM_NODEID": str(node)})
        assert flag(got["argv"], "--node-rank") == str(1 - node)
        assert flag(got["argv"], "--master-addr") == "gpu-17"
        assert got["env"]["CUDA_VISIBLE_DEVICES"] == visible
    # The sbatch exports the same rank-0 node (train.sh keeps an exported MASTER_ADDR).
    export = next(line for line in files["slurm.sbatch"].splitlines() if line.startswith("export MASTER_ADDR="))
    env = {**os.environ, "PATH": f"{scontrol.parent}:{os.environ['PATH']}", **slurm}
    env.pop("MASTER_ADDR", None)
    exported = subprocess.run(["bash", "-c", f'{export}; echo "$MASTER_ADDR"'], env=env, capture_output=True, text=True, check=True)
    assert exported.stdout.strip() == "gpu-17"
    # LOOM_NODE_RANK alone names the node rank, outside SLURM too.
    got = run_train_sh(tmp_path, files["train.sh"], "elsewhere", {"LOOM_NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"})
    assert flag(got["argv"], "--node-rank") == "1" and got["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"


def test_train_sh_refuses_a_host_with_non_contiguous_ranks():
    job, layout, _ = permuted_placement()
    interleaved = Placement(gpus=tuple((("a", "b")[r % 2], r // 2) for r in range(16)))
    with pytest.raises(ValueError, match="not contiguous"):
        train_sh(job, layout, uniform_stages(job.model, layout), interleaved)


def test_slurm_wrapper_lists_hosts_in_node_order():
    job, layout, placement = permuted_placement()
    files = launch_files(job, layout, uniform_stages(job.model, layout), placement)
    sbatch = files["slurm.sbatch"].splitlines()
    assert "#SBATCH --nodelist=b,a" in sbatch
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert "#SBATCH --gpus-per-node=8" in sbatch and "#SBATCH --exclusive" in sbatch
    assert any(line.startswith("srun ") and "train.sh" in line for line in sbatch)
    for text in files.values():
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # syntax


def test_stages_that_drop_layers_are_refused():
    job, layout, _ = build("llama-uneven-vpp")
    with pytest.raises(ValueError, match="run 30 of 32 layers"):
        megatron_args(job, layout, uneven_stages(layout, [3, 4, 4, 4, 4, 4, 4, 3]))


@pytest.mark.parametrize("model, pp, sizes", [
    ("llama-3-8b", 4, [8, 9, 9, 6]),  # what the partition MILP picks for a 128K vocabulary
    ("llama-3-405b", 16, [7] + [8] * 14 + [7]),  # Meta's split: one layer less at each end
    ("llama-3-8b", 2, [15, 17]),
])
def test_first_and_last_stage_flags_build_the_planned_split(model, pp, sizes):
    """Where only the end stages differ, the split is written as
    --decoder-first/last-pipeline-num-layers, and megatron-core builds exactly
    the planned number of layers on every pipeline rank."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    job = Job(model=load_model(model), cluster=make_cluster(2), global_batch_size=64, seq_length=4096)
    layout = Layout(tp=1, pp=pp, dp=16 // pp, cp=1, micro_batch_size=1, global_batch_size=64)
    stages = split_stages(layout, tuple(sizes))
    flags = parse_flags(megatron_args(job, layout, stages))
    assert "pipeline-model-parallel-layout" not in flags
    config = transformer_config(flags)
    assert [get_num_layers_to_build(config, pp_rank=s) for s in range(pp)] == sizes


MOE_CASES = {
    # Mixtral: token dropping padded to capacity, fused router, shared nothing.
    "mixtral-token-drop": (
        "mixtral-8x7b", Features(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True, moe_router_fusion=True),
        Layout(tp=2, pp=1, dp=8, cp=1, ep=8, micro_batch_size=1, global_batch_size=128, sequence_parallel=True, distributed_optimizer=True),
    ),
    # Qwen3-235B: DeepEP with the all-to-all overlapped across micro batches (needs vpp with pp > 1).
    "qwen3-deepep-a2a-overlap": (
        "qwen3-235b-a22b", Features(moe_token_dispatcher="deepep", overlap_moe_expert_parallel_comm=True),
        Layout(tp=2, pp=4, dp=8, cp=1, ep=16, vpp=2, micro_batch_size=1, global_batch_size=256, sequence_parallel=True, distributed_optimizer=True),
    ),
    # Qwen3-235B with HybridEP.
    "qwen3-hybridep": (
        "qwen3-235b-a22b", Features(moe_token_dispatcher="hybridep"),
        Layout(tp=1, pp=4, dp=16, cp=1, ep=8, micro_batch_size=1, global_batch_size=256, distributed_optimizer=True),
    ),
    # Mixtral with the all-gather dispatcher.
    "mixtral-allgather": (
        "mixtral-8x7b", Features(moe_token_dispatcher="allgather"),
        Layout(tp=1, pp=2, dp=32, cp=1, ep=4, micro_batch_size=1, global_batch_size=128, distributed_optimizer=True),
    ),
}


def moe_transformer_config(flags: dict) -> TransformerConfig:
    """The MoE flags onto TransformerConfig as core_transformer_config_from_args
    maps them (one argument per dataclass field). --moe-permute-fusion is left
    out: its check imports Transformer Engine's fused kernels, not installed here."""
    tp, pp = int(flags["tensor-model-parallel-size"]), int(flags["pipeline-model-parallel-size"])
    num_layers = int(flags["num-layers"])
    vpp = num_layers // pp // int(flags["num-layers-per-virtual-pipeline-stage"]) if "num-layers-per-virtual-pipeline-stage" in flags else None
    if "pipeline-model-parallel-layout" in flags:  # an uneven split: pp x vpp chunks
        vpp = (flags["pipeline-model-parallel-layout"].count("|") + 1) // pp or None
    capacity = flags.get("moe-expert-capacity-factor")
    return TransformerConfig(
        num_layers=num_layers, hidden_size=int(flags["hidden-size"]), num_attention_heads=int(flags["num-attention-heads"]),
        num_query_groups=int(flags["num-query-groups"]) if "group-query-attention" in flags else None,
        ffn_hidden_size=int(flags["ffn-hidden-size"]), gated_linear_unit="swiglu" in flags, activation_func=F.silu,
        add_bias_linear="disable-bias-linear" not in flags, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel="sequence-parallel" in flags,
        expert_model_parallel_size=int(flags["expert-model-parallel-size"]),
        expert_tensor_parallel_size=int(flags["expert-tensor-parallel-size"]),
        num_moe_experts=int(flags["num-experts"]), moe_router_topk=int(flags["moe-router-topk"]),
        moe_ffn_hidden_size=int(flags["moe-ffn-hidden-size"]), moe_grouped_gemm="moe-grouped-gemm" in flags,
        moe_router_load_balancing_type=flags.get("moe-router-load-balancing-type", "aux_loss"),
        moe_aux_loss_coeff=float(flags.get("moe-aux-loss-coeff", 0.0)),
        moe_token_dispatcher_type=flags["moe-token-dispatcher-type"],
        moe_flex_dispatcher_backend=flags.get("moe-flex-dispatcher-backend", "deepep"),
        moe_expert_capacity_factor=float(capacity) if capacity else None,
        moe_pad_expert_input_to_capacity="moe-pad-expert-input-to-capacity" in flags,
        moe_router_fusion="moe-router-fusion" in flags,
        overlap_moe_expert_parallel_comm="overlap-moe-expert-parallel-comm" in flags,
        delay_wgrad_compute="delay-wgrad-compute" in flags,
        moe_shared_expert_overlap="moe-shared-expert-overlap" in flags,
    )


@pytest.mark.parametrize("name", sorted(MOE_CASES))
def test_moe_flags_build_a_valid_transformer_config(name):
    model, features, layout = MOE_CASES[name]
    job = Job(model=load_model(model), cluster=make_cluster(layout.world_size // 8), global_batch_size=layout.global_batch_size,
              seq_length=4096, features=features)
    flags = parse_flags(megatron_args(job, layout, uniform_stages(job.model, layout)))
    config = moe_transformer_config(flags)
    dispatcher = features.moe_token_dispatcher
    assert config.moe_token_dispatcher_type == ("flex" if dispatcher in ("deepep", "hybridep") else dispatcher)
    if dispatcher in ("deepep", "hybridep"):
        assert config.moe_flex_dispatcher_backend == dispatcher
    assert config.moe_expert_capacity_factor == features.moe_expert_capacity_factor
    assert config.moe_pad_expert_input_to_capacity == features.moe_pad_expert_input_to_capacity
    assert config.overlap_moe_expert_parallel_comm == config.delay_wgrad_compute == features.overlap_moe_expert_parallel_comm


def test_megatron_bridge_stack_emits_the_fused_moe_kernels():
    job = Job(model=load_model("mixtral-8x7b"), cluster=make_cluster(2), global_batch_size=64, seq_length=4096, stack="megatron-bridge",
              features=stack_features("megatron-bridge", Features()))
    layout = Layout(tp=1, pp=1, dp=16, cp=1, ep=8, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)
    flags = parse_flags(megatron_args(job, layout, uniform_stages(job.model, layout)))
    assert flags.get("moe-router-fusion") is True and flags.get("moe-permute-fusion") is True


def test_an_uneven_deepseek_layout_places_its_mtp_layer_as_megatron_checks():
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    model = load_model("deepseek-v3")
    job = Job(model=model, cluster=make_cluster(128), global_batch_size=512, seq_length=4096)
    layout = Layout(tp=2, pp=4, dp=64, cp=2, ep=64, vpp=4, micro_batch_size=1, global_batch_size=512, sequence_parallel=True,
                    distributed_optimizer=True)
    flags = parse_flags(megatron_args(job, layout, uniform_stages(model, layout)))
    text = flags["pipeline-model-parallel-layout"]
    assert text.count("m") == int(flags["mtp-num-layers"]) == model.mtp_layers and text.endswith("mL")
    PipelineParallelLayerLayout(text, layout.pp).validate_layer_layout(model.num_layers, model.mtp_layers)


FAKE_HOSTNAME = """#!/bin/bash
case "${{1:-}}" in -s) echo {short} ;; -I) echo 192.168.7.9 {address} ;; *) echo {full} ;; esac
"""


@pytest.mark.parametrize("hosts, short, full, address", [
    (["gpu-a.example.org", "gpu-b.example.org"], "gpu-b", "GPU-B.example.org", "10.0.0.2"),  # full names, any case
    (["10.0.0.1", "10.0.0.2"], "gpu-b", "gpu-b", "10.0.0.2"),  # addresses
    (["Gpu-A", "Gpu-B"], "gpu-b", "gpu-b.example.org", "10.0.0.2"),  # the file's case, not the host's
])
def test_train_sh_finds_its_node_by_any_of_its_names(tmp_path, hosts, short, full, address):
    job = Job(model=LLAMA, cluster=make_cluster(2, hosts=hosts), global_batch_size=64, seq_length=4096)
    layout = Layout(tp=8, pp=1, dp=2, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, distributed_optimizer=True)
    files = launch_files(job, layout, uniform_stages(LLAMA, layout), default_placement(job.cluster, 16))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("torchrun", FAKE_TORCHRUN.format(python=sys.executable)), ("hostname", FAKE_HOSTNAME.format(short=short, full=full, address=address))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "train.sh").write_text(files["train.sh"])
    inherited = {"NODE_RANK", "LOOM_NODE_RANK", "LOOM_HOST", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "SLURMD_NODENAME"}
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", CAPTURE=str(tmp_path / "run.json"))
    subprocess.run(["bash", str(tmp_path / "train.sh")], env=env, check=True)
    argv = json.loads((tmp_path / "run.json").read_text())["argv"]
    assert flag(argv, "--node-rank") == "1"


def test_host_names_differing_only_in_case_are_one_host():
    from loom.planner.specs.errors import SpecError

    with pytest.raises(SpecError, match="ignore case"):
        make_cluster(2, hosts=["gpu-a", "GPU-A"])


def test_the_null_tokenizers_vocabulary_is_the_configs():
    """Megatron-LM's NullTokenizer appends its end-of-document id to the ids
    --vocab-size gives (training/tokenizer/tokenizer.py: vocab_size = given
    + 1); given one fewer, the model's vocabulary is the config's (its
    padding then too). benchmarks/megatron_lm_args.py builds the tokenizer
    from the flags and checks the same against Megatron-LM's own code."""
    job, layout, _ = build("llama-cp-full")
    flags = parse_flags(megatron_args(job, layout, uniform_stages(job.model, layout)))
    assert flags["tokenizer-type"] == "NullTokenizer" and int(flags["vocab-size"]) + 1 == job.model.vocab_size
