"""Decoder families as data (issue #16): Qwen3, StarCoder2, Phi-3, InternLM2,
Qwen1.5/2-MoE and Nemotron-4 read from their public configs, their parameter counts
against the published ones, a plan through the CLI, and their Megatron flags
through megatron-core's TransformerConfig; OLMo-2, which Megatron-LM cannot
build, refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.output.megatron import megatron_args
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Features, Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.specs.stages import uniform_stages

DATA = Path(__file__).parent / "data"
FAMILIES = DATA / "decoder_families"
runner = CliRunner()

# model -> (config: a catalogue name or a file, published total parameters in
# billions). loom counts the input embedding and, when untied, the output
# layer as well (StarCoder2-7B ties them: one vocab x hidden matrix), as the
# Hugging Face checkpoints hold them.
PUBLISHED = {
    # Qwen3-8B model card: "Number of Parameters: 8.2B" (6.95B non-embedding).
    "qwen3-8b": ("qwen3-8b", 8.2),
    # StarCoder2-7B: the card's "7B" model; the Hub's safetensors count is 7.17B.
    "starcoder2-7b": (str(FAMILIES / "starcoder2-7b.json"), 7.17),
    # Phi-3-mini-4k-instruct card: "3.8B parameters", rounded; the Hub's
    # safetensors count is 3.82B (3,821,079,552, as keras-hub's preset records).
    "phi-3-mini-4k-instruct": (str(FAMILIES / "phi-3-mini-4k-instruct.json"), 3.82),
    # InternLM2-7B: the card's "7B" model; the Hub's safetensors count is 7.74B.
    "internlm2-7b": (str(FAMILIES / "internlm2-7b.json"), 7.74),
    # Qwen1.5-MoE-A2.7B card: "14.3B parameters in total and 2.7B activated".
    "qwen1.5-moe-a2.7b": (str(FAMILIES / "qwen1.5-moe-a2.7b.json"), 14.3),
    # Nemotron-4 15B (arXiv 2402.16819, Table 1): 12.5B non-embedding + 3.2B embedding parameters.
    "nemotron-4-15b": (str(FAMILIES / "nemotron-4-15b.json"), 12.5 + 3.2),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_model_cards(name):
    source, billions = PUBLISHED[name]
    model = load_model(source)
    assert model.name == name
    assert model.total_params() / 1e9 == pytest.approx(billions, rel=0.005)


def test_qwen1_5_moe_activates_its_published_share():
    # Qwen counts the input embedding among the active parameters.
    model = load_model(PUBLISHED["qwen1.5-moe-a2.7b"][0])
    assert model.active_params(input_embedding=True) / 1e9 == pytest.approx(2.7, rel=0.005)


def test_qwen3_8b_is_in_the_catalogue():
    # Non-embedding parameters, the card's 6.95B: every decoder layer and the final norm.
    model = load_model("qwen3-8b")
    assert (model.total_params() - 2 * model.embedding_params()) / 1e9 == pytest.approx(6.95, rel=0.005)


# name -> (head dim, qk norm, linear biases, qkv biases, gated MLP, normalization, tied, window)
READS = {
    "qwen3-8b": (128, True, False, False, True, "RMSNorm", False, None),
    "starcoder2-7b": (128, False, True, False, False, "LayerNorm", True, 4096),
    "phi-3-mini-4k-instruct": (96, False, False, False, True, "RMSNorm", False, 2047),
    "internlm2-7b": (128, False, False, False, True, "RMSNorm", False, None),
    "qwen1.5-moe-a2.7b": (128, False, False, True, True, "RMSNorm", False, None),
    "nemotron-4-15b": (128, False, False, False, False, "LayerNorm", False, None),
}


@pytest.mark.parametrize("name", sorted(READS))
def test_what_each_family_reads(name):
    m = load_model(PUBLISHED[name][0])
    got = (m.head_dim, m.qk_norm, m.linear_bias, m.qkv_bias, m.gated_mlp, m.normalization, m.tied_embeddings, m.sliding_window)
    assert got == READS[name]
    assert m.window_layers == ((True,) * m.num_layers if m.sliding_window else ())
    assert not m.learned_position_embeddings


def test_qwen2_moe_reads_its_gated_shared_expert():
    m = load_model(PUBLISHED["qwen1.5-moe-a2.7b"][0])
    moe = m.moe
    assert (moe.num_experts, moe.top_k, moe.expert_ffn_hidden_size, moe.shared_ffn_hidden_size) == (60, 4, 1408, 5632)
    assert moe.shared_gate and moe.pre_softmax and moe.first_dense_layers == 0 and m.num_moe_layers == 24
    assert m.kv_channels is None and m.dropout == 0.0


def test_qwen2_moe_dense_layers(tmp_path):
    config = json.loads(Path(PUBLISHED["qwen1.5-moe-a2.7b"][0]).read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, "mlp_only_layers": [0, 1]}))
    m = load_model(str(path))
    assert m.moe.first_dense_layers == 2 and m.ffn_hidden_size == 5632
    # Interleaved dense layers (decoder_sparse_step 2) are refused, not priced as another model.
    path.write_text(json.dumps({**config, "decoder_sparse_step": 2}))
    with pytest.raises(SpecError) as error:
        load_model(str(path))
    assert error.value.field == "decoder_sparse_step"  # the field that interleaves them


NEOX_20B = Path(__file__).parents[1] / "profiles" / "models" / "gpt-neox-20b.json"


@pytest.mark.parametrize("source, change, field", [
    (PUBLISHED["phi-3-mini-4k-instruct"][0], {"rope_scaling": {"type": "linear", "factor": 4.0}}, "rope_scaling"),
    (PUBLISHED["internlm2-7b"][0], {"bias": True}, "bias"),
    ("qwen3-8b", {"attention_bias": True}, "attention_bias"),
    (PUBLISHED["qwen1.5-moe-a2.7b"][0], {"use_sliding_window": True}, "use_sliding_window"),
    # Megatron builds (and loom prices) a GeLU for the plain-MLP families:
    # another activation would train a model the config does not describe.
    (PUBLISHED["starcoder2-7b"][0], {"hidden_act": "relu"}, "hidden_act"),
    (str(NEOX_20B), {"hidden_act": "silu"}, "hidden_act"),
    ("gpt3-175b", {"activation_function": "relu"}, "activation_function"),
    (str(NEOX_20B), {"attention_bias": False}, "attention_bias"),
])
def test_what_megatron_cannot_build_is_refused(tmp_path, source, change, field):
    base = Path(source) if source.endswith(".json") else Path(__file__).parents[1] / "profiles" / "models" / f"{source}.json"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(base.read_text()), **change}))
    with pytest.raises(SpecError) as error:
        load_model(str(path))
    assert error.value.field == field


# The flags each family's launch must carry (beside the common ones).
FLAGS = {
    "qwen3-8b": ["--qk-layernorm", "--swiglu", "--disable-bias-linear", "--num-query-groups 8"],
    "starcoder2-7b": ["--normalization LayerNorm", "--num-query-groups 4"],
    "phi-3-mini-4k-instruct": ["--swiglu", "--disable-bias-linear", "--window-size 2046,0", "--untie-embeddings-and-output-weights"],
    "internlm2-7b": ["--swiglu", "--disable-bias-linear", "--num-query-groups 8", "--rotary-base 1000000"],
    "qwen1.5-moe-a2.7b": ["--add-qkv-bias", "--num-experts 60", "--moe-router-topk 4", "--moe-ffn-hidden-size 1408",
                          "--moe-shared-expert-intermediate-size 5632", "--moe-shared-expert-gate", "--moe-router-pre-softmax"],
    "nemotron-4-15b": ["--squared-relu", "--apply-layernorm-1p", "--rotary-percent 0.5", "--disable-bias-linear",
                       "--untie-embeddings-and-output-weights", "--normalization LayerNorm", "--num-query-groups 8"],
}
ABSENT = {
    "qwen3-8b": ["--add-qkv-bias", "--window-size"],
    # its 4,096-key window at the job's 4,096 tokens masks nothing: no window is written
    "starcoder2-7b": ["--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--qk-layernorm", "--window-size"],
    "phi-3-mini-4k-instruct": ["--group-query-attention", "--kv-channels"],
    "internlm2-7b": ["--add-qkv-bias", "--window-size", "--kv-channels"],
    "qwen1.5-moe-a2.7b": ["--moe-layer-freq", "--group-query-attention"],
    "nemotron-4-15b": ["--swiglu", "--add-qkv-bias", "--qk-layernorm"],
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_loom_plan_writes_each_familys_launch(tmp_path, name):
    cluster = {"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    job = {"model": PUBLISHED[name][0], "cluster": "cluster.yaml", "global_batch_size": 64, "seq_length": 4096,
           "search": {"tp": [1, 2], "pp": [1, 2], "micro_batch_size": [1]}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = runner.invoke(app, ["plan", str(tmp_path / "job.yaml"), "--json", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["plans"]
    # the plan states the model's total and per-token parameters (issue #16)
    model = load_model(PUBLISHED[name][0])
    assert (report["model_parameters"], report["model_active_parameters"]) == (model.total_params(), model.active_params())
    assert report["model_active_parameters"] < report["model_parameters"] if model.moe else report["model_active_parameters"] == report["model_parameters"]
    train = (tmp_path / "out" / "train.sh").read_text()
    for flag in FLAGS[name]:
        assert flag in train, flag
    for flag in ABSENT[name]:
        assert flag not in train, flag


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_flags_build_megatron_cores_config(name):
    """The flags, mapped as Megatron-LM's arguments.py (core_v0.16.1) maps
    them, build megatron-core's TransformerConfig with loom's head dim, QK
    norm, biases, gating and window."""
    import torch
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.utils import is_layer_window_attention

    from test_emit_megatron import parse_flags

    spec = load_model(PUBLISHED[name][0])
    cluster = parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}, "t")
    job = Job(model=spec, cluster=cluster, global_batch_size=64, seq_length=8192)  # past every family's window: each is written
    ep = 4 if spec.moe else 1
    layout = Layout(tp=2, pp=1, dp=4, cp=1, ep=ep, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, distributed_optimizer=True)
    flags = parse_flags(megatron_args(job, layout, uniform_stages(spec, layout)))
    window = flags.get("window-size")
    moe = {}
    if "num-experts" in flags:
        moe = dict(num_moe_experts=int(flags["num-experts"]), moe_router_topk=int(flags["moe-router-topk"]),
                   moe_ffn_hidden_size=int(flags["moe-ffn-hidden-size"]), moe_grouped_gemm="moe-grouped-gemm" in flags,
                   moe_shared_expert_intermediate_size=int(flags["moe-shared-expert-intermediate-size"]),
                   moe_shared_expert_gate="moe-shared-expert-gate" in flags, moe_router_pre_softmax="moe-router-pre-softmax" in flags,
                   moe_token_dispatcher_type=flags["moe-token-dispatcher-type"],
                   expert_model_parallel_size=int(flags["expert-model-parallel-size"]),
                   expert_tensor_parallel_size=int(flags["expert-tensor-parallel-size"]))
    config = TransformerConfig(
        num_layers=int(flags["num-layers"]), hidden_size=int(flags["hidden-size"]), num_attention_heads=int(flags["num-attention-heads"]),
        num_query_groups=int(flags["num-query-groups"]) if "group-query-attention" in flags else None,
        kv_channels=int(flags["kv-channels"]) if "kv-channels" in flags else None, ffn_hidden_size=int(flags["ffn-hidden-size"]),
        normalization=flags["normalization"], layernorm_epsilon=float(flags["norm-epsilon"]), qk_layernorm="qk-layernorm" in flags,
        add_bias_linear="disable-bias-linear" not in flags, add_qkv_bias="add-qkv-bias" in flags,
        gated_linear_unit="swiglu" in flags,
        activation_func=F.silu if "swiglu" in flags else squared_relu if "squared-relu" in flags else F.gelu,
        layernorm_zero_centered_gamma="apply-layernorm-1p" in flags,
        window_size=tuple(int(i) for i in window.split(",")) if window else None,
        window_attn_skip_freq=eval(flags["window-attn-skip-freq"]) if window else None,
        hidden_dropout=float(flags["hidden-dropout"]), attention_dropout=float(flags["attention-dropout"]),
        tensor_model_parallel_size=layout.tp, sequence_parallel=True,
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, **moe,
    )
    assert config.kv_channels == spec.head_dim and config.num_query_groups == spec.num_query_groups
    assert config.qk_layernorm == spec.qk_norm and config.normalization == spec.normalization
    # megatron-core biases linear_qkv when add_bias_linear or add_qkv_bias (attention.py).
    assert config.add_bias_linear == spec.linear_bias and (config.add_bias_linear or config.add_qkv_bias) == (spec.qkv_bias or spec.linear_bias)
    assert config.gated_linear_unit == spec.gated_mlp
    assert (config.activation_func is squared_relu) == spec.squared_relu and config.layernorm_zero_centered_gamma == spec.layernorm_1p
    assert ("untie-embeddings-and-output-weights" in flags) == (not spec.tied_embeddings)
    windowed = tuple(is_layer_window_attention(config.window_size, config.window_attn_skip_freq, n + 1) for n in range(config.num_layers))
    assert windowed == (spec.window_layers or (False,) * spec.num_layers)
    if spec.sliding_window:
        assert config.window_size == (spec.sliding_window - 1, 0)
    if spec.moe:
        assert config.num_moe_experts == spec.moe.num_experts and config.moe_ffn_hidden_size == spec.moe.expert_ffn_hidden_size
        assert config.moe_shared_expert_gate and config.moe_router_pre_softmax
        assert config.moe_shared_expert_intermediate_size == spec.moe.shared_ffn_hidden_size


def test_nemotron_reads_squared_relu_layernorm_1p_and_partial_rope(tmp_path):
    m = load_model(PUBLISHED["nemotron-4-15b"][0])
    assert (m.squared_relu, m.layernorm_1p, m.rotary_percent, m.norm_epsilon) == (True, True, 0.5, 1e-5)
    # the report's 12.5B non-embedding parameters (its 3.2B embedding figure is rounded: 2 x 256,000 x 6,144 = 3.15B)
    assert (m.total_params() - 2 * m.embedding_params()) / 1e9 == pytest.approx(12.5, rel=0.005)
    config = json.loads(Path(PUBLISHED["nemotron-4-15b"][0]).read_text())
    for change, field in (({"hidden_act": "gelu"}, "hidden_act"), ({"mlp_bias": True}, "mlp_bias")):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**config, **change}))
        with pytest.raises(SpecError, match=field):
            load_model(str(path))


# Families loom prices but Megatron-LM's pretrain_gpt.py cannot build: name -> (config, published total parameters in billions).
# The Hugging Face safetensors counts: google/gemma-7b 8.54B, google/gemma-2-9b 9.24B, google/gemma-3-1b-pt 1.00B; the BLOOM
# model cards: bigscience/bloom-560m "559,214,592 parameters", bigscience/bloom "176,247,271,424 parameters".
NOT_BUILT_BY_MEGATRON = {
    "gemma-7b": (str(FAMILIES / "gemma-7b.json"), 8.54),
    "gemma-2-9b": (str(FAMILIES / "gemma-2-9b.json"), 9.24),
    "gemma-3-1b-pt": (str(FAMILIES / "gemma-3-1b-pt.json"), 1.00),
    "bloom-560m": (str(FAMILIES / "bloom-560m.json"), 0.559214592),
    "bloom-176b": (str(FAMILIES / "bloom-176b.json"), 176.247271424),
    # OLMo-2-1124-7B: the Hub's safetensors count, 7.30B.
    "olmo-2-7b": (str(FAMILIES / "olmo-2-7b.json"), 7.30),
}
GEMMAS = sorted(name for name in NOT_BUILT_BY_MEGATRON if name.startswith("gemma"))


@pytest.mark.parametrize("name", sorted(NOT_BUILT_BY_MEGATRON))
def test_parameter_counts_of_what_megatron_cannot_build(name):
    source, billions = NOT_BUILT_BY_MEGATRON[name]
    assert load_model(source).total_params() / 1e9 == pytest.approx(billions, rel=0.005 if name.startswith(("gemma", "olmo")) else 1e-12)
    # the Hub's exact safetensors counts for the Gemmas
    exact = {"gemma-7b": 8_537_680_896, "gemma-2-9b": 9_241_705_984, "gemma-3-1b-pt": 999_885_952}
    assert name not in exact or load_model(source).total_params() == exact[name]


def test_olmo2_reads_post_norms_and_a_qk_norm_across_heads():
    """Each sublayer's norm after it (keeping that sublayer's output) and
    none before: the GEMMs read the residual stream itself; the QK norm
    weighs every head's query and key dims."""
    from loom.planner.cost.activations import layer_parts
    from loom.planner.cost.shape import Shape

    m = load_model(NOT_BUILT_BY_MEGATRON["olmo-2-7b"][0])
    assert m.post_norms_only and m.qk_norm_params == m.q_size + m.kv_size and "post_attention_layernorm" in m.megatron_unbuildable
    shape = Shape.of(m, Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8), 4096, "bf16", Features())
    parts = layer_parts(shape)
    assert "input" not in parts and "mlp_norm_input" not in parts and parts["post_norm_inputs"] == 2 * 2 * shape.tokens * m.hidden_size


