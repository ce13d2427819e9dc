"""Mixture-of-experts in the planner: expert parallel groups, memory, time,
the search and the Megatron flags (checked by megatron-core's configs)."""

from __future__ import annotations

import pytest

from loom.planner.cost.compute import model_flops_per_token
from loom.planner.cost.shape import Shape
from loom.profiles.catalogue import find_gpu
from loom.planner.specs.job import Features, Job, SearchFile
from loom.planner.specs.layout import Layout
from loom.planner.cost.memory import stage_memory, stage_params
from loom.planner.specs.model import load_model
from loom.planner.plan import evaluate
from loom.planner.specs.rules import layout_problems
from loom.planner.search.layouts import search
from loom.planner.specs.stages import uniform_stages
from loom.planner.cost.network import Links
from loom.planner.cost.time_model import step_parts
from loom.planner.specs.layout import rank_groups

from conftest import make_cluster

MIXTRAL = load_model("mixtral-8x7b")
DEEPSEEK = load_model("deepseek-v3")


def mixtral_job(nodes: int = 8, **kwargs) -> Job:
    return Job(model=MIXTRAL, cluster=make_cluster(nodes), global_batch_size=256, seq_length=4096, **kwargs)


def layout(**degrees) -> Layout:
    base = dict(tp=1, pp=1, cp=1, micro_batch_size=1, global_batch_size=256, distributed_optimizer=True)
    return Layout(**{**base, **degrees})


def test_expert_groups_are_megatrons():
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    for tp, dp, pp, ep, etp in [(2, 4, 2, 4, 1), (1, 8, 1, 8, 1), (2, 8, 2, 4, 2), (4, 2, 1, 2, 2)]:
        ours = rank_groups(Layout(tp=tp, pp=pp, dp=dp, cp=1, ep=ep, etp=etp, micro_batch_size=1, global_batch_size=dp))
        expert_dp = tp * dp // (ep * etp)
        theirs = parallel_state.RankGenerator(tp=etp, ep=ep, dp=expert_dp, pp=pp, cp=1, order="tp-ep-dp-pp")
        assert sorted(map(tuple, ours["ep"].tolist())) == sorted(map(tuple, theirs.get_ranks("ep")))
        assert sorted(map(tuple, ours["etp"].tolist())) == sorted(map(tuple, theirs.get_ranks("tp")))
        assert sorted(map(tuple, ours["expert-dp"].tolist())) == sorted(map(tuple, theirs.get_ranks("dp")))


def test_experts_split_over_ep_and_their_optimizer_over_expert_data_parallel():
    one, eight = (layout(dp=8, ep=ep) for ep in (1, 8))
    params = [stage_params(MIXTRAL, lay, uniform_stages(MIXTRAL, lay)[0]) for lay in (one, eight)]
    expert = 32 * 3 * 4096 * 14336  # one expert per layer and GPU at EP8
    assert params[1].expert == pytest.approx(expert)
    assert params[0].expert == pytest.approx(8 * expert)
    assert params[0].total - params[0].expert == pytest.approx(params[1].total - params[1].expert)
    job = mixtral_job(nodes=1)
    shape = Shape.of(MIXTRAL, eight, 4096, "bf16", job.features)
    state = stage_memory(shape, eight, uniform_stages(MIXTRAL, eight)[0], "megatron", find_gpu("H100")).breakdown_bytes
    dense = params[1].total - params[1].expert
    # EP8 on 8 GPUs leaves one rank per expert: its Adam state is not sharded.
    assert state["optimizer_states"] == pytest.approx(12 * dense / 8 + 12 * params[1].expert)


def test_token_all_to_all_costs_more_across_nodes():
    qwen = load_model("qwen3-235b-a22b")
    job = Job(model=qwen, cluster=make_cluster(2), global_batch_size=256, seq_length=4096)
    parts = {}
    for ep in (1, 8, 16):
        lay = layout(dp=16, ep=ep)
        parts[ep] = step_parts(job, lay, uniform_stages(qwen, lay), [job.cluster.slowest.gpu])
    assert parts[1].chunks[0][0].ep_comm_s == 0
    assert Links.of(job, layout(dp=16, ep=8)).ep.kind == "nvlink"
    assert Links.of(job, layout(dp=16, ep=16)).ep.kind == "network"
    assert parts[16].chunks[0][0].ep_comm_s > 3 * parts[8].chunks[0][0].ep_comm_s > 0


