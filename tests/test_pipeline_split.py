"""The planner's use of the partition solver: uneven splits where they pay,
per-stage memory respected, mixed GPU types, and launch flags that say it."""

from __future__ import annotations

from dataclasses import replace

from conftest import make_job
from test_emit_megatron import placement_from_launch

from loom.planner.specs.cluster import parse_cluster
from loom.planner.output.launch import launch_files
from loom.planner.output.megatron import megatron_args
from loom.planner.specs.job import SearchFile
from loom.planner.specs.layout import Layout
from loom.planner.search.split import partition_problem, solve_split
from loom.planner.plan import build_plan
from loom.planner.specs.stages import uniform_stages
from loom.planner.cost.time_model import closed_form_step, step_parts
from loom.planner.search.layouts import search
from loom.solvers.partition import evaluate_partition

LLAMA_PP4 = Layout(tp=2, pp=4, dp=8, cp=1, micro_batch_size=1, global_batch_size=512, sequence_parallel=True, distributed_optimizer=True)


def test_a_heavy_lm_head_moves_layers_off_the_last_stage():
    """Llama-3 8B's 128K-vocabulary head costs about three decoder layers: the
    last stage takes fewer layers and the step gets faster than the even split."""
    job = make_job("llama-3-8b")
    split = solve_split(job, LLAMA_PP4, time_limit_s=10)
    assert split.solution.status == "optimal"
    layers = [stage.num_layers for stage in split.stages]
    assert sum(layers) == 32 and layers[-1] < 8
    even, uneven = build_plan(job, LLAMA_PP4), build_plan(job, LLAMA_PP4, split.stages, split.placement)
    assert uneven.fits and uneven.step_time_s < 0.95 * even.step_time_s


def test_the_solver_problem_prices_what_the_time_model_prices():
    """The uniform split's objective in the solver's terms equals the closed
    form's pipeline part (compute, recompute, TP/CP comm and bubble)."""
    job = make_job("llama-3-8b")
    problem = partition_problem(job, LLAMA_PP4)
    stages = uniform_stages(job.model, LLAMA_PP4)
    closed = closed_form_step(step_parts(job, LLAMA_PP4, stages, [job.cluster.slowest.gpu] * 4))
    # Entries of the layer list: the embedding, 32 decoder layers, the head.
    sizes = tuple(stage.num_layers + stage.embedding + stage.head for stage in stages)
    solver_step = evaluate_partition(problem, sizes)
    pipeline_keys = ("compute_forward", "compute_backward", "recompute", "tp_comm", "cp_comm", "pipeline_bubble")
    assert abs(solver_step - sum(closed.breakdown_s[k] for k in pipeline_keys)) < 1e-6 * solver_step


def test_the_search_uses_the_solver_and_reports_it():
    job = replace(make_job("llama-3-8b", nodes=4, gbs=256), search=SearchFile(tp=[2], pp=[4], cp=[1], vpp=[1], micro_batch_size=[1], recompute=["selective"], distributed_optimizer=[True]))
    result = search(job, top_k=1)
    best = result.plans[0]
    assert "bottleneck" in result.solver and result.status == "optimal"
    assert [stage.num_layers for stage in best.stages] != [8, 8, 8, 8]
    flags = megatron_args(job, best.layout, list(best.stages))
    assert "--decoder-last-pipeline-num-layers" in flags or "--pipeline-model-parallel-layout" in flags