def test_bloom_reads_alibi_and_its_embedding_norm():
    m = load_model(NOT_BUILT_BY_MEGATRON["bloom-560m"][0])
    assert (m.alibi, m.embedding_norm, m.learned_position_embeddings, m.linear_bias, m.gated_mlp, m.tied_embeddings) == (
        True, True, False, True, False, True)
    assert m.ffn_hidden_size == 4 * m.hidden_size and m.normalization == "LayerNorm"


@pytest.mark.parametrize("name", GEMMAS)
def test_gemma_parameter_counts_and_layers(name):
    source, billions = NOT_BUILT_BY_MEGATRON[name]
    m = load_model(source)
    assert m.total_params() / 1e9 == pytest.approx(billions, rel=0.005)
    assert m.head_dim == 256 and m.tied_embeddings and m.gated_mlp and m.normalization == "RMSNorm" and not m.linear_bias
    # Gemma 1: two norms a layer, full attention; Gemma 2: four, every other layer windowed; Gemma 3: five windowed to one global, QK norm
    expected = {"gemma-7b": (2, False, ()), "gemma-2-9b": (4, False, tuple(i % 2 == 0 for i in range(42))),
                "gemma-3-1b-pt": (4, True, tuple((i + 1) % 6 != 0 for i in range(26)))}[name]
    assert (m.norms_per_layer, m.qk_norm, m.window_layers) == expected


