"""The MoE models users train now, in the catalogue from their public
Hugging Face configs: parameter counts against the published ones, a plan
through the CLI, gpt-oss's flags through megatron-core's TransformerConfig,
the price of its sliding window, and the families Megatron-LM cannot build
refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.cost import compute
from loom.planner.cost.shape import Shape
from loom.planner.output.megatron import megatron_args
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Features, Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.specs.rules import layout_problems
from loom.planner.specs.stages import uniform_stages
from loom.profiles.catalogue import find_gpu, model_names

DATA = Path(__file__).parent / "data" / "unbuildable"
runner = CliRunner()

# Published (total, active) parameters in billions, and whether the
# publisher's active count includes the input embedding (a lookup): Qwen3
# (model card), OLMoE (Muennighoff et al. 2024), Phi-3.5-MoE (model card)
# count it; DeepSeek-V2 (Liu et al. 2024, sec. 1) and gpt-oss (OpenAI's
# model card, table 1) count the output layer but not the embedding.
PUBLISHED = {
    "qwen3-30b-a3b": (30.5, 3.3, True),
    "deepseek-v2-lite": (15.7, 2.4, False),
    "gpt-oss-20b": (20.9, 3.6, False),
    "gpt-oss-120b": (116.8, 5.1, False),
}
# DeepSeek-V2-Lite's "2.4B" is loom's 2.45B (2.1% off) rounded down to one
# decimal; every other count is within 2%.
ACTIVE_TOLERANCE = {"deepseek-v2-lite": 0.025}


def test_the_moe_models_are_in_the_catalogue():
    assert set(PUBLISHED) <= set(model_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name):
    total, active, with_embedding = PUBLISHED[name]
    model = load_model(name)
    assert model.total_params() / 1e9 == pytest.approx(total, rel=0.02)
    assert model.active_params(input_embedding=with_embedding) / 1e9 == pytest.approx(active, rel=ACTIVE_TOLERANCE.get(name, 0.02))


def test_what_each_family_reads():
    qwen, lite, small, large = (load_model(n) for n in ("qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-20b", "gpt-oss-120b"))
    assert (qwen.moe.num_experts, qwen.moe.top_k, qwen.moe.expert_ffn_hidden_size, qwen.qk_norm, qwen.kv_channels) == (128, 8, 768, True, 128)
    assert lite.mla.q_lora_rank is None and lite.mla.kv_lora_rank == 512 and lite.qk_head_dim == 192
    assert (lite.moe.num_experts, lite.moe.top_k, lite.moe.shared_ffn_hidden_size, lite.moe.first_dense_layers) == (64, 6, 2 * 1408, 1)
    assert lite.ffn_hidden_size == 10944 and not lite.linear_bias
    for model, layers, experts in ((small, 24, 32), (large, 36, 128)):
        assert (model.num_layers, model.moe.num_experts, model.moe.top_k, model.moe.expert_ffn_hidden_size) == (layers, experts, 4, 2880)
        assert model.linear_bias and model.moe.bias and model.attention_sinks and model.glu_clamp == 7.0
        assert model.sliding_window == 128 and model.window_layers == tuple(i % 2 == 0 for i in range(layers))
        assert model.kv_channels == 64 and model.num_query_groups == 8 and model.normalization == "RMSNorm"


@pytest.mark.parametrize("name, field, says", [("olmoe-1b-7b", "model_type", "--qk-layernorm"), ("phi-3.5-moe", "model_type", "LM-head bias")])
def test_families_megatron_cannot_build_are_refused(name, field, says):
    with pytest.raises(SpecError) as error:
        load_model(str(DATA / f"{name}.json"))
    assert error.value.field == field and says in str(error.value)
    result = runner.invoke(app, ["plan", "--model", str(DATA / f"{name}.json")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and name in result.output


def test_gpt_oss_without_attention_biases_is_refused(tmp_path):
    config = json.loads((Path(__file__).parents[1] / "profiles" / "models" / "gpt-oss-20b.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, "attention_bias": False, "layer_types": config["layer_types"][:3]}))
    with pytest.raises(SpecError) as error:
        load_model(str(path))
    assert {problem[0] for problem in error.value.problems} == {"attention_bias", "layer_types"}


def test_loom_plan_writes_a_gpt_oss_launch(tmp_path):
    cluster = {"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    job = {"model": "gpt-oss-20b", "cluster": "cluster.yaml", "global_batch_size": 64, "seq_length": 4096,
           "search": {"tp": [1, 2], "pp": [1, 2], "micro_batch_size": [1]}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = runner.invoke(app, ["plan", str(tmp_path / "job.yaml"), "--json", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    best = json.loads(result.stdout)["plans"][0]
    assert best["parallel"]["cp"] == 1
    train = (tmp_path / "out" / "train.sh").read_text()
    for flag in ("--window-size 127,0", "--window-attn-skip-freq '([1,0]*12)'", "--softmax-type learnable", "--quick-geglu",
                 "--glu-linear-offset 1.0", "--activation-func-clamp-value 7", "--attention-backend fused", "--num-experts 32"):
        assert flag in train
    assert "--disable-bias-linear" not in train and "--swiglu" not in train


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_gpt_oss_flags_build_megatron_cores_config(name):
    """The flags, mapped as Megatron-LM's arguments.py (core_v0.16.1) maps
    them (tuple_type, moe_freq_type, --quick-geglu), build megatron-core's
    TransformerConfig, whose layers then window exactly loom's layers."""
    import torch
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.utils import is_layer_window_attention

    from test_emit_megatron import parse_flags

    spec = load_model(name)
    cluster = parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}, "t")
    job = Job(model=spec, cluster=cluster, global_batch_size=64, seq_length=4096)
    layout = Layout(tp=2, pp=1, dp=4, cp=1, ep=8, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, distributed_optimizer=True)
    flags = parse_flags(megatron_args(job, layout, uniform_stages(spec, layout)))
    assert "swiglu" not in flags and "disable-bias-linear" not in flags
    pattern = flags["window-attn-skip-freq"]
    assert set(pattern) <= set(",0123456789[]()+*")  # what Megatron's _eval_pattern accepts
    config = TransformerConfig(
        num_layers=int(flags["num-layers"]), hidden_size=int(flags["hidden-size"]), num_attention_heads=int(flags["num-attention-heads"]),
        num_query_groups=int(flags["num-query-groups"]), kv_channels=int(flags["kv-channels"]), ffn_hidden_size=int(flags["ffn-hidden-size"]),
        normalization=flags["normalization"], add_bias_linear="disable-bias-linear" not in flags,
        gated_linear_unit="quick-geglu" in flags, activation_func=quick_gelu, bias_activation_fusion=True,
        glu_linear_offset=float(flags["glu-linear-offset"]), activation_func_clamp_value=float(flags["activation-func-clamp-value"]),
        window_size=tuple(int(i) for i in flags["window-size"].strip("()").split(",")), window_attn_skip_freq=eval(pattern),
        softmax_type=flags["softmax-type"], attention_backend=AttnBackend[flags["attention-backend"]],
        hidden_dropout=float(flags["hidden-dropout"]), attention_dropout=float(flags["attention-dropout"]),
        tensor_model_parallel_size=layout.tp, sequence_parallel=True, expert_model_parallel_size=int(flags["expert-model-parallel-size"]),
        expert_tensor_parallel_size=int(flags["expert-tensor-parallel-size"]), num_moe_experts=int(flags["num-experts"]), moe_router_topk=int(flags["moe-router-topk"]), moe_ffn_hidden_size=int(flags["moe-ffn-hidden-size"]),
        moe_token_dispatcher_type=flags["moe-token-dispatcher-type"], moe_grouped_gemm="moe-grouped-gemm" in flags,
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
    )
    # TE's window (left, 0) shows query i keys i - left .. i: 128 keys, as in Hugging Face's sliding_window.
    assert config.window_size == (spec.sliding_window - 1, 0)
    windowed = [is_layer_window_attention(config.window_size, config.window_attn_skip_freq, n + 1) for n in range(config.num_layers)]
    assert tuple(windowed) == spec.window_layers
    assert config.softmax_type == "learnable" and config.add_bias_linear and config.num_moe_experts == spec.moe.num_experts


