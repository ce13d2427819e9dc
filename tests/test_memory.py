"""The memory estimator against Korthikanti et al. 2022 (Figure 1) and its
own invariants."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import make_job

from loom.planner.cost.layers import layer_activation_bytes
from loom.planner.cost.shape import Shape
from loom.planner.specs.job import Features, SearchFile
from loom.planner.specs.layout import Layout
from loom.planner.cost.memory import (GiB, StageParams, StateBytes, held_activation_bytes, in_flight_chunks, model_state_bytes,
                                      optimizer_step_bytes, stage_memory, stage_params)
from loom.profiles.catalogue import find_gpu
from loom.planner.plan import evaluate
from loom.planner.specs.model import ModelSpec, load_model
from loom.planner.specs.stages import Chunk, Stage, uniform_stages

UNFUSED = Features(flash_attention=False)
A100, H100 = find_gpu("A100-SXM4-80GB"), find_gpu("H100")


def gpt(run: dict) -> ModelSpec:
    """The GPT-3-style model of a published run (ffn 4h, MHA, dropout 0.1)."""
    h = run["hidden"]
    return ModelSpec(
        name=run["id"], num_layers=run["layers"], hidden_size=h, num_attention_heads=run["heads"],
        num_query_groups=run["heads"], ffn_hidden_size=4 * h, vocab_size=run["vocab"], max_position_embeddings=run["seq"],
        gated_mlp=False, tied_embeddings=True, learned_position_embeddings=True, linear_bias=True, qkv_bias=False,
        normalization="LayerNorm", dropout=0.1, attention_dropout=0.1,
    )


def korthikanti_rows(validation: dict):
    runs = {run["id"]: run for run in validation["runs"]}
    return [(row, runs[row["run"]]) for row in validation["memory"]]


def layout_of(run: dict, sequence_parallel: bool, recompute: str) -> Layout:
    return Layout(tp=run["tp"], pp=run["pp"], dp=run["dp"], cp=1, vpp=run["vpp"] or 1, micro_batch_size=run["mbs"],
                  global_batch_size=run["gbs"], sequence_parallel=sequence_parallel, recompute=recompute)


def test_first_stage_matches_korthikanti_figure_1(validation):
    """Within 5% of every row; the figure counts transformer layers only (its
    figures equal 18 bytes x 12 L h^2 / (t p) exactly), so the state is
    compared for a stage without the embedding. Activations are the whole
    first stage's, embedding included, under the pipeline schedule."""
    for figure, run in korthikanti_rows(validation):
        model = gpt(run)
        for sequence_parallel, recompute, key in [(False, "none", "activations_none_GiB"), (True, "selective", "activations_selective_GiB")]:
            layout = layout_of(run, sequence_parallel, recompute)
            shape = Shape.of(model, layout, run["seq"], "fp16", UNFUSED)
            first = uniform_stages(model, layout)[0]
            memory = stage_memory(shape, layout, first, "megatron", A100)
            activations = memory.breakdown_bytes["activations"] / GiB
            assert activations == pytest.approx(figure[key], rel=0.05), (run["id"], key)
            layers_only = Stage(index=0, chunks=(Chunk(0, first.num_layers),), ranks=first.ranks)
            state_bytes = StateBytes.of("megatron", "fp16", UNFUSED, A100)
            state = sum(model_state_bytes(stage_params(model, layout, layers_only), layout, state_bytes).values()) / GiB
            assert state == pytest.approx(figure["params_and_optimizer_GiB"], rel=0.05), run["id"]


def test_in_flight_micro_batches_follow_the_schedules():
    """1F1B: stage s holds pp - s micro batches; interleaved: Megatron's warm-up + 1."""
    plain = Layout(tp=1, pp=4, dp=1, cp=1, micro_batch_size=1, global_batch_size=16)
    assert [in_flight_chunks(plain, s) for s in range(4)] == [4, 3, 2, 1]
    few = Layout(tp=1, pp=4, dp=1, cp=1, micro_batch_size=1, global_batch_size=2)
    assert in_flight_chunks(few, 0) == 2  # never more than the micro batches there are
    interleaved = Layout(tp=1, pp=4, dp=1, cp=1, vpp=2, micro_batch_size=1, global_batch_size=16)
    assert [in_flight_chunks(interleaved, s) for s in range(4)] == [11, 9, 7, 5]