@pytest.mark.parametrize("name", [*GEMMAS, "bloom-560m", "falcon-7b", "olmo-2-7b"])
def test_plans_under_deepspeed_what_megatron_cannot_build(tmp_path, name):
    source = NOT_BUILT_BY_MEGATRON[name][0] if name in NOT_BUILT_BY_MEGATRON else str(FAMILIES / f"{name}.json")
    cluster = {"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    job = {"model": source, "cluster": "cluster.yaml", "global_batch_size": 32, "seq_length": 2048,
           "search": {"tp": [1, 2], "pp": [1], "micro_batch_size": [1]}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    refused = runner.invoke(app, ["plan", str(tmp_path / "job.yaml")])
    assert refused.exit_code == 2 and "field 'framework': expected deepspeed" in refused.output and "Megatron-LM cannot build" in refused.output
    planned = runner.invoke(app, ["plan", str(tmp_path / "job.yaml"), "--framework", "deepspeed", "--json", "--out", str(tmp_path / "out")])
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["model_parameters"] == load_model(source).total_params()
    assert (tmp_path / "out" / "ds_config.json").is_file()


def test_bloom_attends_without_rope_and_unfused_unless_flash_attention_2(tmp_path):
    from loom.planner.cost.activations import layer_parts as saved_parts
    from loom.planner.cost.layers import shape_of
    from loom.planner.specs.job import load_job

    bloom = load_model(NOT_BUILT_BY_MEGATRON["bloom-560m"][0])
    job = Job(model=bloom, cluster=parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8,
                                                  "nic_Gbps": 400}, "t"), global_batch_size=8, seq_length=2048, framework="deepspeed")
    shape = shape_of(job, Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8))
    # Q, K and V saved once (no rotary copies of Q and K)
    assert saved_parts(shape)["qkv"] == 2 * 3 * bloom.hidden_size * 2048
    cluster = {"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    for features, flash in (({}, False), ({"attention_kernel": "flash2", "flash_attention": True}, True)):
        (tmp_path / "job.yaml").write_text(yaml.safe_dump({"model": NOT_BUILT_BY_MEGATRON["bloom-560m"][0], "cluster": "cluster.yaml",
                                                           "global_batch_size": 8, "seq_length": 2048, "framework": "deepspeed",
                                                           "features": features}))
        assert load_job(tmp_path / "job.yaml").features.flash_attention is flash
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"model": NOT_BUILT_BY_MEGATRON["bloom-560m"][0], "cluster": "cluster.yaml",
                                                       "global_batch_size": 8, "seq_length": 2048, "framework": "deepspeed",
                                                       "features": {"flash_attention": True}}))
    with pytest.raises(SpecError, match="attention_kernel"):
        load_job(tmp_path / "job.yaml")
    assert Features().attention_kernel == "cudnn"