def test_mixed_gpus_get_layers_by_speed_and_memory(tmp_path):
    """Half the nodes A100-40GB, half H100: the faster, larger H100 groups take
    more layers; every stage fits its own GPU; the placement puts each stage
    on the device group the solver chose."""
    base = {"nodes": 4, "gpus_per_node": 8, "gpu": "A100-40GB", "nvlink_GBps": 300, "nics_per_node": 8, "nic_Gbps": 200}
    cluster = parse_cluster({**base, "node_overrides": [{"node": 2, "gpu": "H100"}, {"node": 3, "gpu": "H100"}]}, "mixed")
    job = replace(make_job("llama-3-8b", gbs=128, seq=4096), cluster=cluster)
    layout = Layout(tp=2, pp=4, dp=4, cp=1, micro_batch_size=1, global_batch_size=128, sequence_parallel=True, distributed_optimizer=True)
    split = solve_split(job, layout, time_limit_s=20)
    assert split.solution.status == "optimal"
    plan = build_plan(job, layout, split.stages, split.placement)
    assert plan.fits
    gpu_of_stage = [cluster.node_of_host[plan.placement.host_of(stage.ranks[0])].gpu.name for stage in plan.stages]
    h100 = [stage.num_layers for stage, gpu in zip(plan.stages, gpu_of_stage) if gpu.startswith("H100")]
    a100 = [stage.num_layers for stage, gpu in zip(plan.stages, gpu_of_stage) if gpu.startswith("A100")]
    assert len(h100) == len(a100) == 2 and min(h100) > max(a100)
    even = build_plan(job, layout)
    assert plan.step_time_s < even.step_time_s
    # train.sh, run on the job's nodes in the cluster's order, starts each stage where planned.
    script = launch_files(job, layout, list(plan.stages), plan.placement)["train.sh"]
    assert placement_from_launch(tmp_path, script, cluster.hosts, named=False) == list(plan.placement.gpus)


def test_a_vision_tower_partitions_with_the_first_stage():
    """LLaVA: the ViT and projector run with the text embedding on the first
    chunk. A heavier tower pushes decoder layers off the first stage."""
    from loom.planner.specs.model import load_model

    llava = load_model("llava-1.5-7b")
    assert llava.vision.image_tokens == 576 and abs(llava.total_params() / 7.06e9 - 1) < 0.01
    layout = Layout(tp=1, pp=4, dp=16, cp=1, micro_batch_size=1, global_batch_size=256, distributed_optimizer=True)
    splits = {}
    for vision_layers in (24, 120):
        tower = replace(llava.vision, encoder=replace(llava.vision.encoder, num_layers=vision_layers))
        job = replace(make_job("llama-3-8b", gbs=256, seq=2048), model=replace(llava, vision=tower))
        split = solve_split(job, layout, time_limit_s=20)
        plan = build_plan(job, layout, split.stages, split.placement)
        assert plan.fits and plan.stages[0].vision and not any(stage.vision for stage in plan.stages[1:])
        assert sum(stage.num_layers for stage in plan.stages) == llava.num_layers
        splits[vision_layers] = [stage.num_layers for stage in plan.stages]
        # Optimal for the MILP's own 1F1B formula; the simulated schedule can
        # still favour the even split by ~1% (24 layers), which is why the
        # search keeps the better of the two.
        even = tuple(stage.num_layers for stage in uniform_stages(job.model, layout))
        problem = partition_problem(job, layout)
        assert split.solution.objective_s <= evaluate_partition(problem, (even[0] + 1, *even[1:-1], even[-1] + 1)) * (1 + 1e-9)
    assert splits[120][0] < splits[24][0] and splits[120][0] < max(splits[120][1:])


def test_a_group_over_mixed_gpus_fits_the_smallest_memory():
    """H20s (slow, 96 GB) beside H100s (fast, 80 GB): a stage spanning both
    runs at the H20's pace in the H100's memory, so a layout that needs 87
    GiB does not fit, as on H100s alone."""
    from loom.planner.plan import evaluate
    from loom.planner.specs.job import Job
    from loom.planner.specs.model import load_model

    base = {"nodes": 8, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    mixed = parse_cluster({**base, "node_overrides": [{"node": n, "gpu": "H20"} for n in range(4, 8)]}, "mixed")
    layout = Layout(tp=8, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=512, sequence_parallel=True, recompute="selective",
                    distributed_optimizer=True)
    plans = {name: evaluate(Job(model=load_model("llama-3-70b"), cluster=cluster, global_batch_size=512, seq_length=8192), layout)
             for name, cluster in (("h100", parse_cluster(base, "h100")), ("mixed", mixed))}
    assert plans["mixed"].capacity_bytes == plans["h100"].capacity_bytes
    assert not plans["mixed"].fits and not plans["h100"].fits
    assert plans["mixed"].step_time_s > plans["h100"].step_time_s  # at the H20's pace