def _megatron_held_bytes(pp: int, vpp: int, m: int, stage: int, chunk_bytes: tuple[float, ...]) -> float:
    """The peak bytes a stage holds, from megatron-core's own schedule: its
    warm-up count (get_pp_rank_microbatches) and forward table
    (get_schedule_table; a backward runs the chunks in reverse), one
    forward then one backward per steady-state step."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table

    group = SimpleNamespace(size=lambda: pp, rank=lambda: stage)
    communicator = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    total, _, warmup, _ = get_pp_rank_microbatches(m, vpp, pp, p2p_communicator=communicator)
    table = get_schedule_table(m, vpp, pp)
    forward = [table[k][1] for k in range(total)]
    backward = [vpp - 1 - table[k][1] for k in range(total)]
    held, peak, done = 0.0, 0.0, 0
    for k in range(total):
        held += chunk_bytes[forward[k]]
        peak = max(peak, held)
        if k >= warmup:
            held -= chunk_bytes[backward[done]]
            done += 1
    return peak


@pytest.mark.parametrize("pp,vpp,m", [(4, 1, 16), (4, 2, 8), (4, 3, 16), (16, 7, 64), (8, 4, 8), (2, 5, 4)])
def test_uneven_chunks_hold_what_megatrons_schedule_holds(pp, vpp, m):
    """With chunks of different sizes the peak is not the chunk count times
    the largest chunk: the chunks in flight are computed from megatron-core's
    schedule and must match, on every stage."""
    layout = Layout(tp=1, pp=pp, dp=1, cp=1, vpp=vpp, micro_batch_size=1, global_batch_size=m)
    for stage in range(pp):
        chunk_bytes = tuple(float(3 + (7 * stage + 5 * v) % 4) for v in range(vpp))  # uneven, stage by stage
        assert held_activation_bytes(layout, stage, chunk_bytes) == pytest.approx(_megatron_held_bytes(pp, vpp, m, stage, chunk_bytes))
        if len(set(chunk_bytes)) > 1 and in_flight_chunks(layout, stage) > 1:
            assert held_activation_bytes(layout, stage, chunk_bytes) < in_flight_chunks(layout, stage) * max(chunk_bytes)


@pytest.mark.parametrize("pp,vpp,m", [(4, 1, 3), (4, 1, 16), (4, 2, 8), (4, 3, 16), (16, 7, 64), (8, 4, 8), (2, 5, 4), (6, 3, 12)])
def test_an_earlier_stage_holds_at_least_what_a_later_one_does(pp, vpp, m):
    """What the search's fullest_stage relies on: on stages with the same
    chunks, Megatron's schedule never holds more on a later stage, whatever
    the chunk sizes (megatron-core's own schedule table, walked)."""
    sizes = [tuple(float(1 + (3 * k + 5 * v) % 7) for v in range(vpp)) for k in range(6)]
    for chunk_bytes in sizes:
        held = [_megatron_held_bytes(pp, vpp, m, stage, chunk_bytes) for stage in range(pp)]
        assert held == sorted(held, reverse=True)


def test_the_fullest_stage_is_found_without_pricing_every_stage():
    """Uneven splits, dense first layers and mixed GPUs: the fullest stage
    found from the first stage of each kind is the fullest of all."""
    from loom.planner.cost.layers import shape_of
    from loom.planner.cost.memory import stage_memory
    from loom.planner.search.layouts import fullest_stage
    from loom.planner.specs.stages import default_placement, stage_gpus

    mixed = replace(make_job("llama-3-70b", nodes=4, gbs=64).cluster, nodes=tuple(
        replace(node, gpu=find_gpu("A100-80GB" if i % 2 else "H100")) for i, node in enumerate(make_job("llama-3-70b", nodes=4).cluster.nodes)))
    cases = [
        (make_job("llama-3-70b", nodes=4, gbs=64), Layout(tp=4, pp=8, dp=1, cp=1, vpp=3, micro_batch_size=1, global_batch_size=64, sequence_parallel=True)),
        (make_job("deepseek-v3", nodes=32, gbs=256, seq=4096), Layout(tp=2, pp=16, dp=8, cp=1, ep=8, micro_batch_size=1, global_batch_size=256,
                                                                      sequence_parallel=True, distributed_optimizer=True)),
        (replace(make_job("llama-3-70b", nodes=4, gbs=64), cluster=mixed), Layout(tp=4, pp=8, dp=1, cp=1, micro_batch_size=1, global_batch_size=64,
                                                                                   sequence_parallel=True)),
    ]
    for job, layout in cases:
        stages = uniform_stages(job.model, layout)
        gpus = stage_gpus(job.cluster, default_placement(job.cluster, layout.world_size), stages)
        shape = shape_of(job, layout)
        every = max(stage_memory(shape, layout, stage, job.framework, gpu).peak_bytes / gpu.memory_bytes for stage, gpu in zip(stages, gpus))
        fullest = fullest_stage(job, layout, gpus)
        assert fullest.peak_bytes / fullest.capacity_bytes == pytest.approx(every)


def test_405b_with_uneven_interleaving_holds_the_chunks_in_flight():
    """Llama-3 405B TP8 PP16 VPP7 (126 layers: chunks of 1 and 2 layers)
    holds about what VPP4 holds, not 7 x 16 chunks of the largest size."""
    job = make_job("llama-3-405b", nodes=128, gbs=128, seq=8192)
    peaks = {}
    for vpp in (4, 7):
        layout = Layout(tp=8, pp=16, dp=8, cp=1, vpp=vpp, micro_batch_size=1, global_batch_size=128, sequence_parallel=True)
        peaks[vpp] = max(m.breakdown_bytes["activations"] for m in evaluate(job, layout).memory) / GiB
    assert peaks[7] == pytest.approx(peaks[4], rel=0.05)



def test_metas_405b_layout_on_megatron_holds_what_megatrons_own_formula_holds():
    """Meta's Llama-3 405B layout (TP8 PP16 DP64, 8K, no recompute) on
    Megatron-LM: the first stage holds 16 micro batches of its 7 layers, as
    Megatron-LM's own estimate says (megatron/training/
    theoretical_memory_usage.py compute_activation_memory: s b h (18 + 4
    ffn/h) / t per layer with SP, times pp micro batches in flight): 54 GiB
    by that formula, 64 GiB by loom's, which also counts the SwiGLU's second
    half (that formula's 4 ffn/h is a GeLU MLP's; a gated one saves 6 ffn/h).
    Either way it does not fit beside Megatron-LM's unsharded fp32 gradient
    buffer; sharded as Meta did (FSDP over the 64 data-parallel ranks,
    Megatron-FSDP) it fits. Interleaving holds more on the first stage
    (that file's penalty 1 + (pp-1)/(pp vpp)), not less."""
    job = make_job("llama-3-405b", nodes=1024, gbs=2048, seq=8192)
    layout = Layout(tp=8, pp=16, dp=64, cp=1, micro_batch_size=1, global_batch_size=2048, sequence_parallel=True,
                    distributed_optimizer=True)
    plan = evaluate(job, layout)
    model = job.model
    first = plan.memory[0]
    layers_first = plan.stages[0].num_layers
    megatron_per_layer = 8192 * model.hidden_size * (18 + 4 * model.ffn_hidden_size / model.hidden_size) / 8
    megatron_first_stage = megatron_per_layer * layers_first * 16
    assert first.breakdown_bytes["activations"] == pytest.approx(megatron_first_stage, rel=0.20)
    assert not plan.fits
    assert evaluate(job, replace(layout, fsdp=64)).fits
    interleaved = evaluate(job, replace(layout, vpp=2)).memory[0].breakdown_bytes["activations"]
    assert interleaved == pytest.approx(first.breakdown_bytes["activations"] * (1 + 15 / 32), rel=0.05)

def test_recompute_and_sequence_parallel_shrink_activations():
    job = make_job("llama-3-8b")
    sizes = {}
    for sp, recompute in [(False, "none"), (True, "none"), (True, "selective"), (True, "full")]:
        layout = Layout(tp=4, pp=1, dp=16, cp=1, micro_batch_size=1, global_batch_size=512, sequence_parallel=sp, recompute=recompute)
        sizes[(sp, recompute)] = layer_activation_bytes(Shape.of(job.model, layout, 8192, "bf16", Features(flash_attention=False)), recompute)
    assert sizes[(False, "none")] > sizes[(True, "none")] > sizes[(True, "selective")] > sizes[(True, "full")]
    # Full recompute keeps only the layer input, split over TP with SP: 2 bytes x T x h / t.
    assert sizes[(True, "full")] == 2 * 8192 * 4096 / 4


def test_flash_attention_removes_the_quadratic_term():
    job = make_job("llama-3-8b")
    per_seq = {}
    for flash in (True, False):
        for seq in (4096, 8192):
            layout = Layout(tp=1, pp=1, dp=64, cp=1, micro_batch_size=1, global_batch_size=512)
            shape = Shape.of(job.model, layout, seq, "bf16", Features(flash_attention=flash))
            per_seq[(flash, seq)] = layer_activation_bytes(shape, "none")
    assert per_seq[(True, 8192)] / per_seq[(True, 4096)] == pytest.approx(2.0, rel=0.01)  # linear in s
    assert per_seq[(False, 8192)] / per_seq[(False, 4096)] > 2.5  # the s^2 scores dominate


def test_context_parallel_splits_activations():
    job = make_job("llama-3-8b")
    sizes = [layer_activation_bytes(Shape.of(job.model, Layout(tp=2, pp=1, dp=1, cp=cp, micro_batch_size=1, global_batch_size=1,
                                                              sequence_parallel=True), 8192, "bf16", Features()), "none")
             for cp in (1, 2, 4)]
    assert sizes[0] == pytest.approx(2 * sizes[1]) and sizes[1] == pytest.approx(2 * sizes[2])


def test_optimizer_sharding():
    """Megatron: 18 bytes/param, 6 + 12/d with the distributed optimizer
    (fp32 gradient buffer), 4 + 12/d with a 16-bit one (Megatron-Bridge's
    recipes); DeepSpeed ZeRO 1/2/3 shard optimizer, then gradients, then weights."""
    d = 8
    params = StageParams(total=1e9, linear=1e9, expert=0.0)
    plain = Layout(tp=1, pp=1, dp=d, cp=1, micro_batch_size=1, global_batch_size=8)
    distributed = Layout(tp=1, pp=1, dp=d, cp=1, micro_batch_size=1, global_batch_size=8, distributed_optimizer=True)
    fp32_grads = StateBytes.of("megatron", "bf16", Features(), H100)
    bf16_grads = StateBytes.of("megatron", "bf16", Features(grad_reduce_in_fp32=False), H100)
    assert sum(model_state_bytes(params, plain, fp32_grads).values()) == 18 * params.total
    assert sum(model_state_bytes(params, distributed, fp32_grads).values()) == pytest.approx((6 + 12 / d) * params.total)
    assert sum(model_state_bytes(params, distributed, bf16_grads).values()) == pytest.approx((4 + 12 / d) * params.total)
    deepspeed = StateBytes.of("deepspeed", "bf16", Features(), H100)
    zero = [sum(model_state_bytes(params, Layout(tp=1, pp=1, dp=d, cp=1, micro_batch_size=1, global_batch_size=8, zero_stage=z,
                                                 fsdp=d if z == 3 else 0), deepspeed).values()) for z in (0, 1, 2, 3)]
    assert zero == pytest.approx([16 * params.total, (4 + 12 / d) * params.total, (2 + 14 / d) * params.total, 16 / d * params.total])


@pytest.mark.parametrize("recipe,param_gather,gpu,weight,copies", [
    ("delayed", False, "H100", 2, 2),  # bf16 weight + TE's cached fp8 copy and its transpose
    ("tensorwise", True, "H100", 1, 1),  # the fp8 weight itself + its transpose
    ("tensorwise", True, "B200", 1, 0),  # Blackwell: one fp8 copy serves both GEMM layouts
    ("tensorwise", False, "B200", 2, 1),
    ("mxfp8", True, "B200", 0, 2 * 33 / 32),  # both directions with their scales; the bf16 gather reuses the grad buffer
])
def test_fp8_weights_cost_what_transformer_engine_keeps(recipe, param_gather, gpu, weight, copies):
    state = StateBytes.of("megatron", "fp8", Features(fp8_recipe=recipe, fp8_param_gather=param_gather), find_gpu(gpu))
    assert (state.gemm_weight, state.fp8_copies) == pytest.approx((weight, copies))
    assert state.weight == 2  # norms, embeddings and the output layer stay 16-bit


def test_the_optimizer_step_copies_a_16_bit_gradient_shard_to_fp32():
    """With a 16-bit gradient buffer the distributed optimizer's step holds an
    fp32 copy of its shard (4/d bytes per parameter); with an fp32 buffer it
    is a view. DeepSpeed's ZeRO converts its partition too, ZeRO-3 a sub
    group of at most 1e9 elements at a time; none when the host steps."""
    params = StageParams(total=1e9, linear=1e9, expert=0.0)
    layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8, distributed_optimizer=True)
    assert optimizer_step_bytes(params, layout, StateBytes.of("megatron", "bf16", Features(grad_reduce_in_fp32=False), H100), "megatron") == 4e9 / 8
    assert optimizer_step_bytes(params, layout, StateBytes.of("megatron", "bf16", Features(), H100), "megatron") == 0
    deepspeed = StateBytes.of("deepspeed", "bf16", Features(), H100)
    zero2 = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8, zero_stage=2)
    assert optimizer_step_bytes(params, zero2, deepspeed, "deepspeed") == 4e9 / 8
    big = StageParams(total=64e9, linear=64e9, expert=0.0)
    zero3 = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8, zero_stage=3, fsdp=8)
    assert optimizer_step_bytes(big, zero3, deepspeed, "deepspeed") == 4e9
    assert optimizer_step_bytes(params, Layout(**{**zero2.as_dict(), "optimizer_offload": True}), deepspeed, "deepspeed") == 0


