"""torchtitan plans checked by torchtitan itself (0.2.2, the test extra):
loom's table of its models against its registry, the job TOML through its
config manager (which rejects unknown keys), the stage split against the
model's own module names, and the launcher's ranks against the process
groups torchtitan's ParallelDims builds from them (on torch's fake process
group: no GPU, no network)."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import tomllib
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torchtitan.config import ConfigManager
from torchtitan.distributed.parallel_dims import ParallelDims
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.output.launch import launch_files
from loom.planner.output.torchtitan import job_toml
from loom.planner.plan import evaluate
from loom.planner.specs import torchtitan
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Features, Job, job_warnings, stack_features
from loom.planner.specs.layout import Layout, rank_groups
from loom.planner.specs.model import load_model
from loom.planner.specs.stages import uniform_stages
from test_placement_launch import clean_env, captures, cluster, install, permuted_placement, RECORDER, torchrun_placement

logging.getLogger("torchtitan").setLevel(logging.WARNING)
REGISTRIES = {"llama3": "llama3_args", "qwen3": "qwen3_args", "deepseek_v3": "deepseekv3_args", "gpt_oss": "gptoss_configs"}


def _shape(name: str, args) -> tuple[int, ...]:
    """A registered flavor's entries of loom's Flavor.shape, as its model builds them."""
    tied = int(getattr(args, "enable_weight_tying", False))
    if name == "llama3":  # FeedForward: 2/3 of 4 dim, times ffn_dim_multiplier, rounded up to multiple_of
        ffn = int(args.ffn_dim_multiplier * int(2 * 4 * args.dim / 3))
        ffn = args.multiple_of * -(-ffn // args.multiple_of)
        head = args.dim // args.n_heads
        return (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, ffn, args.vocab_size, 0, tied, head, head)
    if name == "qwen3":
        experts = args.moe_args.num_experts if args.moe_enabled else 0
        return (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim, args.vocab_size, experts, tied, args.head_dim,
                args.head_dim)
    if name == "gpt_oss":
        return (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.moe_inter_dim, args.vocab_size, args.moe_args.num_experts, tied,
                args.head_dim, args.head_dim)
    return (args.dim, args.n_layers, args.n_heads, args.n_heads, args.inter_dim, args.vocab_size, args.moe_args.num_experts, tied,
            args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim)


def test_loom_flavors_are_torchtitans():
    """Every flavor loom names exists in torchtitan with that shape, and
    whether it pipelines is its TrainSpec's."""
    for flavor in torchtitan.FLAVORS:
        module = importlib.import_module(f"torchtitan.models.{flavor.name}")
        registered = getattr(module, REGISTRIES[flavor.name])
        args = registered[flavor.flavor]
        assert _shape(flavor.name, args) == flavor.shape, flavor
        assert (module.get_train_spec().pipelining_fn is not None) == flavor.pipeline, flavor
        scaling = args.rope_scaling_args.scaling_factor if flavor.name == "llama3" else None
        assert flavor.rotary == (args.rope_theta, scaling), flavor
        assert torchtitan.NORM_EPS[flavor.name] == args.norm_eps, flavor