def test_expert_tensor_parallelism_gathers_tokens():
    job = mixtral_job(nodes=1)
    plain, split = (step_parts(job, lay, uniform_stages(MIXTRAL, lay), [job.cluster.slowest.gpu]) for lay in (layout(dp=8, ep=4), layout(dp=8, ep=4, etp=2)))
    assert split.chunks[0][0].ep_comm_s > plain.chunks[0][0].ep_comm_s


def test_load_imbalance_slows_the_experts():
    lay = layout(dp=64, ep=8)
    times = [evaluate(mixtral_job(features=Features(moe_load_imbalance=f)), lay).step_time_s for f in (1.0, 1.5)]
    assert times[1] > times[0] * 1.1


def test_model_flops_count_the_routed_experts():
    """Mixtral runs 2 of 8 experts: ~12.9B active parameters, not 46.7B."""
    flops = model_flops_per_token(MIXTRAL, 4096)
    assert 6 * 12.5e9 < flops < 6 * 14.5e9 + 3 * 32 * 2 * 4096 * 32 * 256


@pytest.mark.parametrize(
    "degrees, field",
    [(dict(dp=8, ep=3), "ep"), (dict(dp=4, ep=8), "ep"), (dict(tp=2, dp=4, ep=4, sequence_parallel=False), "sequence_parallel")],
)
def test_expert_layouts_megatron_refuses_are_refused(degrees, field):
    problems = layout_problems(mixtral_job(nodes=1), layout(**degrees))
    assert field in [problem[0] for problem in problems]


def test_dense_models_take_no_expert_parallelism():
    job = Job(model=load_model("llama-3-8b"), cluster=make_cluster(1), global_batch_size=64, seq_length=4096)
    assert "ep" in [field for field, *_ in layout_problems(job, layout(dp=8, ep=2))]


def test_mixtral_on_64_h100_plans_expert_parallel_layouts_that_fit():
    result = search(mixtral_job(), top_k=3)
    assert all(plan.fits for plan in result.plans)
    assert any(plan.layout.ep > 1 for plan in result.plans)
    assert result.plans[0].step.breakdown_s["ep_comm"] > 0 or result.plans[0].layout.ep == 1


def test_deepseek_v3_on_1024_h100_fits():
    space = SearchFile(tp=[1, 2], pp=[4, 8, 16], cp=[1], micro_batch_size=[1], recompute=["none", "full"])
    job = Job(model=DEEPSEEK, cluster=make_cluster(128), global_batch_size=4096, seq_length=4096, search=space)
    result = search(job, top_k=2)
    best = result.plans[0]
    assert best.fits and best.layout.ep > 1
    last = best.stages[-1]
    assert last.head and best.memory[-1].breakdown_bytes["weights"] > 0