def test_embedding_and_head_land_on_the_end_stages():
    """The first stage carries the embedding, the last the LM head and the
    fp32 softmax of the logits; a 128K vocabulary makes both sizeable."""
    job = make_job("llama-3-8b")
    layout = Layout(tp=1, pp=4, dp=16, cp=1, micro_batch_size=1, global_batch_size=512, recompute="full")
    stages = uniform_stages(job.model, layout)
    shape = Shape.of(job.model, layout, 8192, "bf16", Features())
    weights = [stage_memory(shape, layout, stage, "megatron", H100).breakdown_bytes["weights"] for stage in stages]
    embedding_bytes = 2 * job.model.vocab_size * job.model.hidden_size
    assert weights[0] - weights[1] == pytest.approx(embedding_bytes, rel=0.01)
    assert weights[3] - weights[1] == pytest.approx(embedding_bytes, rel=0.01)
    last = stage_memory(shape, layout, stages[3], "megatron", H100).breakdown_bytes
    # Megatron's unfused loss saves the fp32 softmax and briefly holds the
    # 16-bit logits beside it: 6 bytes per logit at its peak.
    logits = 8192 * job.model.vocab_size
    assert last["transient"] == pytest.approx(2 * logits, rel=0.01)


def test_transformer_engines_fused_loss_keeps_the_logits_only():
    """TE's fused cross-entropy writes the gradient into the 16-bit logits and
    saves those: 2 bytes per logit, nothing beside it."""
    job = make_job("llama-3-8b")
    layout = Layout(tp=1, pp=4, dp=16, cp=1, micro_batch_size=1, global_batch_size=512)
    last = uniform_stages(job.model, layout)[3]
    unfused, fused = (stage_memory(Shape.of(job.model, layout, 8192, "bf16", Features(cross_entropy_fusion=impl)), layout, last, "megatron", H100)
                      for impl in ("none", "te"))
    logits = 8192 * job.model.vocab_size
    assert fused.breakdown_bytes["transient"] == 0
    assert unfused.breakdown_bytes["activations"] - fused.breakdown_bytes["activations"] == pytest.approx(2 * logits)