def test_a_config_whose_rotary_embeddings_torchtitan_does_not_build_is_warned():
    """torchtitan's llama3 always applies Llama 3.1's RoPE scaling and its
    Qwen3-235B flavor a rope_theta of 5e6: a config without them trains
    the flavor's positions, which the plan says."""
    cluster = {"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    llama3 = Job(model=load_model("llama-3-8b"), cluster=parse_cluster(cluster, "t"), global_batch_size=16, seq_length=8192, framework="torchtitan")
    [warning] = [w for w in job_warnings(llama3) if "rotary" in w]
    assert "Llama 3.1's scaling x8" in warning and "llama-3-8b's config rope_theta 500000, unscaled" in warning
    scaled = replace(llama3.model, rope_scaling_factor=8.0)
    assert not [w for w in job_warnings(replace(llama3, model=scaled)) if "rotary" in w]
    assert torchtitan.rotary_mismatch(load_model("qwen3-235b-a22b"), 4096).count("rope_theta") == 2
    # DeepSeek-V3's config scales by YaRN x40 at any length; torchtitan only past its original 4,096 tokens.
    deepseek = load_model("deepseek-v3")
    assert "unscaled at 4,096 tokens" in torchtitan.rotary_mismatch(deepseek, 4096)
    assert not torchtitan.rotary_mismatch(deepseek, 8192)
    assert "YaRN x32" in torchtitan.rotary_mismatch(load_model("gpt-oss-20b"), 4096)  # the catalogue's config is unscaled
    # DeepSeek-V3 normalises with eps 1e-6; torchtitan's deepseek_v3 with 1e-5
    assert "eps 1e-05" in torchtitan.norm_mismatch(deepseek) and not torchtitan.norm_mismatch(load_model("qwen3-8b"))
    assert not job_warnings(replace(llama3, framework="megatron"))


def test_catalogue_models_map_to_their_flavors():
    assert torchtitan.flavor_of(load_model("llama-3-70b")).flavor == "70B"
    assert torchtitan.flavor_of(load_model("deepseek-v2-lite")).flavor == "16B"
    assert torchtitan.flavor_of(load_model("gpt-oss-120b")).flavor == "120b"
    assert torchtitan.flavor_of(load_model("mistral-7b")) is None  # Llama 3 8B's width and depth, another vocabulary
    # The same shape with its output layer tied to the embedding is another model (flavor 8B is untied).
    assert torchtitan.flavor_of(replace(load_model("llama-3-8b"), tied_embeddings=True)) is None
    # So is a head dim of its own (torchtitan's llama3 builds dim / n_heads).
    assert torchtitan.flavor_of(replace(load_model("llama-3-8b"), kv_channels=256)) is None


@pytest.fixture(scope="module")
def llama70b_plan(tmp_path_factory):
    """``loom plan --framework torchtitan`` for Llama-3 70B on 64 H100."""
    folder = tmp_path_factory.mktemp("tt")
    (folder / "cluster.yaml").write_text(json.dumps({"nodes": 8, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                     "nics_per_node": 8, "nic_Gbps": 400}))
    (folder / "job.yaml").write_text(json.dumps({"model": "llama-3-70b", "cluster": "cluster.yaml", "global_batch_size": 128,
                                                 "seq_length": 8192, "framework": "torchtitan"}))
    out = folder / "out"
    result = CliRunner().invoke(app, ["plan", str(folder / "job.yaml"), "--top-k", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "plan.json").read_text())["plans"][0]


def test_the_plan_loads_in_torchtitans_config_manager(llama70b_plan):
    out, plan = llama70b_plan
    p, stages = plan["parallel"], plan["stages"]
    config = ConfigManager().parse_args(["--job.config_file", str(out / "job.toml")])
    tt = config.parallelism
    assert (config.model.name, config.model.flavor) == ("llama3", "70B")
    degrees = (tt.data_parallel_replicate_degree, tt.data_parallel_shard_degree, tt.context_parallel_degree,
               tt.tensor_parallel_degree, tt.pipeline_parallel_degree)
    assert degrees == (p["dp"] // max(1, p["fsdp"]), max(1, p["fsdp"]), p["cp"], p["tp"], p["pp"])
    assert tt.fsdp_reshard_after_forward == ("always" if p["reshard_after_forward"] else "never")
    assert config.compile.enable and config.activation_checkpoint.mode == p["recompute"]
    # torchtitan's train.py: accumulation steps = global / (local x dp), each
    # local batch split into micro batches of pipeline_parallel_microbatch_size.
    training = config.training
    accumulation = training.global_batch_size // (training.local_batch_size * p["dp"])
    assert accumulation * training.local_batch_size * p["dp"] == p["global_batch_size"]
    per_pipeline = training.local_batch_size // tt.pipeline_parallel_microbatch_size if p["pp"] > 1 else 1
    assert accumulation * per_pipeline == p["global_batch_size"] // (p["micro_batch_size"] * p["dp"])
    if p["pp"] > 1:
        assert tt.pipeline_parallel_microbatch_size == p["micro_batch_size"]
        parts = tt.module_fqns_per_model_part
        assert len(parts) == p["pp"] * p["vpp"]
        layers = [[int(name.split(".")[1]) for name in part if name.startswith("layers.")] for part in parts]
        # Part v * pp + s is chunk v of stage s: its layers are loom's.
        for s, stage in enumerate(stages):
            for v, (first, last) in enumerate(stage["layer_ranges"]):
                assert layers[v * p["pp"] + s] == list(range(first, last))
        module = importlib.import_module("torchtitan.models.llama3")
        with torch.device("meta"):
            model = module.Transformer(module.llama3_args["70B"])
        names = {name for name, _ in model.named_modules()}
        assert {name for part in parts for name in part} <= names


def test_train_sh_runs_torchtitan_with_the_toml(llama70b_plan, tmp_path):
    out, plan = llama70b_plan
    install(tmp_path, "torchrun", RECORDER.format(python=__import__("sys").executable))
    (tmp_path / "train.sh").write_text((out / "train.sh").read_text())
    subprocess.run(["bash", str(tmp_path / "train.sh")], env=clean_env(tmp_path, LOOM_NODE_INDEX="0", MASTER_ADDR="node0"), check=True)
    [got] = captures(tmp_path)
    argv = got["argv"]
    assert argv[argv.index("-m") + 1] == "torchtitan.train"
    assert argv[argv.index("--job.config_file") + 1].endswith("/job.toml")


def _torchtitan_groups(layout: Layout) -> dict[str, list[tuple[int, ...]]]:
    """The groups torchtitan's ParallelDims.build_mesh gives each rank, by
    loom's names: every rank's tp, fsdp (loom's shard), dp_replicate, cp and pp mesh."""
    names = {"tp": "tp", "shard": "fsdp", "replicate": "dp_replicate", "cp": "cp", "pp": "pp"}
    degrees = dict(dp_replicate=layout.dp // layout.fsdp, dp_shard=layout.fsdp, cp=layout.cp, tp=layout.tp, pp=layout.pp, ep=1, etp=1)
    groups: dict[str, set[tuple[int, ...]]] = {name: set() for name in names}
    for rank in range(layout.world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world_size)
        try:
            dims = ParallelDims(**degrees, world_size=layout.world_size)
            dims.build_mesh()
            for ours, theirs in names.items():
                groups[ours].add(tuple(dims.get_mesh(theirs).mesh.flatten().tolist()) if dims.get_mesh(theirs) is not None else (rank,))
        finally:
            dist.destroy_process_group()
    return {name: sorted(found) for name, found in groups.items()}


@pytest.mark.parametrize("seed", [1, 2])
def test_launched_ranks_form_the_groups_loom_priced(tmp_path, seed):
    """HSDP (2 replicas of 2 shards) x CP2 x TP2 x PP2 on 4 hosts in a
    permuted order: each rank starts on its planned GPU, and the groups
    torchtitan forms from those ranks are, GPU for GPU, the ones loom priced."""
    job = Job(model=load_model("llama-3-8b"), cluster=cluster(4), global_batch_size=16, seq_length=8192, framework="torchtitan")
    layout = Layout(tp=2, pp=2, dp=4, cp=2, micro_batch_size=1, global_batch_size=16, sequence_parallel=True, fsdp=2,
                    reshard_after_forward=False)
    placement = permuted_placement(job, layout, 8, seed)
    files = launch_files(job, layout, uniform_stages(job.model, layout), placement)
    install(tmp_path, "torchrun", RECORDER.format(python=__import__("sys").executable))
    (tmp_path / "train.sh").write_text(files["train.sh"])
    hosts = sorted(dict.fromkeys(host for host, _ in placement.gpus))
    runs = []
    for host in hosts:
        subprocess.run(["bash", str(tmp_path / "train.sh")], env=clean_env(tmp_path, LOOM_HOST=host), check=True)
        [got] = captures(tmp_path)
        runs.append((host, got))
    launched = torchrun_placement(runs, layout.world_size)
    assert launched == list(placement.gpus)
    ours = rank_groups(layout)
    for name, theirs in _torchtitan_groups(layout).items():
        priced = {tuple(placement.gpus[r] for r in group) for group in ours[name].tolist()}
        assert {tuple(launched[r] for r in group) for group in theirs} == priced, name


@pytest.mark.parametrize("flags, field", [
    (["--recompute", "selective", "--recompute-modules", "core_attn"], "--recompute-modules"),  # its selective AC is per op
    (["--tp", "2", "--fsdp", "0"], "--fsdp"),  # its DDP is 1-D only
    (["--model", "qwen3-8b", "--pp", "2"], "--pp"),  # qwen3 has no pipelining_fn
    (["--model", "mistral-7b"], "framework"),  # not a registered model
    (["--zero-stage", "1"], "--zero-stage"),
    (["--distributed-optimizer"], "--distributed-optimizer"),
    (["--tp", "2", "--dp", "4", "--fsdp", "1"], "--fsdp"),  # one shard per replica is DDP, which is 1-D only
    (["--cp", "2", "--fsdp", "0"], "--fsdp"),  # torchtitan shards over CP ranks
    (["--pp", "2", "--reshard-after-forward"], "--reshard-after-forward"),  # its pipeline keeps the stage gathered
    (["--model", "deepseek-v2-lite", "--cp", "2", "--ep", "8"], "--cp"),  # FlexAttention: no CP
    (["--framework", "megatron", "--stack", "torchtitan"], "--stack"),  # a torchtitan stack's loss on Megatron
])
def test_what_torchtitan_cannot_run_is_bad_input(tmp_path, flags, field):
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                       "nics_per_node": 8, "nic_Gbps": 400}))
    (tmp_path / "job.yaml").write_text(json.dumps({"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 64,
                                                   "seq_length": 4096, "framework": "torchtitan"}))
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "job.yaml"), *flags])
    assert result.exit_code == 2, result.output
    assert field in result.output.replace("\n", "")