def test_what_the_new_families_cannot_be(tmp_path):
    gemma2 = json.loads(Path(NOT_BUILT_BY_MEGATRON["gemma-2-9b"][0]).read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**gemma2, "hidden_activation": "silu"}))
    with pytest.raises(SpecError, match="hidden_activation"):
        load_model(str(path))
    path.write_text(json.dumps({key: value for key, value in gemma2.items() if key != "sliding_window"}))
    assert load_model(str(path)).sliding_window == 4096  # Gemma2Config's default
    assert load_model(NOT_BUILT_BY_MEGATRON["gemma-2-9b"][0]).attention_softcap == 50.0
    # a Nemotron config with Llama-3 8B's shape is still not torchtitan's llama3
    from loom.planner.specs import torchtitan

    llama = json.loads(json.dumps({"model_type": "nemotron", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                                   "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 8192}))
    path.write_text(json.dumps(llama))
    assert "blocks" in torchtitan.trainable(load_model(str(path)))


def test_per_gpu_layer_weights_count_every_norm():
    from loom.planner.cost.memory import _layer_params_per_gpu

    m = load_model(NOT_BUILT_BY_MEGATRON["gemma-2-9b"][0])
    assert _layer_params_per_gpu(m, 1, 1, 1, "dense").total == m.layer_params()


def test_gemma2s_soft_caps_cost_a_pass_over_the_scores_and_the_logits(tmp_path):
    from dataclasses import replace

    from loom.planner.cost import activations, compute
    from loom.planner.cost.layers import shape_of

    capped = load_model(NOT_BUILT_BY_MEGATRON["gemma-2-9b"][0])
    plain = replace(capped, attention_softcap=None, logit_softcap=None)
    cluster = parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}, "t")
    layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8)
    shapes = [shape_of(Job(model=m, cluster=cluster, global_batch_size=8, seq_length=4096, framework="deepspeed",
                           features=Features(flash_attention=False)), layout) for m in (capped, plain)]
    gpu = cluster.nodes[0].gpu
    for backward in (False, True):
        with_cap, without = (compute.attention_core(s, gpu, backward).elementwise_s for s in shapes)
        assert with_cap > without
        with_cap, without = (compute.head(s, gpu, backward).elementwise_s for s in shapes)
        assert with_cap > without
    scores = 2 * capped.num_attention_heads * 4096 * 4096  # one 16-bit tanh of the s x s scores per head
    assert activations.layer_parts(shapes[0])["core_attention"] - activations.layer_parts(shapes[1])["core_attention"] == scores
    assert activations.head(shapes[0]) - activations.head(shapes[1]) == 2 * 4096 * capped.vocab_size


