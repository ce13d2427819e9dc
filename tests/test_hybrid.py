"""Hybrid Mamba-2 / attention models (issue #16): Nemotron-H, Nemotron Nano 2
and Nemotron 3 read from their configs with the published parameter counts,
priced layer kind by layer kind, their Megatron flags through megatron-core's
TransformerConfig and hybrid layer allocation, and what Megatron's
MambaStack cannot run refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.cost import activations, compute
from loom.planner.cost.layers import shape_of
from loom.planner.cost.network import Links
from loom.planner.cost.time_model import chunk_time
from loom.planner.output.megatron import megatron_args
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model, model_from_hf_config
from loom.planner.specs.rules import layout_problems
from loom.planner.specs.stages import Chunk, uniform_stages
from loom.profiles.catalogue import model_config_path

FAMILIES = Path(__file__).parent / "data" / "decoder_families"
runner = CliRunner()
CLUSTER = {"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}


def _job(model: str, **fields) -> Job:
    return Job(model=load_model(model), cluster=parse_cluster(CLUSTER, "t"), global_batch_size=64, seq_length=8192, **fields)


def _layout(**fields) -> Layout:
    base = dict(tp=2, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, distributed_optimizer=True)
    return Layout(**{**base, **fields})


# (config, published total parameters, the figure's last digit's unit,
# published active parameters or None): NVIDIA-Nemotron-Nano-12B-v2-Base's
# model card, "12.31B"; Nemotron 3 Nano 30B-A3B's card, 31.6B total and 3.2B
# active without the input embedding; Nemotron-H 8B and 56B's cards, "8B"
# and "56B model parameters". A count matches when it rounds to the figure.
PUBLISHED = {
    "nano-12b-v2": (str(FAMILIES / "nemotron-nano-12b-v2-base.json"), 12.31e9, 0.01e9, None),
    "nemotron-3-nano": ("nemotron-3-nano-30b-a3b", 31.6e9, 0.1e9, 3.2e9),
    "nemotron-h-8b": ("nemotron-h-8b", 8e9, 1e9, None),
    "nemotron-h-56b": ("nemotron-h-56b", 56e9, 1e9, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_model_cards(name):
    config, total, unit, active = PUBLISHED[name]
    model = load_model(config)
    assert abs(model.total_params() - total) <= unit / 2
    if active:
        assert abs(model.active_params(input_embedding=False) - active) <= unit / 2


def test_the_pattern_lays_out_the_layers():
    """Nemotron-H 8B: 24 Mamba, 4 attention and 24 MLP layers in
    hybrid_override_pattern's order; Nemotron 3 Nano's E layers are its MoE layers."""
    model = load_model("nemotron-h-8b")
    assert dict(model.layer_kinds_in(0, model.num_layers)) == {"mamba": 24, "attention": 4, "mlp": 24}
    assert [model.layer_kind(i) for i in range(5)] == ["mamba", "mlp", "mamba", "mlp", "mamba"]
    assert model.layer_kind(7) == "attention" and model.num_moe_layers == 0
    nano = load_model("nemotron-3-nano-30b-a3b")
    assert nano.num_moe_layers == 23 and nano.is_moe_layer(1) and not nano.is_moe_layer(0)
    # Squared-ReLU experts: an up and a down projection each, no gate.
    assert nano.moe.expert_params(nano.hidden_size) == 2 * nano.hidden_size * nano.moe.expert_ffn_hidden_size


def test_a_layers_block_type_config_reads_like_the_pattern():
    """Newer transformers write the layers as layers_block_type names."""
    config = json.loads(model_config_path("nemotron-h-8b").read_text())
    pattern = config.pop("hybrid_override_pattern")
    names = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    config["layers_block_type"] = [names[symbol] for symbol in pattern]
    assert model_from_hf_config(config, "x", "x.json").hybrid_pattern == pattern


@pytest.mark.parametrize("field, value, said", [
    ("hybrid_override_pattern", "M-M*/*E", "multi-token prediction"),
    ("hybrid_override_pattern", "M-X*", "megatron-core's hybrid layer symbols"),
    ("num_hidden_layers", 51, "52 layers"),
    ("mlp_hidden_act", "silu", "relu2"),
    ("moe_latent_size", 1024, "latent MoE"),
    ("mamba_num_heads", 100, "multiple of the 8 groups"),
    ("use_conv_bias", False, "conv1d has a bias"),
    ("routed_scaling_factor", "big", "a finite number"),
])
def test_what_loom_cannot_plan_is_refused_naming_the_field(field, value, said):
    base = "nemotron-3-nano-30b-a3b" if field == "routed_scaling_factor" else "nemotron-h-8b"
    config = {**json.loads(model_config_path(base).read_text()), field: value}
    with pytest.raises(SpecError) as error:
        model_from_hf_config(config, "x", "x.json")
    assert field in str(error.value) and said in str(error.value)


def test_each_layer_kind_is_priced_by_its_own_mechanism():
    """A chunk costs the sum of its layers by kind; a Mamba layer's kernels
    include the SSD scan's products, an MLP layer's none of the attention,
    and the Mamba layer keeps its projections for backward whatever the
    selective modules (none of megatron-core's recompute modules is a Mamba one)."""
    job, layout = _job("nemotron-h-8b"), _layout()
    shape = shape_of(job, layout)
    gpu = job.cluster.slowest.gpu
    mamba, mlp = compute.decoder_layer(shape, gpu, kind="mamba"), compute.decoder_layer(shape, gpu, kind="mlp")
    assert mamba.attention_s == 0 and mlp.attention_s == 0 and compute.decoder_layer(shape, gpu, kind="attention").attention_s > 0
    scan_flops = sum(2 * m * n * k * batch for m, n, k, batch in compute.ssd_gemms(shape, backward=False))
    mixer = job.model.mamba
    # Megatron-LM counts 7 x d_inner x state FLOPs per token for the scan (training.py mamba_layer_flops).
    assert scan_flops / shape.tokens == pytest.approx(7 * mixer.inner_size * mixer.state_size / layout.tp, rel=0.25)
    links = Links.of(job, layout)
    whole = chunk_time(shape, layout, Chunk(0, 10), gpu, links, job)
    parts = [chunk_time(shape, layout, Chunk(i, 1), gpu, links, job) for i in range(10)]
    assert whole.compute_fwd_s == pytest.approx(sum(part.compute_fwd_s for part in parts))
    none = activations.decoder_layer(shape, "none", "mamba")
    assert activations.decoder_layer(shape, "selective", "mamba", ("core_attn", "mlp")) == none
    assert activations.decoder_layer(shape, "full", "mamba") == shape.act_bytes * shape.tokens * shape.replicated_width
    saved = activations.layer_parts(shape, "mamba")
    assert saved["mamba_projections"] == shape.act_bytes * shape.tokens * mixer.in_proj_size / layout.tp


def test_context_parallelism_adds_the_mamba_all_to_alls():
    """All-to-alls of a rank's own tokens forward (z, x, B, C and dt to
    head shards, y back) and the same backward; an MLP layer has none."""
    from loom.planner.cost.collectives import all_to_all_s

    job = _job("nemotron-h-8b")
    layout = _layout(dp=4, cp=2)
    shape, gpu = shape_of(job, layout), job.cluster.slowest.gpu
    links = Links.of(job, layout)
    mamba_layer = chunk_time(shape, layout, Chunk(0, 1), gpu, links, job)
    mlp_layer = chunk_time(shape, layout, Chunk(1, 1), gpu, links, job)
    mixer = job.model.mamba
    widths = [mixer.inner_size, mixer.inner_size, mixer.num_groups * mixer.state_size, mixer.num_groups * mixer.state_size,
              mixer.num_heads, mixer.inner_size]
    assert sum(widths) == mixer.in_proj_size + mixer.inner_size  # z, x, B, C, dt in, y out
    one_pass = sum(all_to_all_s(shape.tokens * width / layout.tp * shape.act_bytes, layout.cp, links.cp) for width in widths)
    assert mamba_layer.cp_comm_s == pytest.approx(2 * one_pass) and mlp_layer.cp_comm_s == 0


def test_megatron_flags_build_megatron_cores_hybrid_config():
    """The flags give megatron-core's TransformerConfig the Mamba shapes, and
    its layer allocation the pattern loom priced."""
    import torch
    from megatron.core.activations import squared_relu
    from megatron.core.ssm.mamba_hybrid_layer_allocation import allocate_layers
    from megatron.core.transformer import TransformerConfig

    from test_emit_megatron import parse_flags

    job, layout = _job("nemotron-3-nano-30b-a3b"), _layout(tp=1, dp=16, ep=8, sequence_parallel=False)
    model = job.model
    flags = parse_flags(megatron_args(job, layout, uniform_stages(model, layout)))
    assert flags["position-embedding-type"] == "none" and "squared-relu" in flags and "is-hybrid-model" in flags
    module, name = flags["spec"]
    assert name in Path(importlib.util.find_spec(module).origin).read_text()  # the spec pretrain_mamba.py imports
    config = TransformerConfig(
        num_layers=int(flags["num-layers"]), hidden_size=int(flags["hidden-size"]), num_attention_heads=int(flags["num-attention-heads"]),
        num_query_groups=int(flags["num-query-groups"]), kv_channels=int(flags.get("kv-channels", 0)) or None,
        ffn_hidden_size=int(flags["ffn-hidden-size"]), normalization=flags["normalization"], add_bias_linear=False,
        activation_func=squared_relu, gated_linear_unit="swiglu" in flags, is_hybrid_model=True,
        mamba_num_heads=int(flags["mamba-num-heads"]), mamba_head_dim=int(flags["mamba-head-dim"]),
        mamba_state_dim=int(flags["mamba-state-dim"]), mamba_num_groups=int(flags["mamba-num-groups"]),
        num_moe_experts=int(flags["num-experts"]), moe_router_topk=int(flags["moe-router-topk"]),
        moe_ffn_hidden_size=int(flags["moe-ffn-hidden-size"]),
        moe_shared_expert_intermediate_size=int(flags["moe-shared-expert-intermediate-size"]),
        moe_router_score_function=flags["moe-router-score-function"], moe_router_enable_expert_bias="moe-router-enable-expert-bias" in flags,
        moe_router_topk_scaling_factor=float(flags["moe-router-topk-scaling-factor"]),
        expert_model_parallel_size=int(flags["expert-model-parallel-size"]),
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
    )
    assert config.mamba_num_heads * config.mamba_head_dim == model.mamba.inner_size
    assert config.mamba_state_dim == model.mamba.state_size and config.mamba_num_groups == model.mamba.num_groups
    assert config.moe_shared_expert_intermediate_size == model.moe.shared_ffn_hidden_size and not config.gated_linear_unit
    # Nemotron 3's router: sigmoid scores, a per-expert bias, weights scaled 2.5x (its routed_scaling_factor)
    assert config.moe_router_score_function == "sigmoid" and config.moe_router_enable_expert_bias
    assert config.moe_router_topk_scaling_factor == 2.5
    layers = allocate_layers(config.num_layers, 0.0, 0.0, flags["hybrid-override-pattern"])
    assert [{"M": "mamba", "*": "attention", "-": "mlp", "E": "moe_mlp"}[s] for s in layers] == \
        [model.layer_kind(i) for i in range(model.num_layers)]


@pytest.mark.parametrize("fields, field", [
    (dict(tp=16, dp=1), "tp"),  # 8 Mamba groups: TP 16 cannot split them
    (dict(pp=2, dp=4, vpp=2), "vpp"),  # MambaStack asserts no virtual stages
    (dict(pp=8, dp=1), "pp"),  # 52 layers do not split evenly over 8 stages
    (dict(recompute="full"), "recompute"),  # MambaStack has no checkpointed forward
    (dict(tp=8, dp=1, cp=32), "cp"),  # 16 heads per TP rank do not split over CP 32
    (dict(fsdp=8), "fsdp"),  # Megatron-FSDP shards TransformerLayer units, not Mamba layers
])
def test_what_megatrons_mamba_stack_cannot_run_is_refused(fields, field):
    job = Job(model=load_model("nemotron-h-8b"), cluster=parse_cluster({**CLUSTER, "nodes": 32}, "t"), global_batch_size=64,
              seq_length=8192)
    problems = layout_problems(job, _layout(**fields))
    assert field in [problem[0] for problem in problems], problems


def test_cp_that_replicates_the_groups_is_allowed():
    """CP 4 over TP 4's 2 groups per rank: MambaContextParallel replicates
    each group's state over 2 CP ranks (its group_repeat_count)."""
    job = Job(model=load_model("nemotron-h-8b"), cluster=parse_cluster({**CLUSTER, "nodes": 4}, "t"), global_batch_size=64,
              seq_length=8192)
    assert not [p for p in layout_problems(job, _layout(tp=4, dp=2, cp=4)) if p[0] == "cp"]


def test_plan_writes_a_pretrain_mamba_launch(tmp_path):
    def write(name: str, data: dict) -> Path:
        (tmp_path / name).write_text(yaml.safe_dump(data))
        return tmp_path / name

    job = write("job.yaml", {"model": "nemotron-h-8b", "cluster": "cluster.yaml", "global_batch_size": 64, "seq_length": 8192, "top_k": 2})
    write("cluster.yaml", {**CLUSTER, "nodes": 1})
    result = runner.invoke(app, ["plan", str(job), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    train = (tmp_path / "out" / "train.sh").read_text()
    assert "pretrain_mamba.py" in train and "--hybrid-override-pattern" in train and "--position-embedding-type none" in train
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["model_parameters"] == load_model("nemotron-h-8b").total_params()
    titan = write("titan.yaml", {**yaml.safe_load(job.read_text()), "framework": "torchtitan"})
    refused = runner.invoke(app, ["plan", str(titan)])
    assert refused.exit_code == 2 and "Mamba" in refused.output


@pytest.mark.parametrize("model, said", [("nemotron-h-8b", "Mamba layers"), (str(FAMILIES / "falcon-7b.json"), "parallel attention"),
                                         (str(FAMILIES / "olmo-2-7b.json"), "norms after each sublayer")])
def test_profile_layers_refuses_layers_it_does_not_build(tmp_path, model, said):
    """`loom profile layers` builds pre-norm sequential transformer blocks:
    it says so rather than measure a layer the model lacks."""
    result = runner.invoke(app, ["profile", "layers", model, "--out", str(tmp_path / "p.json"), "--device", "cpu", "--gpu", "H100"])
    assert result.exit_code == 2 and said in result.output and not (tmp_path / "p.json").exists()


def test_what_megatrons_mamba_mixer_fixes_is_refused():
    """MambaMixer's conv1d width and SSD chunk are megatron-core's defaults
    (4, 128): another config plans with DeepSpeed only; its mixer's
    activation is SiLU."""
    config = {**json.loads(model_config_path("nemotron-h-8b").read_text()), "chunk_size": 256}
    job = Job(model=model_from_hf_config(config, "x", "x.json"), cluster=parse_cluster(CLUSTER, "t"), global_batch_size=64, seq_length=8192)
    assert "model" in [problem[0] for problem in layout_problems(job, _layout())]
    with pytest.raises(SpecError, match="mamba_hidden_act"):
        model_from_hf_config({**config, "mamba_hidden_act": "gelu"}, "x", "x.json")