def test_files_of_a_past_stack_are_refused(tmp_path):
    """torchtitan-2412 prices FlashAttention-2; 0.2.2 would run cuDNN's: no files for it."""
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                       "nics_per_node": 8, "nic_Gbps": 400}))
    (tmp_path / "job.yaml").write_text(json.dumps({"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 64,
                                                   "seq_length": 4096, "framework": "torchtitan", "stack": "torchtitan-2412"}))
    runner = CliRunner()
    assert runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--recompute", "full"]).exit_code == 0
    result = runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--recompute", "full", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "stack" in result.output
    assert not (tmp_path / "out").exists()


def test_hsdp_shards_experts_within_a_replica_only():
    """torchtitan's experts are sharded over efsdp = fsdp x cp x tp / ep of
    one replica (parallel_dims.py) and replicated across replicas."""
    job = Job(model=load_model("qwen3-30b-a3b"), cluster=cluster(4), global_batch_size=32, seq_length=4096, framework="torchtitan",
              stack="torchtitan", features=stack_features("torchtitan", Features()))
    hsdp = Layout(tp=1, pp=1, dp=32, cp=1, ep=4, micro_batch_size=1, global_batch_size=32, recompute="full", fsdp=8)
    full = Layout(tp=1, pp=1, dp=32, cp=1, ep=4, micro_batch_size=1, global_batch_size=32, recompute="full", fsdp=32)
    assert (hsdp.expert_shards, full.expert_shards) == (2, 8)
    experts = {layout.fsdp: evaluate(job, layout).memory[0].breakdown_bytes["optimizer_states"] for layout in (hsdp, full)}
    assert experts[8] > 3 * experts[32]  # mostly expert state: 4x the share per rank