# Falcon's Hub checkpoints store the output layer beside the embedding it is
# tied to (transformers' FalconConfig ties them): the Hub's safetensors
# counts, 7.22B (falcon-7b), 41.8B (falcon-40b) and 179.523B (falcon-180B,
# as the Open LLM Leaderboard's request file records it), are loom's count
# plus one vocabulary x hidden copy.
FALCONS = {"falcon-7b": 7.22, "falcon-40b": 41.8, "falcon-180b": 179.523}


@pytest.mark.parametrize("name", sorted(FALCONS))
def test_falcon_parameter_counts_and_layers(name):
    m = load_model(str(FAMILIES / f"{name}.json"))
    stored = m.total_params() + m.vocab_size * m.hidden_size
    assert stored / 1e9 == pytest.approx(FALCONS[name], rel=0.005 if name != "falcon-180b" else 1e-5)
    # 7B: multi-query attention and one LayerNorm feeding both branches; 40B/180B: 8 key/value groups, a LayerNorm each
    assert (m.num_query_groups, m.norms_per_layer) == ((1, 1) if name == "falcon-7b" else (8, 2))
    assert m.parallel_attention and m.tied_embeddings and not m.linear_bias and m.rotary and not m.gated_mlp
    assert m.megatron_unbuildable and "parallel attention" in m.megatron_unbuildable


def test_falcons_parallel_block_keeps_one_input():
    """Both branches read the layer's input: no residual after the attention
    to keep, and with Falcon-7B's one norm no second normalised copy."""
    from loom.planner.cost.activations import layer_parts
    from loom.planner.cost.shape import Shape

    layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8)
    seven, forty = (Shape.of(load_model(str(FAMILIES / f"{n}.json")), layout, 2048, "bf16", Features()) for n in ("falcon-7b", "falcon-40b"))
    assert "mlp_norm_input" not in layer_parts(seven) and "mlp_input" not in layer_parts(seven)
    assert "mlp_norm_input" not in layer_parts(forty) and layer_parts(forty)["mlp_input"] == layer_parts(forty)["qkv_input"]