def test_recompute_modules_drop_what_they_re_run():
    """Each of megatron-core's recompute modules frees its own tensors: the
    attention core its log-sum-exp, moe_act the routed experts' activations
    (the down projections' inputs), moe the whole MoE MLP, mla_up_proj MLA's
    Q, K, V, mlp a dense layer's MLP and its input."""
    from loom.planner.cost.activations import decoder_layer, layer_parts

    mixtral = load_model("mixtral-8x7b")
    layout = Layout(tp=2, pp=1, dp=4, cp=1, ep=4, micro_batch_size=1, global_batch_size=8, sequence_parallel=True)
    shape = Shape.of(mixtral, layout, 4096, "bf16", Features())
    parts = layer_parts(shape, "moe")
    none = decoder_layer(shape, "none", "moe")
    assert none == pytest.approx(sum(parts.values()))
    routed = shape.moe_tokens * mixtral.moe.top_k
    assert none - decoder_layer(shape, "selective", "moe", ("moe_act",)) == pytest.approx(2 * routed * mixtral.moe.expert_ffn_hidden_size)
    assert none - decoder_layer(shape, "selective", "moe", ("moe",)) == pytest.approx(parts["routed"] + parts["routed_activation"] + parts["router"])
    assert decoder_layer(shape, "selective", "moe") == pytest.approx(none - parts["core_attention"])  # core_attn by default
    deepseek = load_model("deepseek-v3")
    shape = Shape.of(deepseek, layout, 4096, "bf16", Features())
    assert decoder_layer(shape, "none") - decoder_layer(shape, "selective", "dense", ("mla_up_proj",)) == pytest.approx(layer_parts(shape)["qkv"])
    dense = layer_parts(shape)
    assert decoder_layer(shape, "none") - decoder_layer(shape, "selective", "dense", ("mlp",)) == pytest.approx(dense["mlp"] + dense["mlp_input"])