def test_torchtitans_ddp_reduces_every_micro_batch():
    """torchtitan's train loop runs no no_sync: DDP all-reduces per micro
    batch. Nothing is sharded, so the breakdown shows it as data
    parallelism's gradient reduce, not sharding's."""
    times = {}
    for batch in (8, 32):
        job = Job(model=load_model("llama-3-8b"), cluster=cluster(1), global_batch_size=batch, seq_length=4096, framework="torchtitan",
                  stack="torchtitan", features=stack_features("torchtitan", Features()))
        step = evaluate(job, Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=batch, recompute="full")).step
        assert step.breakdown_s["sharding_comm"] == 0.0
        assert sum(step.breakdown_s.values()) == pytest.approx(step.step_time_s)
        times[batch] = step.breakdown_s["dp_grad_reduce"]
    assert times[8] > 0 and times[32] == pytest.approx(4 * times[8])


def test_async_tp_leaves_the_backward_reduce_scatters_of_summed_gradients_exposed():
    """torch's micro-pipeline TP fuses a reduce-scatter only with the one
    matmul that produces it; backward, the input gradients of wq/wk/wv and
    of w1/w3 are summed first, so those two reduce-scatters per layer stay
    exposed (a quarter of the four per layer, forward and backward, with no
    recompute), where TE's overlap on Megatron hides them all behind GEMMs."""
    tp_s = {}
    for framework, overlap in (("torchtitan", False), ("torchtitan", True), ("megatron", True)):
        job = Job(model=load_model("llama-3-70b"), cluster=cluster(4), global_batch_size=8, seq_length=8192, framework=framework,
                  features=stack_features({"torchtitan": "torchtitan", "megatron": "megatron-lm"}[framework], Features(tp_comm_overlap=overlap)))
        layout = Layout(tp=8, pp=1, dp=4, cp=1, micro_batch_size=1, global_batch_size=8, sequence_parallel=True,
                        fsdp=4 if framework == "torchtitan" else 0)
        tp_s[framework, overlap] = evaluate(job, layout).step.breakdown_s.get("tp_comm", 0.0)
    assert tp_s["torchtitan", True] == pytest.approx(tp_s["torchtitan", False] / 4, rel=0.05)
    assert tp_s["megatron", True] < tp_s["torchtitan", True] / 4