@pytest.mark.parametrize("family, what", [("t5", "encoder-decoder"), ("bert", "encoder-only"), ("vit", "vision-only"),
                                          ("mamba2", "pure state-space"), ("foo", "encoder-decoder")])
def test_out_of_scope_architectures_are_refused_saying_what_they_are(tmp_path, family, what):
    config = {"model_type": family, "hidden_size": 512, **({"is_encoder_decoder": True} if family == "foo" else {})}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "config.json")])
    assert result.exit_code == 2 and what in result.output and "model_type" in result.output and "Traceback" not in result.output


def test_yarn_outside_mla_is_torchtitans_or_deepspeeds_to_train(tmp_path):
    """gpt-oss ships YaRN x32 (Qwen3 takes it for long context): Megatron-LM's
    flags write YaRN for MLA only, so a Megatron job is refused, once; torchtitan's
    gpt_oss builds exactly gpt-oss's YaRN, DeepSpeed runs the user's own model."""
    from loom.planner.specs import torchtitan
    from loom.planner.specs.model import model_from_hf_config
    from loom.profiles.catalogue import MODELS_DIR

    yarn = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096,
            "truncate": False}
    for name in ("gpt-oss-20b", "qwen3-30b-a3b"):
        config = {**json.loads((MODELS_DIR / f"{name}.json").read_text()), "rope_scaling": yarn}
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        model = model_from_hf_config(config, name, "config.json")
        assert (model.yarn.factor, model.yarn.truncate, model.rope_scaling_factor) == (32.0, False, None)
        cluster = {"nodes": 4, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
        job = {"model": str(tmp_path / f"{name}.json"), "cluster": cluster, "global_batch_size": 256, "seq_length": 4096}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        refused = runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--tp", "1", "--ep", "8"])
        assert refused.exit_code == 2 and "YaRN" in refused.output and "framework" in refused.output, refused.output
    # DeepSpeed's MoE gates top-2 at most: the refusal offers the one framework left, not Megatron back
    refused = runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--tp", "1", "--ep", "8", "--framework", "deepspeed"])
    assert refused.exit_code == 2 and "expected torchtitan for" in refused.output and "top-1 and top-2 gates" in refused.output, refused.output
    assert not torchtitan.rotary_mismatch(model_from_hf_config({**json.loads((MODELS_DIR / "gpt-oss-20b.json").read_text()),
                                                                 "rope_scaling": yarn}, "gpt-oss-20b", "c"), 4096)
    rounded = model_from_hf_config({**json.loads((MODELS_DIR / "gpt-oss-20b.json").read_text()), "rope_scaling": {**yarn, "truncate": True}},
                                   "gpt-oss-20b", "c")
    assert "YaRN x32" in torchtitan.rotary_mismatch(rounded, 4096)  # torchtitan's ramp is not rounded


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2-lite"])
def test_deepseek_yarn_reaches_megatrons_mla_rotary_embedding(name):
    """DeepSeek's YaRN (factor 40, its two mscales) is written as Megatron-LM's
    MLA flags and builds megatron-core's YarnRotaryEmbedding with the
    config's terms (it was dropped: MLA trained YaRN with factor 1)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_mscale
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from loom.profiles.catalogue import MODELS_DIR
    from test_emit_megatron import parse_flags

    scaling = json.loads((MODELS_DIR / f"{name}.json").read_text())["rope_scaling"]
    spec = load_model(name)
    cluster = parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}, "t")
    layout = Layout(tp=1, pp=1, dp=8, cp=1, ep=8, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)
    flags = parse_flags(megatron_args(Job(model=spec, cluster=cluster, global_batch_size=64, seq_length=4096), layout, uniform_stages(spec, layout)))
    config = MLATransformerConfig(num_layers=2, hidden_size=int(flags["hidden-size"]), num_attention_heads=int(flags["num-attention-heads"]),
                                  multi_latent_attention=True, kv_lora_rank=int(flags["kv-lora-rank"]),
                                  qk_head_dim=int(flags["qk-head-dim"]), qk_pos_emb_head_dim=int(flags["qk-pos-emb-head-dim"]),
                                  v_head_dim=int(flags["v-head-dim"]), rotary_scaling_factor=float(flags["rotary-scaling-factor"]),
                                  mscale=float(flags["mscale"]), mscale_all_dim=float(flags["mscale-all-dim"]))
    assert config.rope_type == "yarn"
    # DeepSeek's latent RMSNorms exist only with --qk-layernorm (megatron-core's MLA layer spec)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp

    attention = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm="qk-layernorm" in flags).submodules.self_attention
    assert attention.submodules.kv_layernorm is not IdentityOp and attention.submodules.q_layernorm is not IdentityOp
    assert (config.rotary_scaling_factor, config.mscale, config.mscale_all_dim) == (scaling["factor"], scaling["mscale"], scaling["mscale_all_dim"])
    assert (config.original_max_position_embeddings, config.beta_fast, config.beta_slow) == (
        scaling["original_max_position_embeddings"], scaling["beta_fast"], scaling["beta_slow"])
    # The temperature megatron-core's MLA puts on its softmax scale (mscale_all_dim), DeepSeek's yarn_get_mscale.
    temperature = _yarn_get_mscale(config.rotary_scaling_factor, config.mscale_all_dim)
    assert temperature == pytest.approx(0.1 * scaling["mscale_all_dim"] * math.log(scaling["factor"]) + 1.0) and temperature > 1.2


def test_mla_yarn_megatron_cannot_set_is_refused_naming_the_term():
    from loom.planner.specs.model import model_from_hf_config
    from loom.profiles.catalogue import MODELS_DIR

    config = json.loads((MODELS_DIR / "deepseek-v3.json").read_text())
    for change, field in (({"beta_fast": 16}, "rope_scaling.beta_fast"), ({"original_max_position_embeddings": 8192},
                          "rope_scaling.original_max_position_embeddings"), ({"type": "linear"}, "rope_scaling"),
                          ({"attention_factor": 2.0}, "rope_scaling.attention_factor"), ({"truncate": False}, "rope_scaling.truncate")):
        with pytest.raises(SpecError) as refused:
            model_from_hf_config({**config, "rope_scaling": {**config["rope_scaling"], **change}}, "deepseek", "config.json")
        assert [problem[0] for problem in refused.value.problems] == [field]


@pytest.mark.parametrize("name", ["deepseek-v3", "llama-3-8b", "qwen3-8b"])
def test_transformers_5_rope_parameters_read_as_rope_scaling(name):
    """transformers 5 saves rope_theta and the scaling under rope_parameters
    (rope_type "default" when unscaled): the same model as transformers 4's keys."""
    from loom.planner.specs.model import model_from_hf_config
    from loom.profiles.catalogue import MODELS_DIR

    config = json.loads((MODELS_DIR / f"{name}.json").read_text())
    scaling = config.pop("rope_scaling", None) or {"rope_type": "default"}
    theta = config.pop("rope_theta")
    saved = {**config, "rope_parameters": {**scaling, "rope_theta": theta}}
    assert model_from_hf_config(saved, name, "config.json") == load_model(name)
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if name == "llama-3-8b":
        assert model_from_hf_config({**saved, "rope_parameters": {**llama31, "rope_theta": 500000.0}}, name, "c").rope_scaling_factor == 8.0
    with pytest.raises(SpecError) as refused:
        model_from_hf_config({**saved, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, name, "config.json")
    assert refused.value.problems[0][0] == "rope_parameters"
    # What would otherwise be read silently as something else:
    ambiguous = {
        # two bases
        "rope_parameters.rope_theta": {**saved, "rope_theta": theta / 2},
        # a scaling with no kind
        "rope_parameters.rope_type": {**saved, "rope_parameters": {"factor": 4.0, "rope_theta": theta}},
        # per-layer-type parameters outside Gemma 3
        "rope_parameters": {**saved, "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": theta},
                                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    }
    for field, config in ambiguous.items():
        with pytest.raises(SpecError) as refused:
            model_from_hf_config(config, name, "config.json")
        assert [problem[0] for problem in refused.value.problems] == [field]  # once, though three checks read it
    # two scalings that disagree (transformers 4's and 5's keys)
    with pytest.raises(SpecError) as refused:
        model_from_hf_config({**saved, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, name, "config.json")
    assert "rope_parameters" in [problem[0] for problem in refused.value.problems]


def test_a_mixture_family_without_its_expert_counts_takes_transformers_defaults():
    """A Mixtral config.json that leaves out num_local_experts is transformers'
    8 experts, top-2 (MixtralConfig), not a dense model."""
    from loom.planner.specs.model import model_from_hf_config
    from loom.profiles.catalogue import MODELS_DIR

    config = json.loads((MODELS_DIR / "mixtral-8x7b.json").read_text())
    trimmed = {key: value for key, value in config.items() if key not in ("num_local_experts", "num_experts_per_tok")}
    assert model_from_hf_config(trimmed, "mixtral", "config.json").moe == load_model("mixtral-8x7b").moe
    # The catalogue's Qwen3-235B renormalises its top-8 as the released config says (norm_topk_prob true): no pre-softmax router.
    assert not load_model("qwen3-235b-a22b").moe.pre_softmax


@pytest.mark.parametrize("name, loss", [("mixtral-8x7b", ("aux_loss", 0.02)), ("qwen3-30b-a3b", ("aux_loss", 0.001)),
                                        ("deepseek-v3", ("seq_aux_loss", 0.001)), ("gpt-oss-20b", ("aux_loss", 0.9))])
def test_the_load_balancing_loss_is_the_configs(name, loss):
    """train.sh balances experts with the loss the config gives (Mixtral's
    router_aux_loss_coef 0.02, DeepSeek's per-sequence aux_loss_alpha), not one
    coefficient for every model; megatron-core's TransformerConfig takes it."""
    from megatron.core.transformer import TransformerConfig

    from test_emit_megatron import parse_flags

    spec = load_model(name)
    cluster = parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}, "t")
    layout = Layout(tp=1, pp=1, dp=8, cp=1, ep=8, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)
    flags = parse_flags(megatron_args(Job(model=spec, cluster=cluster, global_batch_size=64, seq_length=4096), layout, uniform_stages(spec, layout)))
    assert (flags["moe-router-load-balancing-type"], float(flags["moe-aux-loss-coeff"])) == loss
    config = TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=4, num_moe_experts=spec.moe.num_experts,
                               moe_router_topk=spec.moe.top_k, moe_router_load_balancing_type=loss[0], moe_aux_loss_coeff=loss[1])
    assert config.moe_aux_loss_coeff == loss[1]