@pytest.mark.parametrize(
    "model, degrees",
    [("mixtral-8x7b", dict(tp=2, dp=4, ep=4, sequence_parallel=True)), ("deepseek-v3", dict(tp=2, dp=4, ep=8, sequence_parallel=True)),
     ("qwen3-235b-a22b", dict(tp=1, dp=8, ep=8)),
     # Megatron-Bridge's DeepSeek-V3 recipe recomputes these modules (deepseek_workload_base_configs.py).
     ("deepseek-v3", dict(tp=2, dp=4, ep=8, sequence_parallel=True, recompute="selective", recompute_modules=("mlp", "mla_up_proj"))),
     ("qwen3-235b-a22b", dict(tp=1, dp=8, ep=8, recompute="selective", recompute_modules=("core_attn", "moe_act", "layernorm")))],
)
def test_moe_flags_build_megatron_cores_config(model, degrees):
    """The flags train.sh passes build megatron-core's (MLA)TransformerConfig,
    whose __post_init__ checks the MoE settings against each other."""
    import torch
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    from loom.planner.output.megatron import megatron_args
    from test_emit_megatron import _listed, parse_flags

    spec = load_model(model)
    job = Job(model=spec, cluster=make_cluster(1), global_batch_size=64, seq_length=4096)
    lay = Layout(pp=1, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True, **degrees)
    flags = parse_flags(megatron_args(job, lay, uniform_stages(spec, lay)))
    common = dict(
        num_layers=int(flags["num-layers"]), hidden_size=int(flags["hidden-size"]), num_attention_heads=int(flags["num-attention-heads"]),
        ffn_hidden_size=int(flags["ffn-hidden-size"]), gated_linear_unit=True, add_bias_linear=False,
        tensor_model_parallel_size=lay.tp, sequence_parallel="sequence-parallel" in flags,
        expert_model_parallel_size=int(flags["expert-model-parallel-size"]), expert_tensor_parallel_size=int(flags["expert-tensor-parallel-size"]),
        num_moe_experts=int(flags["num-experts"]), moe_router_topk=int(flags["moe-router-topk"]), moe_ffn_hidden_size=int(flags["moe-ffn-hidden-size"]),
        moe_shared_expert_intermediate_size=int(flags["moe-shared-expert-intermediate-size"]) if "moe-shared-expert-intermediate-size" in flags else None,
        moe_layer_freq=eval(flags.get("moe-layer-freq", "1")), moe_token_dispatcher_type=flags["moe-token-dispatcher-type"],
        moe_grouped_gemm="moe-grouped-gemm" in flags, qk_layernorm="qk-layernorm" in flags,
        mtp_num_layers=int(flags["mtp-num-layers"]) if "mtp-num-layers" in flags else None,
        recompute_granularity=flags.get("recompute-granularity"), recompute_modules=_listed(flags.get("recompute-modules")),
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
    )
    if "multi-latent-attention" in flags:
        config = MLATransformerConfig(**common, q_lora_rank=int(flags["q-lora-rank"]), kv_lora_rank=int(flags["kv-lora-rank"]),
                                      qk_head_dim=int(flags["qk-head-dim"]), qk_pos_emb_head_dim=int(flags["qk-pos-emb-head-dim"]),
                                      v_head_dim=int(flags["v-head-dim"]))
        assert config.kv_lora_rank == spec.mla.kv_lora_rank and config.qk_head_dim + config.qk_pos_emb_head_dim == spec.qk_head_dim
    else:
        config = TransformerConfig(**common, num_query_groups=int(flags["num-query-groups"]))
    assert config.num_moe_experts == spec.moe.num_experts and config.moe_router_topk == spec.moe.top_k
    assert config.expert_model_parallel_size == lay.ep
    assert tuple(config.recompute_modules or ()) == (lay.selective_modules or ("core_attn",))
    dense = [i for i in range(spec.num_layers) if not spec.is_moe_layer(i)]
    if dense:
        assert [i for i, moe in enumerate(config.moe_layer_freq) if not moe] == dense


def test_deepspeed_moe_snippet_binds_to_deepspeeds_moe_layer(tmp_path):
    """Mixtral under DeepSpeed: the search uses EP, ds_config passes
    DeepSpeedConfig, and the snippet's MoE(...) arguments bind to DeepSpeed's
    own signature with loom's expert parallel size."""
    import ast
    import inspect

    moe_layer = pytest.importorskip("deepspeed.moe.layer")
    from loom.planner.output.launch import launch_files

    job = Job(model=MIXTRAL, cluster=make_cluster(8), global_batch_size=256, seq_length=4096, framework="deepspeed")
    best = search(job, top_k=1).plans[0]
    assert best.fits and best.layout.ep > 1 and best.layout.zero_stage <= 2
    files = launch_files(job, best.layout, list(best.stages), best.placement)
    tree = ast.parse(files["moe_snippet.py"])
    constants = {node.targets[0].id: node.value.value for node in tree.body if isinstance(node, ast.Assign)}
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "MoE")
    arguments = {keyword.arg: constants.get(getattr(keyword.value, "id", None), getattr(keyword.value, "value", None)) for keyword in call.keywords}
    inspect.signature(moe_layer.MoE.__init__).bind(None, **arguments)
    assert arguments["ep_size"] == best.layout.ep and arguments["num_experts"] == 8 and arguments["k"] == 2
    assert arguments["drop_tokens"] is False
    per_gpu = 8 // best.layout.ep
    assert f"so {per_gpu} expert{'s' if per_gpu > 1 else ''} per GPU" in files["moe_snippet.py"]


def test_placement_prices_the_expert_all_to_all():
    from loom.planner.search.placement import placement_problem

    job = mixtral_job(nodes=2)
    problem = placement_problem(evaluate(job, layout(dp=16, ep=8)))
    kinds = {kind.name: kind for kind in problem.kinds}
    assert kinds["ep"].volume_GB > 0 and kinds["ep"].groups.shape == (2, 8)