def _cp_s(framework: str, stack: str, cp: int, local_seq: int = 16384) -> float:
    job = Job(model=load_model("llama-3-8b"), cluster=cluster(1), global_batch_size=8 // cp, seq_length=local_seq * cp,
              framework=framework, stack=stack, features=stack_features(stack, Features()))
    layout = Layout(tp=1, pp=1, dp=8 // cp, cp=cp, micro_batch_size=1, global_batch_size=8 // cp, recompute="full",
                    fsdp=8 // cp if framework == "torchtitan" else 0, distributed_optimizer=framework == "megatron")
    return evaluate(job, layout).step.breakdown_s.get("cp_comm", 0.0)


def test_torchs_ring_attention_costs_grow_with_the_ring():
    """PyTorch's CP gathers K and V once per call behind the first block
    only, passes fp32 dK/dV around the ring and merges each step in fp32:
    at a fixed local sequence its cost grows with cp; torchtitan of 2024-12
    repeated K and V to every head first (4x the bytes for Llama-3 8B);
    Megatron's TE ring overlaps each step's transfer with a block."""
    titan = {cp: _cp_s("torchtitan", "torchtitan", cp) for cp in (2, 4, 8)}
    assert 0 < titan[2] < titan[4] < titan[8]
    assert _cp_s("torchtitan", "torchtitan-2412", 8) > titan[8]
    assert _cp_s("megatron", "megatron-lm", 8) < titan[8] / 4


@pytest.mark.parametrize("feature, value", [("repeat_kv", True), ("pipeline_keeps_outputs", True), ("fused_optimizer", False)])
def test_torchtitans_own_features_are_refused_under_megatron(tmp_path, feature, value):
    """K and V repeated before attention, pipeline outputs kept to the next
    step and foreach AdamW are torchtitan's; a Megatron job setting one is bad input."""
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                       "nics_per_node": 8, "nic_Gbps": 400}))
    (tmp_path / "job.yaml").write_text(json.dumps({"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 64,
                                                   "seq_length": 4096, "features": {feature: value}}))
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2 and f"features.{feature}" in result.output, result.output


def test_per_op_checkpointing_keeps_what_torchtitans_policy_saves():
    """torchtitan's own Llama block under its own per-op policy
    (_apply_op_sac with _op_sac_save_list, plus the CPU flavour of the
    flash-attention op it lists): the tensors alive after forward, bar the
    block's input and output and the weights, are what loom's op_sac_layer
    counts beside the block's input (wq, wv, w1, w2 outputs; the attention
    output and its log-sum-exp)."""
    import gc
    from torchtitan.config.job_config import ActivationCheckpoint
    from torchtitan.distributed.activation_checkpoint import _apply_op_sac
    from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import TransformerBlock, precompute_freqs_cis

    from loom.planner.cost.activations import op_sac_layer
    from loom.planner.cost.shape import Shape
    from loom.planner.specs.model import ModelSpec

    seq, batch = 256, 2
    args = TransformerModelArgs(dim=512, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=1024, multiple_of=64, max_seq_len=seq)
    block = TransformerBlock(0, args)
    with torch.no_grad():
        block.init_weights()
    block = block.to(torch.bfloat16)
    save_list = set(_op_sac_save_list) | {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}
    checkpointed = _apply_op_sac(block, ActivationCheckpoint(mode="selective", selective_ac_option="op"), base_fqn="layers.0",
                                 op_sac_save_list=save_list)
    x = torch.randn(batch, seq, args.dim, dtype=torch.bfloat16, requires_grad=True)
    freqs = precompute_freqs_cis(args.dim // args.n_heads, seq, args.rope_theta)
    out = checkpointed(x, freqs, None)
    gc.collect()
    known = {t.untyped_storage().data_ptr() for t in (*block.parameters(), x, out, freqs)}
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in gc.get_objects()
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in known}
    ffn = block.feed_forward.w1.weight.shape[0]
    model = ModelSpec(name="tiny", num_layers=1, hidden_size=args.dim, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=ffn,
                      vocab_size=1024, max_position_embeddings=seq, gated_mlp=True, tied_embeddings=False,
                      learned_position_embeddings=False, linear_bias=False, qkv_bias=False, normalization="RMSNorm", dropout=0.0)
    layout = Layout(tp=1, pp=1, dp=1, cp=1, micro_batch_size=batch, global_batch_size=batch, recompute="selective", recompute_modules=("op",))
    shape = Shape.of(model, layout, seq, "bf16", Features())
    block_input = 2 * batch * seq * args.dim
    assert sum(held.values()) == pytest.approx(op_sac_layer(shape) - block_input, rel=0.01)
    out.float().sum().backward()  # the policy's block still runs backward


def test_selective_recompute_is_per_op_checkpointing(tmp_path):
    """--recompute selective on torchtitan writes its per-op policy, which its
    config manager loads, and costs between no and full recomputation."""
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                       "nics_per_node": 8, "nic_Gbps": 400}))
    (tmp_path / "job.yaml").write_text(json.dumps({"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 16,
                                                   "seq_length": 4096, "framework": "torchtitan"}))
    figures = {}
    for recompute in ("none", "selective", "full"):
        out = tmp_path / recompute
        result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--mbs", "2", "--recompute", recompute,
                                          "--out", str(out), "--json"])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)["plans"][0]
        figures[recompute] = (plan["predicted"]["step_time_s"], plan["memory"]["peak_bytes_per_gpu"])
        if recompute == "selective":
            assert "sel:op" in plan["label"]
            config = ConfigManager().parse_args(["--job.config_file", str(out / "job.toml")])
            assert (config.activation_checkpoint.mode, config.activation_checkpoint.selective_ac_option) == ("selective", "op")
    assert figures["none"][0] < figures["selective"][0] < figures["full"][0]
    assert figures["none"][1] > figures["selective"][1] > figures["full"][1]


