"""Mixture-of-experts in the planner: expert parallel groups, memory, time,
the search and the Megatron flags (checked by megatron-core's configs)."""

from __future__ import annotations

from dataclasses import replace

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
    assert arguments["top2_2nd_expert_sampling"] is False  # Mixtral routes to its top two by score (DeepSpeed samples the second by default)
    per_gpu = 8 // best.layout.ep
    assert f"so {per_gpu} expert{'s' if per_gpu > 1 else ''} per GPU" in files["moe_snippet.py"]


def test_placement_prices_the_expert_all_to_all():
    from loom.planner.search.placement import placement_problem

    job = mixtral_job(nodes=2)
    problem = placement_problem(evaluate(job, layout(dp=16, ep=8)))
    kinds = {kind.name: kind for kind in problem.kinds}
    assert kinds["ep"].volume_GB > 0 and kinds["ep"].groups.shape == (2, 8)


# --- What an MoE layer spends beyond its GEMMs (cost/moe.py, cost/host.py) ----

import itertools  # noqa: E402

import pydantic  # noqa: E402

from loom.planner.cost import host, moe  # noqa: E402


def _shape(model, features: Features, ep: int, precision: str = "bf16", mbs: int = 1) -> Shape:
    return Shape(model, tp=1, cp=1, micro_batch_size=mbs, sequence_parallel=False, seq_length=4096, precision=precision,
                 features=features, ep=ep)