def _flags_of(spec) -> dict:
    from test_emit_megatron import parse_flags

    cluster = parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}, "t")
    layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)
    return parse_flags(megatron_args(Job(model=spec, cluster=cluster, global_batch_size=64, seq_length=2048), layout, uniform_stages(spec, layout)))


def test_gpt_neox_reads_its_partial_rotary_and_parallel_residual(tmp_path):
    """GPT-NeoX 20B rotates a quarter of each head (rotary_pct 0.25) and adds
    attention and MLP side by side (use_parallel_residual): Megatron's layer
    cannot, so it is DeepSpeed's to train; a NeoX without the parallel
    residual gets --rotary-percent (the default 0.25 when the config omits it)."""
    config = json.loads(NEOX_20B.read_text())
    neox = load_model(str(NEOX_20B))
    assert neox.parallel_attention and neox.rotary_percent == 0.25 and neox.megatron_unbuildable
    path = tmp_path / "config.json"
    path.write_text(json.dumps({key: value for key, value in config.items() if key != "rotary_pct"} | {"use_parallel_residual": False}))
    sequential = load_model(str(path))
    assert not sequential.parallel_attention and not sequential.megatron_unbuildable
    assert float(_flags_of(sequential)["rotary-percent"]) == 0.25
    # transformers 5 writes it into rope_parameters; the two forms must agree.
    v5 = {key: value for key, value in config.items() if key != "rotary_pct"} | {"use_parallel_residual": False}
    path.write_text(json.dumps(v5 | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}))
    assert load_model(str(path)).rotary_percent == 1.0
    for names_two, field in [({"rotary_pct": 0.25, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
                              "rope_parameters.partial_rotary_factor"),
                             ({"rotary_pct": 0.25, "partial_rotary_factor": 0.5}, "partial_rotary_factor")]:
        path.write_text(json.dumps(v5 | names_two))
        with pytest.raises(SpecError) as error:
            load_model(str(path))
        assert error.value.field == field
    result = runner.invoke(app, ["plan", "--model", str(NEOX_20B), "--framework", "megatron", "--cluster", str(
        Path(__file__).parents[1] / "examples" / "h100-64.yaml"), "--global-batch-size", "64", "--seq-length", "2048"])
    assert result.exit_code == 2 and "use_parallel_residual" in result.output, result.output


def test_attention_dropout_is_its_own_flag(tmp_path):
    """Llama with attention_dropout 0.1 trains with --attention-dropout 0.1
    and no hidden dropout; StarCoder2's residual_dropout is the hidden one."""
    base = json.loads((Path(__file__).parents[1] / "profiles" / "models" / "llama-3-8b.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, "attention_dropout": 0.1}))
    flags = _flags_of(load_model(str(path)))
    assert (float(flags["attention-dropout"]), float(flags["hidden-dropout"])) == (0.1, 0.0)
    path.write_text(json.dumps({**json.loads((FAMILIES / "starcoder2-7b.json").read_text()), "attention_dropout": 0.0, "residual_dropout": 0.1}))
    flags = _flags_of(load_model(str(path)))
    assert (float(flags["attention-dropout"]), float(flags["hidden-dropout"])) == (0.0, 0.1)


@pytest.mark.parametrize("missing", ["intermediate_size", "rms_norm_eps"])
def test_a_field_whose_default_differs_by_family_is_required(tmp_path, missing):
    """transformers' config classes disagree on these defaults (LlamaConfig's
    intermediate_size 11008 and rms_norm_eps 1e-6, MixtralConfig's 14336 and
    1e-5): a config without them is refused, not planned with a guess."""
    base = json.loads((Path(__file__).parents[1] / "profiles" / "models" / "llama-3-8b.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({key: value for key, value in base.items() if key != missing}))
    with pytest.raises(SpecError) as error:
        load_model(str(path))
    assert error.value.field == missing


def test_a_mistral_config_without_a_window_takes_mistrals_default(tmp_path):
    """MistralConfig's sliding_window defaults to 4096; a null one is none."""
    base = json.loads((Path(__file__).parents[1] / "profiles" / "models" / "mistral-7b.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({key: value for key, value in base.items() if key != "sliding_window"}))
    assert load_model(str(path)).sliding_window == 4096
    path.write_text(json.dumps({**base, "sliding_window": None}))
    assert load_model(str(path)).sliding_window is None


def test_phi3s_longrope_is_deepspeeds_to_train(tmp_path):
    """Phi-3.5's LongRoPE (a factor per rotary dimension) reads: Megatron's
    rotary embeddings lack it, DeepSpeed runs the user's model code."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads((FAMILIES / "phi-3-mini-4k-instruct.json").read_text()),
                                "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}}))
    assert "LongRoPE" in load_model(str(path)).megatron_unbuildable
    cluster = str(Path(__file__).parents[1] / "examples" / "h100-64.yaml")
    assert runner.invoke(app, ["plan", "--model", str(path), "--cluster", cluster, "--framework", "deepspeed", "--top-k", "1"]).exit_code == 0
    refused = runner.invoke(app, ["plan", "--model", str(path), "--cluster", cluster])
    assert refused.exit_code == 2 and "LongRoPE" in refused.output, refused.output