def test_the_search_tries_per_op_checkpointing():
    """Llama-3 70B on 32 H100 at 8K: fully recomputing every block is not
    the best torchtitan can do; per-op checkpointing with CP or TP is."""
    from loom.planner.search.layouts import search

    job = Job(model=load_model("llama-3-70b"), cluster=cluster(4), global_batch_size=64, seq_length=8192, framework="torchtitan",
              stack="torchtitan", features=stack_features("torchtitan", Features()))
    plans = search(job, top_k=5).plans
    selective = [plan for plan in plans if plan.layout.recompute == "selective"]
    assert selective and all(plan.layout.recompute_modules == ("op",) for plan in selective)
    assert plans[0].step_time_s <= min(plan.step_time_s for plan in plans if plan.layout.recompute == "full")


def test_repeated_kv_heads_are_saved_for_backward():
    layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8, fsdp=8)
    memory = {}
    for repeat in (False, True):
        job = Job(model=load_model("llama-3-8b"), cluster=cluster(1), global_batch_size=8, seq_length=4096, framework="torchtitan",
                  stack="torchtitan", features=stack_features("torchtitan", Features(repeat_kv=repeat)))
        memory[repeat] = evaluate(job, layout).memory[0].breakdown_bytes["activations"]
    # K and V of 8 heads become 32 heads' worth: 2 x (4096 - 1024) x 2 bytes per token per layer.
    assert memory[True] - memory[False] == pytest.approx(32 * 4096 * 2 * 3072 * 2, rel=0.01)


def _tp_pipeline_memory(stack: str, microbatches: int) -> list[dict[str, float]]:
    """Each stage's memory terms of Llama-3 8B under torchtitan, TP2 PP4 SP and FSDP2 on two nodes (without FSDP torchtitan
    runs TP and PP in float32), ``microbatches`` per pipeline."""
    job = Job(model=load_model("llama-3-8b"), cluster=cluster(2), global_batch_size=2 * microbatches, seq_length=4096, framework="torchtitan",
              stack=stack, features=stack_features(stack, Features()))
    layout = Layout(tp=2, pp=4, dp=2, cp=1, micro_batch_size=1, global_batch_size=2 * microbatches, sequence_parallel=True, recompute="full",
                    reshard_after_forward=False, fsdp=2)
    return [memory.breakdown_bytes for memory in evaluate(job, layout).memory]


def test_torchs_pipeline_keeps_a_receive_buffer_per_micro_batch():
    """torch.distributed.pipelining allocates an activation and a gradient
    receive buffer per micro batch and keeps them: a middle stage holds two
    more [mbs, seq / tp, hidden] 16-bit buffers per micro batch, the first
    stage (no activations to receive) one; Megatron's pipeline none."""
    boundary = 2 * 4096 / 2 * 4096
    fewer, more = _tp_pipeline_memory("torchtitan", 8), _tp_pipeline_memory("torchtitan", 12)
    assert more[1]["pipeline_buffers"] - fewer[1]["pipeline_buffers"] == pytest.approx(4 * 2 * boundary)
    assert more[0]["pipeline_buffers"] - fewer[0]["pipeline_buffers"] == pytest.approx(4 * boundary)
    megatron = Job(model=load_model("llama-3-8b"), cluster=cluster(1), global_batch_size=8, seq_length=4096)
    layout = Layout(tp=2, pp=4, dp=1, cp=1, micro_batch_size=1, global_batch_size=8, sequence_parallel=True, recompute="full")
    assert all(memory.breakdown_bytes["pipeline_buffers"] == 0 for memory in evaluate(megatron, layout).memory)


def test_torch_2_6_pipelines_keep_every_micro_batchs_logits():
    """torchtitan 9dec370's torch kept each micro batch's stage output until
    the next step (output_chunks): its last stage holds all m micro batches'
    16-bit logits, today's only the one in flight."""
    logits = 2 * 4096 * 128_256 / 2
    kept, today = _tp_pipeline_memory("torchtitan-2412", 8)[-1], _tp_pipeline_memory("torchtitan", 8)[-1]
    assert kept["pipeline_buffers"] - today["pipeline_buffers"] == pytest.approx(7 * logits)