def test_expected_destinations_match_enumeration():
    # 12 experts on 4 ranks (3 each), top-3: average distinct ranks over every choice.
    choices = list(itertools.combinations(range(12), 3))
    mean = sum(len({e // 3 for e in choice}) for choice in choices) / len(choices)
    assert moe.expected_destinations(12, 3, 3) == pytest.approx(mean)
    assert moe.expected_destinations(8, 1, 2) == pytest.approx(2.0)  # Mixtral at EP8: each copy to its own rank


def test_deepep_sends_each_token_once_per_rank():
    qwen = load_model("qwen3-235b-a22b")  # 128 experts, top-8: copies often share a rank at EP8
    alltoall, _ = moe.dispatch_bytes(_shape(qwen, Features(), ep=8), ranks_per_node=8)
    deepep, _ = moe.dispatch_bytes(_shape(qwen, Features(moe_token_dispatcher="deepep"), ep=8), ranks_per_node=8)
    assert deepep < 0.8 * alltoall
    # Across nodes DeepEP sends one copy per destination node over the network.
    _, remote_alltoall = moe.dispatch_bytes(_shape(qwen, Features(), ep=32), ranks_per_node=8)
    _, remote_deepep = moe.dispatch_bytes(_shape(qwen, Features(moe_token_dispatcher="deepep"), ep=32), ranks_per_node=8)
    assert remote_deepep < 0.5 * remote_alltoall
    # Mixtral top-2 of 8 at EP8: no two copies share a rank, nothing to save.
    mixtral_alltoall, _ = moe.dispatch_bytes(_shape(MIXTRAL, Features(), ep=8), ranks_per_node=8)
    mixtral_deepep, _ = moe.dispatch_bytes(_shape(MIXTRAL, Features(moe_token_dispatcher="deepep"), ep=8), ranks_per_node=8)
    assert mixtral_deepep == pytest.approx(mixtral_alltoall)


def test_capacity_padding_fixes_the_rows_and_removes_the_host_sync():
    dropless = Features(moe_load_imbalance=1.5)
    padded = Features(moe_load_imbalance=1.5, moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    dropped = Features(moe_load_imbalance=1.5, moe_expert_capacity_factor=1.25)
    assert moe.busiest_rows_factor(_shape(MIXTRAL, dropless, ep=8)) == 1.5
    assert moe.busiest_rows_factor(_shape(MIXTRAL, padded, ep=8)) == 1.0
    assert moe.busiest_rows_factor(_shape(MIXTRAL, dropped, ep=8)) == 1.25
    assert host.syncs_every_moe_layer(_shape(MIXTRAL, dropless, ep=8))
    assert not host.syncs_every_moe_layer(_shape(MIXTRAL, padded, ep=8))


def test_te_runs_expert_gemms_four_at_a_time():
    gpu = find_gpu("H100")
    one = moe.expert_gemms_s(gpu, [(2048, 1536, 2048)], 4, "bf16", backward=False)
    assert moe.expert_gemms_s(gpu, [(2048, 1536, 2048)], 16, "bf16", backward=False) == pytest.approx(4 * one)
    assert moe.expert_gemms_s(gpu, [(2048, 1536, 2048)], 16, "bf16", backward=True) == pytest.approx(2 * 4 * one, rel=0.25)


def test_fine_grained_experts_at_one_sequence_wait_for_the_host():
    qwen30b = load_model("qwen3-30b-a3b")  # 128 experts of 768, top-8: 16 per GPU at EP8
    from loom.planner.specs.cluster import parse_cluster

    b200 = parse_cluster({"nodes": 1, "gpus_per_node": 8, "gpu": "B200", "nvlink_GBps": 900, "nics_per_node": 8, "nic_Gbps": 400}, "test")
    job = Job(model=qwen30b, cluster=b200, global_batch_size=64, seq_length=4096, precision="fp8")
    plan = evaluate(job, layout(dp=8, ep=8, global_batch_size=64))
    assert plan.step.breakdown_s["host_overhead"] > 0.2 * plan.step_time_s
    # A dense 70B layer's kernels outlast the Python that issues them.
    llama = Job(model=load_model("llama-3-70b"), cluster=make_cluster(2), global_batch_size=64, seq_length=4096)
    dense = evaluate(llama, layout(tp=4, pp=4, dp=1, sequence_parallel=True, global_batch_size=64))
    assert dense.step.breakdown_s["host_overhead"] == 0.0
    # More local experts, more to issue.
    assert host.layer_host_s(_shape(qwen30b, Features(), ep=4), find_gpu("H100"), "moe") > host.layer_host_s(_shape(qwen30b, Features(), ep=16), find_gpu("H100"), "moe")
    assert host.layer_host_s(_shape(qwen30b, Features(moe_router_fusion=True), ep=8), find_gpu("H100"), "moe") < host.layer_host_s(_shape(qwen30b, Features(), ep=8), find_gpu("H100"), "moe")


def test_a_grace_host_issues_kernels_slower_than_an_x86_one():
    """GB200's Grace CPU takes 2.75x a DGX H100's Xeon to issue a torch op
    (TransformerEngine issue #2053): the same host-bound plan waits longer
    for it than on x86-hosted B200s."""
    from loom.planner.specs.cluster import parse_cluster

    qwen30b = load_model("qwen3-30b-a3b")
    waits = {}
    for gpu, per_node in (("B200", 8), ("GB200", 4)):
        cluster = parse_cluster({"nodes": 8 // per_node, "gpus_per_node": per_node, "gpu": gpu, "nvlink_GBps": 900, "nics_per_node": per_node,
                                 "nic_Gbps": 400, "nvlink_domain_nodes": 8 // per_node}, "test")
        job = Job(model=qwen30b, cluster=cluster, global_batch_size=64, seq_length=4096, precision="fp8")
        waits[gpu] = evaluate(job, layout(dp=8, ep=8, global_batch_size=64)).step.breakdown_s["host_overhead"]
    assert waits["GB200"] > 2 * waits["B200"] > 0
    assert find_gpu("GB200").host_op_s / find_gpu("H100").host_op_s == pytest.approx(37.08 / 13.48)
    # A stage over a Grace node and an x86 one issues at the Grace host's pace (its collectives wait for it).
    mixed = parse_cluster({"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400,
                           "node_overrides": [{"node": 1, "gpu": "GH200"}]}, "test")
    assert mixed.slowest.gpu.host_op_s == find_gpu("GH200").host_op_s and mixed.slowest.gpu.memory_bytes == find_gpu("H100").memory_bytes
    job = Job(model=qwen30b, cluster=mixed, global_batch_size=64, seq_length=4096, precision="fp8")
    assert evaluate(job, layout(dp=16, ep=8, global_batch_size=64)).step.breakdown_s["host_overhead"] > 0


def test_all_to_all_overlap_hides_dispatch_behind_the_other_micro_batch():
    job = lambda **features: Job(model=load_model("qwen3-235b-a22b"), cluster=make_cluster(32), global_batch_size=512, seq_length=4096,  # noqa: E731
                                 features=Features(**features))
    chosen = layout(tp=2, pp=8, vpp=2, dp=16, ep=32, sequence_parallel=True, global_batch_size=512)
    plain, overlapped = evaluate(job(), chosen), evaluate(job(overlap_moe_expert_parallel_comm=True), chosen)
    assert overlapped.step.breakdown_s["ep_comm"] < 0.5 * plain.step.breakdown_s["ep_comm"]
    assert overlapped.step_time_s < plain.step_time_s
    # Megatron needs interleaving for it when pp > 1.
    problems = layout_problems(job(overlap_moe_expert_parallel_comm=True), layout(tp=2, pp=8, dp=16, ep=32, sequence_parallel=True, global_batch_size=512))
    assert any(field == "vpp" for field, _, _ in problems)


def test_all_to_all_overlap_pairs_all_but_the_warm_up_and_cool_down_passes():
    """megatron-core's combined 1F1B runs the first forward and the last
    backward alone without a pipeline; interleaved, each rank's warm-up
    forwards (one more for the overlap) and cool-down backwards."""
    from loom.planner.cost.time_model import paired_share

    assert paired_share(layout(dp=64, ep=8, global_batch_size=256)) == 3 / 4  # 4 micro batches: 3 paired
    assert paired_share(layout(dp=256, ep=8, global_batch_size=256)) == 0.0
    # pp 8, vpp 4, 32 micro batches: 128 chunk passes, 7 + 3 x 8 + 1 = 32 alone on the mean rank.
    assert paired_share(layout(tp=2, pp=8, vpp=4, dp=8, ep=8, sequence_parallel=True, global_batch_size=256)) == 96 / 128
    job = lambda **features: Job(model=load_model("qwen3-235b-a22b"), cluster=make_cluster(8), global_batch_size=64, seq_length=4096,  # noqa: E731
                                 features=Features(**features))
    one_each = layout(dp=64, ep=64, global_batch_size=64)  # one micro batch: nothing to pair with
    plain, overlapped = evaluate(job(), one_each), evaluate(job(overlap_moe_expert_parallel_comm=True), one_each)
    assert overlapped.step.breakdown_s["ep_comm"] == pytest.approx(plain.step.breakdown_s["ep_comm"])
    four_each = layout(dp=64, ep=64, global_batch_size=256)
    job4 = lambda **features: replace(job(**features), global_batch_size=256)  # noqa: E731
    plain, overlapped = evaluate(job4(), four_each), evaluate(job4(overlap_moe_expert_parallel_comm=True), four_each)
    assert plain.step.breakdown_s["ep_comm"] / 4 <= overlapped.step.breakdown_s["ep_comm"] < plain.step.breakdown_s["ep_comm"]


def test_shared_expert_overlap_hides_dispatch_behind_the_shared_experts():
    job = lambda **features: Job(model=DEEPSEEK, cluster=make_cluster(32), global_batch_size=512, seq_length=4096,  # noqa: E731
                                 features=Features(**features))
    chosen = layout(tp=1, pp=16, dp=16, ep=16, global_batch_size=512, recompute="full")
    plain, overlapped = evaluate(job(), chosen), evaluate(job(moe_shared_expert_overlap=True), chosen)
    assert overlapped.step.breakdown_s["ep_comm"] < plain.step.breakdown_s["ep_comm"]


@pytest.mark.parametrize("features, words", [
    (dict(moe_pad_expert_input_to_capacity=True), "needs moe_expert_capacity_factor"),
    (dict(moe_token_dispatcher="deepep", moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True), "DeepEP cannot pad"),
    (dict(moe_token_dispatcher="deepep", moe_shared_expert_overlap=True), "alltoall"),
    (dict(moe_shared_expert_overlap=True, overlap_moe_expert_parallel_comm=True), "not both"),
    (dict(moe_token_dispatcher="allgather", overlap_moe_expert_parallel_comm=True), "alltoall, deepep or hybridep"),
])
def test_moe_feature_combinations_megatron_refuses_are_refused(features, words):
    with pytest.raises(pydantic.ValidationError, match=words):
        Features(**features)


def test_a_job_file_with_such_a_combination_exits_2_naming_features(tmp_path):
    from typer.testing import CliRunner

    from loom.cli.app import app

    (tmp_path / "job.yaml").write_text("model: mixtral-8x7b\ncluster: {nodes: 2, gpus_per_node: 8, gpu: H100, nvlink_GBps: 450, "
                                       "nics_per_node: 8, nic_Gbps: 400}\nglobal_batch_size: 64\nseq_length: 4096\n"
                                       "features: {moe_pad_expert_input_to_capacity: true}\n")
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2 and "features" in result.output and "moe_expert_capacity_factor" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_dispatcher_buffers_are_deepeps_and_hybrideps_own_sizes():
    # DeepEP v1.2.1's size hints at 20 SMs, bf16 (NVLink + RDMA queues, MiB), plus its 32 MiB workspace.
    for model, ep, mib in [("qwen3-30b-a3b", 8, 120), ("qwen3-30b-a3b", 16, 135 + 33), ("deepseek-v3", 64, 360 + 351)]:
        shape = _shape(load_model(model), Features(moe_token_dispatcher="deepep"), ep=ep)
        assert (moe.dispatcher_buffer_bytes(shape) - moe.DEEPEP_WORKSPACE_BYTES) / 2**20 == pytest.approx(mib, abs=1)
    # HybridEP keeps room for every rank's tokens: DeepSeek-V3 at EP64 holds 3.5 GiB of them alone.
    hybrid = moe.dispatcher_buffer_bytes(_shape(DEEPSEEK, Features(moe_token_dispatcher="hybridep"), ep=64))
    assert hybrid > 3.5 * 2**30
    assert moe.dispatcher_buffer_bytes(_shape(DEEPSEEK, Features(), ep=64)) == 0.0
    job = Job(model=MIXTRAL, cluster=make_cluster(2), global_batch_size=64, seq_length=4096, features=Features(moe_token_dispatcher="allgather"))
    memory = evaluate(job, layout(dp=16, ep=8, global_batch_size=64)).peak_memory.breakdown_bytes
    assert memory["moe_dispatcher_buffers"] == 4096 * 8 * MIXTRAL.hidden_size * 2  # the gathered tokens, kept


def test_the_search_tries_each_dispatcher_listed_and_each_plan_names_its_own():
    from loom.planner.output.megatron import megatron_args
    from loom.planner.output.report import plan_report

    def job(dispatchers: list[str]) -> Job:
        return Job(model=load_model("qwen3-30b-a3b"), cluster=make_cluster(2), global_batch_size=256, seq_length=4096,
                   search=SearchFile(moe_token_dispatcher=dispatchers, tp=[1], cp=[1], recompute=["none"]))

    both, alltoall = search(job(["alltoall", "deepep"]), top_k=3), search(job(["alltoall"]), top_k=3)
    assert both.candidates == 2 * alltoall.candidates
    # Qwen3-30B-A3B's top-8 of 128 experts: DeepEP's one copy per rank beats alltoall's eight.
    assert both.plans[0].job.features.moe_token_dispatcher == "deepep"
    assert both.plans[0].step_time_s < alltoall.plans[0].step_time_s
    for plan in [*both.plans, *alltoall.plans]:
        args = megatron_args(plan.job, plan.layout, list(plan.stages))
        assert ("--moe-flex-dispatcher-backend" in args) == (plan.job.features.moe_token_dispatcher == "deepep")
        assert plan_report(plan).moe_token_dispatcher == plan.job.features.moe_token_dispatcher  # plan.json says which
    # The table names each plan's dispatcher when the search tried several.
    import io

    from rich.console import Console

    from loom.cli.render import plans_table

    out = io.StringIO()
    Console(file=out, width=100).print(plans_table([both.plans[0], alltoall.plans[0]], "qwen3"))
    assert "deepep" in out.getvalue() and "alltoall" in out.getvalue()


def test_every_part_of_a_deepseek_step_is_a_duration():
    # The last stage holds the multi-token prediction module's MoE layer besides its decoder layers.
    job = Job(model=DEEPSEEK, cluster=make_cluster(128), global_batch_size=4096, seq_length=4096)
    for chosen in (layout(tp=2, pp=16, dp=16, cp=2, ep=8, sequence_parallel=True, global_batch_size=4096),
                   layout(tp=1, pp=16, dp=64, ep=8, global_batch_size=4096, recompute="full")):
        plan = evaluate(job, chosen)
        assert all(seconds >= 0 for seconds in plan.step.breakdown_s.values()), plan.step.breakdown_s


def test_load_imbalance_by_ep_size_is_read_at_the_layouts_ep():
    features = Features(moe_load_imbalance={8: 1.2, 32: 1.6})
    assert moe.load_imbalance(features, 8, DEEPSEEK.moe) == 1.2 and moe.load_imbalance(features, 32, DEEPSEEK.moe) == 1.6
    assert moe.load_imbalance(features, 16, DEEPSEEK.moe) == pytest.approx(1.4)  # halfway in log2(ep)
    assert moe.load_imbalance(features, 2, DEEPSEEK.moe) == pytest.approx(1 + 0.2 / 3)  # from 1.0 at EP 1
    assert moe.load_imbalance(features, 64, DEEPSEEK.moe) == 1.6
    # Routing cannot put more than min(top_k, local experts) copies of a
    # token on a rank: Mixtral (top-2 of 8) carries at most 2x the mean at
    # EP 2 and 4x from EP 4 on; one rank holds every expert at EP 1.
    mixtral = load_model("mixtral-8x7b").moe
    assert [mixtral.most_imbalance(ep) for ep in (1, 2, 4, 8)] == [1.0, 2.0, 4.0, 4.0]
    assert moe.load_imbalance(Features(moe_load_imbalance=100.0), 8, mixtral) == 4.0
    assert moe.load_imbalance(Features(moe_load_imbalance=1.3), 1, mixtral) == 1.0
    # The busiest rank computes and receives more: slower experts and dispatch.
    job = lambda imbalance: mixtral_job(features=Features(moe_load_imbalance=imbalance))  # noqa: E731
    even, uneven = evaluate(job(1.0), layout(dp=64, ep=8)), evaluate(job({8: 1.5}), layout(dp=64, ep=8))
    assert 1.4 * even.step.breakdown_s["ep_comm"] < uneven.step.breakdown_s["ep_comm"] <= 1.5 * even.step.breakdown_s["ep_comm"]
    assert uneven.step.breakdown_s["compute_backward"] > 1.2 * even.step.breakdown_s["compute_backward"]


@pytest.mark.parametrize("value", [0.5, {8: 0.5}, {"x": 2}, {}, {True: 1.2}, "1.2"])
def test_a_load_imbalance_that_is_no_ratio_is_refused(value):
    with pytest.raises(pydantic.ValidationError, match="moe_load_imbalance"):
        Features(moe_load_imbalance=value)


def test_shared_expert_overlap_forbids_recomputing_the_shared_experts():
    job = Job(model=DEEPSEEK, cluster=make_cluster(32), global_batch_size=512, seq_length=4096, features=Features(moe_shared_expert_overlap=True))
    chosen = layout(tp=1, pp=16, dp=16, ep=16, global_batch_size=512, recompute="selective", recompute_modules=("shared_experts",))
    assert any(field == "recompute_modules" for field, _, _ in layout_problems(job, chosen))
    assert not layout_problems(job, layout(tp=1, pp=16, dp=16, ep=16, global_batch_size=512, recompute="selective",
                                           recompute_modules=("moe_act",)))


def test_an_moe_stage_holds_its_routed_token_buffers_for_a_moment():
    job = lambda dispatcher: Job(model=load_model("qwen3-30b-a3b"), cluster=make_cluster(1), global_batch_size=64, seq_length=4096,  # noqa: E731
                                 features=Features(moe_token_dispatcher=dispatcher))
    chosen = layout(pp=2, dp=4, ep=4, global_batch_size=64)
    routed_rows_bytes = 4096 * 8 * 2048 * 2  # tokens x top_k x hidden, 16-bit
    for dispatcher, buffers in (("alltoall", 2), ("hybridep", 1)):
        first_stage = evaluate(job(dispatcher), chosen).memory[0].breakdown_bytes  # no loss buffers there
        assert first_stage["transient"] == pytest.approx(buffers * routed_rows_bytes)


def test_small_messages_per_remote_peer_run_below_the_nic():
    assert moe.message_efficiency(moe.A2A_HALF_BANDWIDTH_PEER_BYTES) == pytest.approx(0.5)
    assert moe.message_efficiency(64 * 2**20) > 0.99
    from loom.planner.cost.collectives import Link

    nic = Link(bandwidth_GBps=45.0, latency_s=0.0, kind="network")
    # Mixtral at 64 tokens per rank sends 128 KiB to each remote peer: half the NIC's rate.
    few = Shape(MIXTRAL, tp=1, cp=1, micro_batch_size=1, sequence_parallel=False, seq_length=64, precision="bf16", features=Features(), ep=8)
    many = Shape(MIXTRAL, tp=1, cp=1, micro_batch_size=1, sequence_parallel=False, seq_length=8192, precision="bf16", features=Features(), ep=8)
    ratio = moe.dispatch_s(many, nic, remote_share=0.5) / moe.dispatch_s(few, nic, remote_share=0.5)
    assert ratio == pytest.approx(0.5 * 8192 / 64, rel=0.02)  # 128x the bytes in about 64x the time


def test_overlapped_dispatch_costs_the_sms_deepep_holds():
    job = lambda dispatcher: Job(model=load_model("qwen3-235b-a22b"), cluster=make_cluster(32), global_batch_size=512,  # noqa: E731
                                 seq_length=4096, features=Features(moe_token_dispatcher=dispatcher, overlap_moe_expert_parallel_comm=True))
    chosen = layout(tp=2, pp=8, vpp=2, dp=16, ep=32, sequence_parallel=True, global_batch_size=512)
    deepep = evaluate(job("deepep"), chosen).step.breakdown_s["ep_comm"]
    assert deepep > 0  # fully hidden, yet 20 of 132 SMs were busy moving tokens
    plain = Job(model=load_model("qwen3-235b-a22b"), cluster=make_cluster(32), global_batch_size=512, seq_length=4096,
                features=Features(moe_token_dispatcher="deepep"))
    assert deepep < evaluate(plain, chosen).step.breakdown_s["ep_comm"]


def test_a_listed_dispatcher_the_features_rule_out_is_refused_not_dropped():
    from loom.planner.specs.errors import SpecError

    job = Job(model=MIXTRAL, cluster=make_cluster(8), global_batch_size=256, seq_length=4096,
              features=Features(overlap_moe_expert_parallel_comm=True), search=SearchFile(moe_token_dispatcher=["allgather"]))
    with pytest.raises(SpecError, match="search.moe_token_dispatcher"):
        search(job, top_k=1)


# --- what each framework runs of the MoE features (fresh-user review, 2026-11-30) ---

import json  # noqa: E402

from loom.planner.output.megatron import megatron_args  # noqa: E402
from loom.planner.specs.model import model_from_hf_config  # noqa: E402
from loom.profiles.catalogue import MODELS_DIR  # noqa: E402
from loom.planner.specs.errors import SpecError  # noqa: E402
from loom.planner.specs.job import check_job  # noqa: E402


def _refused(job: Job) -> str:
    with pytest.raises(SpecError) as refused:
        check_job(job)
    return str(refused.value)


def test_dropped_tokens_are_not_counted_as_model_flops():
    """A capacity factor of 0.1 drops 90% of the routed copies: MFU counts
    the experts' FLOPs the step does, so it stays a fraction of peak."""
    dropping = mixtral_job(features=Features(moe_expert_capacity_factor=0.1))
    plan = evaluate(dropping, layout(pp=2, dp=32, ep=8))
    assert plan.mfu <= 1
    routed = 6 * MIXTRAL.moe.top_k * MIXTRAL.moe.expert_params(MIXTRAL.hidden_size) * MIXTRAL.num_layers
    assert model_flops_per_token(MIXTRAL, 4096) - model_flops_per_token(MIXTRAL, 4096, 0.1) == pytest.approx(0.9 * routed)
    assert model_flops_per_token(MIXTRAL, 4096, 1.5) == model_flops_per_token(MIXTRAL, 4096)


@pytest.mark.parametrize("framework, features, field", [
    ("deepspeed", dict(moe_expert_capacity_factor=0.5), "moe_expert_capacity_factor"),
    ("deepspeed", dict(overlap_moe_expert_parallel_comm=True), "overlap_moe_expert_parallel_comm"),
    ("deepspeed", dict(moe_token_dispatcher="allgather"), "moe_token_dispatcher"),
    ("deepspeed", dict(moe_router_fusion=True), "moe_router_fusion"),
    ("megatron", dict(moe_shared_expert_overlap=True), "moe_shared_expert_overlap"),  # Mixtral has no shared experts
])
def test_moe_features_a_framework_does_not_run_are_refused(framework, features, field):
    assert f"features.{field}" in _refused(mixtral_job(framework=framework, features=Features(**features)))


def test_torchtitans_moe_is_dropless():
    qwen = Job(model=load_model("qwen3-30b-a3b"), cluster=make_cluster(2), global_batch_size=64, seq_length=4096, framework="torchtitan",
               stack="torchtitan", features=Features(moe_expert_capacity_factor=0.5, quantized_experts=False, cross_entropy_fusion="torch"))
    assert "features.moe_expert_capacity_factor" in _refused(qwen)


def test_megatron_core_refusals_of_the_a2a_overlap_are_exit_2():
    """megatron-core: 'overlap_moe_expert_parallel_comm is only supported with
    bf16 or fp16 model', 'MTP layernum only supports 1 when enabling ...'."""
    overlap = Features(overlap_moe_expert_parallel_comm=True)
    assert "precision tf32" in _refused(mixtral_job(precision="tf32", features=overlap))
    two_mtp = replace(DEEPSEEK, mtp_layers=2)
    assert "2 multi-token" in _refused(Job(model=two_mtp, cluster=make_cluster(8), global_batch_size=256, seq_length=4096, features=overlap))


def test_top_1_needs_megatrons_pre_softmax_router():
    """At top-1 megatron-core wants --moe-router-pre-softmax, which weights the
    expert by its probability where Mixtral's router renormalises it to 1."""
    top1 = replace(MIXTRAL, moe=replace(MIXTRAL.moe, top_k=1))
    assert "top-k of at least 2" in _refused(Job(model=top1, cluster=make_cluster(8), global_batch_size=256, seq_length=4096))
    pre = replace(top1, moe=replace(top1.moe, pre_softmax=True))  # a Qwen-style router is what Megatron runs
    check_job(Job(model=pre, cluster=make_cluster(8), global_batch_size=256, seq_length=4096))


def test_deepseek_routers_reach_megatron():
    """DeepSeek-V3's sigmoid, expert-biased, group-limited, scaled router and
    DeepSeek-V2-Lite's unnormalised softmax are written as megatron-core names
    them, and its TransformerConfig takes them."""
    TransformerConfig = pytest.importorskip("megatron.core.transformer").TransformerConfig
    v3 = load_model("deepseek-v3")
    job = Job(model=v3, cluster=make_cluster(8), global_batch_size=256, seq_length=4096)
    lay = layout(tp=1, pp=8, dp=8, ep=8)
    args = " ".join(megatron_args(job, lay, uniform_stages(v3, lay)))
    for flag in ("--moe-router-score-function sigmoid", "--moe-router-enable-expert-bias", "--moe-router-topk-scaling-factor 2.5",
                 "--moe-router-num-groups 8 --moe-router-group-topk 4"):
        assert flag in args
    TransformerConfig(num_layers=4, hidden_size=1024, num_attention_heads=8, num_moe_experts=256, moe_router_topk=8, add_bias_linear=False,
                      moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
                      moe_router_num_groups=8, moe_router_group_topk=4, expert_model_parallel_size=8, moe_token_dispatcher_type="alltoall")
    lite = load_model("deepseek-v2-lite")
    assert lite.moe.pre_softmax and lite.moe.router_groups == 1 and not lite.moe.sigmoid_router
    # A sigmoid router that does not renormalise is not one megatron-core has.
    config = {**json.loads((MODELS_DIR / "deepseek-v3.json").read_text()), "norm_topk_prob": False}
    with pytest.raises(SpecError, match="norm_topk_prob"):
        model_from_hf_config(config, "v3", "config.json")


def test_expert_biases_turn_off_the_bias_dropout_fusion():
    """megatron-core's TEGroupedMLP: 'bias_dropout_fusion is not supported in
    TEGroupedMLP when add_bias_linear=True' (gpt-oss)."""
    oss = load_model("gpt-oss-20b")
    job = Job(model=oss, cluster=make_cluster(8), global_batch_size=256, seq_length=4096)
    lay = layout(dp=64, ep=8)
    assert "--no-bias-dropout-fusion" in megatron_args(job, lay, uniform_stages(oss, lay))
    assert "--no-bias-dropout-fusion" not in megatron_args(mixtral_job(), lay, uniform_stages(MIXTRAL, lay))


@pytest.mark.parametrize("framework, model, dispatcher", [("deepspeed", "mixtral-8x7b", "deepep"), ("torchtitan", "qwen3-30b-a3b", "deepep")])
def test_searched_dispatchers_are_the_frameworks_too(framework, model, dispatcher):
    """search.moe_token_dispatcher cannot list what the framework does not run (DeepSpeed's own all-to-all; torchtitan's qwen3 ignores DeepEP)."""
    from loom.planner.search.layouts import dispatcher_variants
    from loom.planner.specs.job import stack_features

    stack = "torchtitan" if framework == "torchtitan" else "megatron-lm"
    job = Job(model=load_model(model), cluster=make_cluster(8), global_batch_size=256, seq_length=4096, framework=framework, stack=stack,
              features=stack_features(stack, Features()), search=SearchFile(moe_token_dispatcher=["alltoall", dispatcher]))
    with pytest.raises(SpecError, match="search.moe_token_dispatcher"):
        dispatcher_variants(job)