def test_block_recompute_lies_between_none_and_full():
    """Recomputing the first N layers of each chunk: activations fall and
    recompute time grows with N; every layer is the same as full."""
    job = make_job("llama-3-70b", nodes=8, gbs=64, seq=8192)
    base = Layout(tp=4, pp=8, dp=2, cp=1, vpp=2, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, distributed_optimizer=True)
    per_chunk = job.model.num_layers // (base.pp * base.vpp)
    figures = []
    for layout in [base] + [replace(base, recompute="full", recompute_num_layers=n) for n in range(1, per_chunk)] + [replace(base, recompute="full")]:
        plan = evaluate(job, layout)
        figures.append((plan.memory[0].breakdown_bytes["activations"], plan.step.breakdown_s["recompute"]))
    activations, recompute = zip(*figures)
    assert all(a > b for a, b in zip(activations, activations[1:]))
    assert all(a < b for a, b in zip(recompute, recompute[1:]))
    every = evaluate(job, replace(base, recompute="full", recompute_num_layers=per_chunk))
    assert every.step_time_s == pytest.approx(evaluate(job, replace(base, recompute="full")).step_time_s)


def test_the_search_recomputes_only_what_a_layout_needs_to_fit(tmp_path):
    """Where a layout fits only by recomputing, the search offers the least
    recomputation that fits (some layers per chunk, or some modules):
    faster than recomputing every layer, and the layout without any does
    not fit."""
    from loom.planner.search.layouts import search

    job = replace(make_job("llama-3-70b", nodes=8, gbs=128, seq=8192), top_k=10,
                  search=SearchFile(cp=[1], vpp=[1], recompute=["none", "full"]))
    partial = [plan for plan in search(job, 10).plans if plan.layout.recompute_num_layers or plan.layout.recompute_modules]
    assert partial
    for plan in partial:
        assert plan.leaves_headroom
        full = evaluate(job, replace(plan.layout, recompute="full", recompute_modules=(), recompute_num_layers=0))
        none = evaluate(job, replace(plan.layout, recompute="none", recompute_modules=(), recompute_num_layers=0))
        assert plan.step_time_s < full.step_time_s and not none.leaves_headroom


def test_recomputed_modules_rematerialise_one_layers_activations_in_backward():
    """Selective recompute of the MoE module saves its activations in forward
    and brings one layer's back in backward: the peak holds them for a moment."""
    from loom.planner.cost.layers import shape_of

    job = make_job("mixtral-8x7b", nodes=8, gbs=256, seq=4096)
    modules = ("moe", "moe_act", "layernorm")
    lay = Layout(tp=1, pp=4, dp=16, cp=1, ep=8, micro_batch_size=1, global_batch_size=256, distributed_optimizer=True,
                 recompute="selective", recompute_modules=modules)
    shape = shape_of(job, lay)
    rematerialised = layer_activation_bytes(shape, "none", "moe") - layer_activation_bytes(shape, "selective", "moe", modules)
    assert rematerialised > 0.5 * GiB
    assert evaluate(job, lay).memory[0].breakdown_bytes["transient"] >= rematerialised