def test_loss_parallel_holds_three_fp32_logit_tensors_in_backward():
    """Under TP torchtitan's loss is DTensor's loss_parallel, whose backward
    holds zeros_like(x), exp(x), their sum and product beside x: 12 bytes
    per local logit beyond the saved ones, where ATen's cross_entropy holds 8.
    Its output layer also keeps its all-gathered input."""
    from loom.planner.cost.activations import dtensor_head_input_bytes, head_transient
    from loom.planner.cost.shape import Shape

    model, features = load_model("llama-3-8b"), stack_features("torchtitan", Features())
    local_logits = 4096 * model.vocab_size / 2
    sharded = Shape(model, tp=2, cp=1, micro_batch_size=1, sequence_parallel=True, seq_length=4096, precision="bf16", features=features)
    whole = Shape(model, tp=1, cp=1, micro_batch_size=1, sequence_parallel=False, seq_length=4096, precision="bf16", features=features)
    assert head_transient(sharded) == pytest.approx(12 * local_logits) and head_transient(whole) == pytest.approx(8 * 2 * local_logits)
    assert dtensor_head_input_bytes(sharded) == pytest.approx(2 * 4096 * model.hidden_size / 2) and dtensor_head_input_bytes(whole) == 0


def _fsdp8_step(**features) -> dict[str, float]:
    """Llama-3 8B under torchtitan's FSDP on 8 GPUs, one micro batch: its step's parts."""
    job = Job(model=load_model("llama-3-8b"), cluster=cluster(1), global_batch_size=8, seq_length=4096, framework="torchtitan",
              stack="torchtitan", features=stack_features("torchtitan", Features(**features)))
    layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8, fsdp=8)
    return evaluate(job, layout).step.breakdown_s


def test_fsdp2_copies_its_collectives_buffers_on_the_compute_stream(monkeypatch):
    """Per micro batch FSDP2 copies each unit's gathered weights out of the
    all-gather buffer (twice when resharded after forward) and its gradients
    into the reduce-scatter input, on the compute stream: 2 x (2 + 2) B of
    bf16 weights and 2 + 4 B into the fp32 reduce per parameter, priced as
    HBM passes beside what the collectives expose."""
    from loom.planner.cost.efficiency import memory_time_s
    from loom.profiles.catalogue import find_gpu

    from loom.planner.cost import sharding

    params = load_model("llama-3-8b").total_params()
    with_copies = _fsdp8_step()["sharding_comm"]
    monkeypatch.setattr(sharding, "fsdp2_copy_bytes", lambda *args: 0.0)
    copies = memory_time_s(params * (2 * 2 * 2 + 2 + 4), find_gpu("H100"))
    assert with_copies - _fsdp8_step()["sharding_comm"] == pytest.approx(copies, rel=0.02) and copies > 0.01


def test_foreach_adamw_makes_a_pass_per_op():
    """torchtitan 9dec370 stepped AdamW with foreach kernels, one HBM pass per
    op (96 B per parameter with the clipping), today's fused kernel one (40 B)."""
    fused, foreach = _fsdp8_step()["optimizer"], _fsdp8_step(fused_optimizer=False)["optimizer"]
    assert foreach / fused == pytest.approx(96 / 40)


# --- what torchtitan 0.2.2 (on torch 2.13) refuses or ignores (fresh-user review, 2026-11-30) ---

from loom.planner.specs.errors import SpecError  # noqa: E402
from loom.planner.specs.job import check_job  # noqa: E402
from loom.planner.specs.rules import layout_problems  # noqa: E402
from conftest import make_cluster  # noqa: E402


def _titan(model: str = "llama-3-8b", nodes: int = 2, batch: int = 64, seq: int = 4096, gpu: str = "H100", **kwargs) -> Job:
    features = kwargs.pop("features", Features())
    return Job(model=load_model(model), cluster=make_cluster(nodes, gpu=gpu), global_batch_size=batch, seq_length=seq, framework="torchtitan",
               stack="torchtitan", features=stack_features("torchtitan", features), **kwargs)


def _fields(job: Job, layout: Layout) -> set[str]:
    return {field for field, _, _ in layout_problems(job, layout)}


def test_layouts_torchtitan_refuses_or_runs_in_float32_are_refused():
    job = _titan()
    # TP and PP without FSDP or CP: maybe_enable_amp leaves the run in float32.
    assert "dp" in _fields(job, Layout(tp=8, pp=2, dp=1, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True))
    # parallelize_fn: seq_len % (tp x 2cp) == 0.
    odd = _titan(seq=8196)
    assert "seq_length" in _fields(odd, Layout(tp=2, pp=1, dp=4, cp=2, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, fsdp=4))
    # Schedule1F1B: at least one micro batch per stage.
    short = _titan(batch=8)
    assert "global_batch_size" in _fields(short, Layout(tp=1, pp=4, dp=4, cp=1, micro_batch_size=1, global_batch_size=8, fsdp=4,
                                                        reshard_after_forward=False))
    # MXLinearConverter: no TP under torch.compile.
    mx = _titan(gpu="B200", precision="fp8", features=Features(fp8_recipe="mxfp8"))
    assert "tp" in _fields(mx, Layout(tp=2, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, fsdp=8))