def _attention_s(model, seq: int) -> float:
    shape = Shape(model, tp=1, cp=1, micro_batch_size=1, sequence_parallel=False, seq_length=seq, precision="bf16", features=Features())
    h100 = find_gpu("H100")
    return compute.attention_core(shape, h100).total_s + compute.attention_core(shape, h100, backward=True).total_s


def test_sliding_window_attention_is_cheaper_past_the_window():
    windowed = load_model("gpt-oss-120b")
    full = replace(windowed, sliding_window=None, window_layers=())
    assert _attention_s(windowed, 128) == pytest.approx(_attention_s(full, 128))
    for seq in (4096, 32768):
        assert _attention_s(windowed, seq) < _attention_s(full, seq)
    # Half the layers windowed: at long sequences attention costs about half.
    assert _attention_s(windowed, 131072) / _attention_s(full, 131072) == pytest.approx(0.5, abs=0.01)


def test_windowed_flops_count_min_of_window_and_position_keys():
    """Query i (1-based) sees min(W, i) keys: sum = s*W - W(W-1)/2, which
    loom counts as s*W - W^2/2 beside its s^2/2 for full causal attention."""
    model = load_model("gpt-oss-20b")
    shape = Shape(model, tp=1, cp=1, micro_batch_size=1, sequence_parallel=False, seq_length=4096, precision="bf16", features=Features())
    per_pair = 2.0 * model.num_attention_heads * (model.qk_head_dim + model.v_head_dim)
    assert shape.attention_flops(windowed=True) == pytest.approx(per_pair * (4096 * 128 - 128**2 / 2))
    assert shape.attention_flops() == pytest.approx(per_pair * 4096**2 / 2)
    exact = sum(min(128, i) for i in range(1, 4097))
    assert shape.attention_flops(windowed=True) / per_pair == pytest.approx(exact, rel=0.001)


def test_context_parallelism_is_not_planned_for_gpt_oss():
    cluster = parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}, "t")
    job = Job(model=load_model("gpt-oss-20b"), cluster=cluster, global_batch_size=64, seq_length=8192)
    layout = Layout(tp=1, pp=1, dp=4, cp=2, ep=8, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)
    assert any(field == "cp" for field, *_ in layout_problems(job, layout))