def test_deepep_only_where_torchtitan_reads_it():
    """Only torchtitan's deepseek_v3 reads expert_parallel_comm_backend."""
    with pytest.raises(SpecError, match="moe_token_dispatcher"):
        check_job(_titan("qwen3-30b-a3b", features=Features(moe_token_dispatcher="deepep")))
    check_job(_titan("deepseek-v2-lite", features=Features(moe_token_dispatcher="deepep")))


def test_torchtitans_deepseek_v3_has_no_multi_token_prediction():
    v3 = load_model("deepseek-v3")
    assert v3.mtp_layers == 1
    assert _titan("deepseek-v3", nodes=128).model.mtp_layers == 0


def test_torchtitan_float8_leaves_the_experts_in_bf16():
    """Its float8 converter quantizes nn.Linear; the routed experts are GroupedExperts parameters."""
    lay = Layout(tp=1, pp=1, dp=16, cp=1, ep=8, micro_batch_size=2, global_batch_size=64, fsdp=16)
    titan = evaluate(_titan("deepseek-v2-lite", precision="fp8"), lay)
    everything = replace(titan.job, framework="megatron", stack="megatron-lm",
                         features=Features(**{**titan.job.features.model_dump(), "quantized_experts": True}))
    from loom.planner.cost.compute import routed_experts
    from loom.planner.cost.layers import shape_of
    gpu = titan.job.cluster.nodes[0].gpu
    assert routed_experts(shape_of(titan.job, lay), gpu).gemm_s > routed_experts(shape_of(everything, lay), gpu).gemm_s
    with pytest.raises(SpecError, match="quantized_experts"):
        check_job(_titan("deepseek-v2-lite", precision="fp8", features=Features(quantized_experts=True)))


def test_torchtitans_gpt_oss_runs_no_async_tp():
    with pytest.raises(SpecError, match="tp_comm_overlap"):
        check_job(_titan("gpt-oss-20b", features=Features(tp_comm_overlap=True)))


def test_float8_gathers_only_over_a_shard_degree_above_1():
    """torchtitan turns on FSDP's float8 all-gather only when
    data_parallel_shard_degree > 1 (float8.py): with one shard (FSDP over the
    CP ranks) the TOML says false and the gathers are priced in bf16."""
    job = _titan("llama-3-70b", nodes=4, precision="fp8", features=Features(fp8_param_gather=True))
    plain = _titan("llama-3-70b", nodes=4, precision="fp8", features=Features(fp8_param_gather=False))
    for fsdp, gathered in ((1, False), (2, True)):
        layout = Layout(tp=4, pp=1, dp=fsdp, cp=4, micro_batch_size=1, global_batch_size=64, fsdp=fsdp, recompute="full", sequence_parallel=True)
        toml = tomllib.loads(job_toml(job, layout, uniform_stages(job.model, layout)))
        assert toml["quantize"]["linear"]["float8"]["enable_fsdp_float8_all_gather"] is gathered
        same = evaluate(job, layout).step_time_s == pytest.approx(evaluate(plain, layout).step_time_s)
        assert same is not gathered


def test_layout_refusals_name_the_field_at_fault():
    """The field a user must change, not one that already holds: torchtitan's
    TP without FSDP is fsdp's fault when there are replicas to shard over."""
    job = _titan("llama-3-70b", nodes=8)
    no_fsdp = Layout(tp=8, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=0, recompute="full", sequence_parallel=True)
    assert "fsdp" in _fields(job, no_fsdp) and "dp" not in _fields(job, no_fsdp)
    alone = Layout(tp=8, pp=8, dp=1, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=0, recompute="full", sequence_parallel=True)
    assert "dp" in _fields(job, alone)
    megatron = replace(job, framework="megatron", stack="megatron-lm", features=Features(optimizer_states="bf16"))
    sharded = Layout(tp=8, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=8, distributed_optimizer=True,
                     sequence_parallel=True)
    assert "fsdp" in _fields(megatron, sharded) and "distributed_optimizer" not in _fields(megatron, sharded)
    deepspeed = replace(job, framework="deepspeed", stack="megatron-lm", features=Features())
    zero1 = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=64, zero_stage=1)
    assert any(field == "fsdp" and "ZeRO-3's weight sharding" in expected for field, expected, _ in layout_problems(deepspeed, zero1))
