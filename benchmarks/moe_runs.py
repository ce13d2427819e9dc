"""MoE step time against runs that happened, and the plans `loom plan`
makes for Mixtral 8x7B on 64 H100 and DeepSeek-V3 on 1,024 H100.

    python benchmarks/moe_runs.py

1. Every ``family: moe`` row of ``shared/validation/nvidia_perf_runs.yaml``
   (NVIDIA's tables, 25.09 and 26.02), with the MoE settings its recipe ran
   (profiles/published.py NVIDIA_MOE_RECIPES; "token-drop" rows pad every
   expert to capacity 1.0). NVIDIA force-balances the routing (imbalance 1.0).
2. Megatron-Bridge's 25.11 summary rows (docs/performance-summary.md): the
   H100 Qwen3 row prints no global batch size; 2,048 is assumed.
3. NVIDIA's Megatron MoE team's H100 Qwen3-235B-A22B table
   (yanring/Megatron-MoE-ModelZoo best_practice/qwen3/readme.md at e865051:
   256 H100, BF16, sequence 4,096, global batch 2,048), each row's layout,
   dispatcher, recompute modules and 1F1B A2A overlap as printed, the rest
   from its model_configs/benchmarking/Qwen3-235B-A22B.yaml (router and
   permute fusion, TE cross-entropy fusion, sequence parallelism, expert TP
   1). Unknown, assumed: balanced routing (the table does not say whether
   --moe-router-force-load-balancing was on).
4. Megatron-LM's own MoE recipes (NVIDIA/Megatron-LM dev branch at d48bd6b,
   examples/moe_recipes): each recipe's arguments and the README's median
   TFLOP/s per GPU, turned into a step time with Megatron-LM's FLOPs count
   (compute.megatron_flops_per_token). Recipes that capture CUDA graphs
   (partial) are priced eager and printed, not counted; left out: those
   without a figure, with paged stash and whole-iteration graphs, with
   activation offload, on GB300 or B300, and DeepSeek-V4.
5. Two field reports: Mixtral 8x7B on 16 H100 (measured 5.58 s per step) and
   Qwen3-30B-A3B on 32 H100 (about 120 TFLOP/s per GPU, Megatron-LM's
   count: compute.megatron_flops_per_token). Unknowns assumed:
   bf16, Megatron-LM's defaults otherwise (expert TP = TP, dropless, no
   fused kernels; loom's alltoall dispatcher), sequence 4,096 and global
   batch 256 for Qwen3.

Each row prints loom's error and the largest parts of its step; the summary
gives the median and largest |error| over all rows.
"""

from __future__ import annotations

import statistics

from loom.planner.cost.compute import megatron_flops_per_token
from loom.planner.plan import evaluate
from loom.planner.search.layouts import search
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Features, Job, stack_features
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.profiles.published import DGX, NVIDIA_RUNS, nvidia_runs

# (model, system, GPUs, global batch, seq, tp, pp, vp, ep, published tokens/s/GPU)
SUMMARY_2511 = [
    ("qwen3-235b-a22b", "DGX-H100", 256, 2048, 4096, 2, 8, 4, 32, 1575),
    ("qwen3-235b-a22b", "DGX-B200", 64, 1024, 4096, 1, 8, 2, 8, 3269),
    ("deepseek-v3", "DGX-B200", 256, 2048, 4096, 1, 16, 1, 8, 2139),
]
QWEN3_30B = str(NVIDIA_RUNS.parent / "models/qwen3-30b-a3b/config.json")


def _cluster(system: str, gpus: int, name: str):
    return parse_cluster({**DGX[system], "nodes": gpus // 8}, name)


def _row(name: str, layout: Layout, published_s: float, plan) -> float:
    error = plan.step_time_s / published_s - 1
    parts = sorted(plan.step.breakdown_s.items(), key=lambda item: -item[1])[:3]
    shares = ", ".join(f"{part} {seconds / plan.step_time_s:.0%}" for part, seconds in parts)
    print(f"{name:<34} {layout.label():<32} {published_s:>7.2f} {plan.step_time_s:>7.2f} {error:>+7.1%}  {shares}")
    return error


def published_runs() -> list[float]:
    errors = []
    print(f"{'run':<34} {'layout':<32} {'ran s':>7} {'loom s':>7} {'error':>7}  largest parts of loom's step")
    for run in nvidia_runs():
        if run.job is None or run.row["family"] != "moe":
            continue
        errors.append(_row(run.row["id"], run.layout, run.step_time_s, evaluate(run.job, run.layout)))
    for model, system, gpus, batch, seq, tp, pp, vp, ep, published in SUMMARY_2511:
        job = Job(model=load_model(model), cluster=_cluster(system, gpus, "published"), global_batch_size=batch, seq_length=seq,
                  precision="fp8", stack="megatron-bridge", features=stack_features("megatron-bridge", Features(fp8_recipe="tensorwise")))
        layout = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), cp=1, ep=ep, vpp=vp, micro_batch_size=1, global_batch_size=batch,
                        sequence_parallel=tp > 1, distributed_optimizer=True)
        errors.append(_row(f"mb2511-{system[4:].lower()}-{model}-{gpus}", layout, batch * seq / (published * gpus), evaluate(job, layout)))
    return errors


# (label, dispatcher, tp, pp, vpp, ep, dp, fsdp, micro batch, recompute, its modules, A2A overlap, published s per step)
MOE_TEAM_QWEN3_235B = [
    ("deepep cross-node EP32", "deepep", 2, 8, 4, 32, 16, 0, 1, "selective", ("moe_act", "layernorm"), False, 19.7),
    ("deepep cross-node EP32 + 1f1b overlap", "deepep", 2, 8, 4, 32, 16, 0, 1, "selective", ("moe_act", "layernorm"), True, 17.6),
    ("deepep EP8 Megatron-FSDP", "deepep", 2, 1, 1, 8, 128, 128, 4, "full", (), False, 17.6),
    ("alltoall EP8 PP32", "alltoall", 2, 32, 3, 8, 4, 0, 1, "selective", ("moe_act", "layernorm"), False, 24.2),
    ("deepep EP8 TP4", "deepep", 4, 8, 4, 8, 8, 0, 1, "none", (), False, 29.0),
]


def moe_team_runs() -> list[float]:
    errors = []
    cluster = _cluster("DGX-H100", 256, "moe-team")
    for label, dispatcher, tp, pp, vpp, ep, dp, fsdp, mbs, recompute, modules, overlap, published_s in MOE_TEAM_QWEN3_235B:
        features = Features(moe_token_dispatcher=dispatcher, moe_router_fusion=True, moe_permute_fusion=True, cross_entropy_fusion="te",
                            overlap_moe_expert_parallel_comm=overlap)
        job = Job(model=load_model("qwen3-235b-a22b"), cluster=cluster, global_batch_size=2048, seq_length=4096, features=features)
        layout = Layout(tp=tp, pp=pp, dp=dp, cp=1, ep=ep, vpp=vpp, micro_batch_size=mbs, global_batch_size=2048, sequence_parallel=True,
                        distributed_optimizer=True, fsdp=fsdp, recompute=recompute, recompute_modules=modules)
        try:
            plan = evaluate(job, layout)
        except SpecError as refused:  # e.g. a chunk holding only the embedding or the loss (--account-for-*-in-pipeline-split)
            print(f"{'moe-team: ' + label:<34} {layout.label():<32} {published_s:>7.2f}  not priced: {refused}")
            continue
        errors.append(_row(f"moe-team: {label}", layout, published_s, plan))
    return errors


# Megatron-LM's own MoE recipes (NVIDIA/Megatron-LM dev branch at d48bd6b,
# examples/moe_recipes: README "Median TFLOP/s/GPU" in Megatron-LM's count,
# each recipe's ARGS): (label, model, system, GPUs, tp, pp, vpp, ep, micro
# batch, global batch, dispatcher, A2A overlap, precision, fp8 recipe,
# recompute modules ("" none), CUDA graph scope ("" none), TFLOP/s/GPU).
# Every recipe forces balanced routing and fuses router and permutation.
MEGATRON_RECIPES = [
    ("qwen3_30b/h100/bf16_32GPU_TP1PP1EP8", QWEN3_30B, "DGX-H100", 32, 1, 1, 1, 8, 1, 256, "hybridep", False, "bf16", "tensorwise", "", "", 234.1),
    ("qwen3_30b/h100/fp8_32GPU_TP1PP1EP8", QWEN3_30B, "DGX-H100", 32, 1, 1, 1, 8, 1, 256, "hybridep", False, "fp8", "blockwise", "",
     "moe_router moe_preprocess", 232.4),
    ("qwen3_30b/gb200/bf16_16GPU_TP1PP1EP16", QWEN3_30B, "GB200", 16, 1, 1, 1, 16, 4, 512, "hybridep", False, "bf16", "tensorwise", "", "", 528.0),
    ("qwen3_30b/gb200/mxfp8_16GPU_TP1PP1EP16_partial_cg", QWEN3_30B, "GB200", 16, 1, 1, 1, 16, 4, 512, "hybridep", False, "fp8", "mxfp8", "",
     "attn moe_router moe_preprocess", 514.0),
    ("qwen3_235b/h100/bf16_256GPU_TP2PP8EP32", "qwen3-235b-a22b", "DGX-H100", 256, 2, 8, 4, 32, 1, 2048, "hybridep", True, "bf16", "tensorwise",
     "moe_act layernorm", "moe_router moe_preprocess", 214.3),
    # 94 layers and the embedding and loss as one layer each in 4 x 12 chunks of 2 (--account-for-*-in-pipeline-split):
    # priced as 94 layers over 48 chunks.
    ("qwen3_235b/b200/mxfp8_128GPU_TP2PP4EP16", "qwen3-235b-a22b", "DGX-B200", 128, 2, 4, 12, 16, 3, 3072, "deepep", True, "fp8", "mxfp8", "", "",
     633.9),
    ("qwen3_235b/gb200/mxfp8_128GPU_TP1PP1EP64_partial_cg_overlap", "qwen3-235b-a22b", "GB200", 128, 1, 1, 1, 64, 1, 8192, "hybridep", True,
     "fp8", "mxfp8", "", "attn moe_router moe_preprocess", 1018.0),
    # pipeline_model_parallel_layout Et*4|(tttt|)*14tmL: 16 chunks of 61 layers, the MTP module and loss in the last.
    ("deepseek_v3/b200/mxfp8_256GPU_TP1PP8EP32", "deepseek-v3", "DGX-B200", 256, 1, 8, 2, 32, 1, 2048, "deepep", True, "fp8", "mxfp8",
     "mla_up_proj mlp", "", 776.7),
]
# GB200 NVL72 trays, 64 GPUs (16 trays) of a rack used as one NVLink domain (examples/gb200-nvl72-256.yaml).
GB200_TRAYS = {"gpus_per_node": 4, "gpu": "GB200", "nvlink_GBps": 900, "nics_per_node": 4, "nic_Gbps": 400}


def megatron_recipes() -> list[float]:
    errors = []
    for (label, model_name, system, gpus, tp, pp, vpp, ep, mbs, batch, dispatcher, overlap, precision, fp8_recipe, modules, graphs,
         published_tflops) in MEGATRON_RECIPES:
        if system == "GB200":
            cluster = parse_cluster({**GB200_TRAYS, "nodes": gpus // 4, "nvlink_domain_nodes": min(16, gpus // 4)}, "recipes")
        else:
            cluster = _cluster(system, gpus, "recipes")
        features = Features(moe_token_dispatcher=dispatcher, moe_router_fusion=True, moe_permute_fusion=True, cross_entropy_fusion="te",
                            overlap_moe_expert_parallel_comm=overlap, fp8_recipe=fp8_recipe, fp8_param_gather=precision == "fp8")
        model = load_model(model_name)
        job = Job(model=model, cluster=cluster, global_batch_size=batch, seq_length=4096, precision=precision, features=features)
        layout = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), cp=1, ep=ep, vpp=vpp, micro_batch_size=mbs, global_batch_size=batch,
                        sequence_parallel=tp > 1, distributed_optimizer=True, recompute="selective" if modules else "none",
                        recompute_modules=tuple(modules.split()))
        published_s = megatron_flops_per_token(model, 4096) * batch * 4096 / (published_tflops * 1e12 * gpus)
        name = f"recipe: {label}"
        if graphs:  # loom prices eager PyTorch: the captured scopes' host time is not modelled
            plan = evaluate(job, layout)
            print(f"{name:<34} {layout.label():<32} {published_s:>7.2f} {plan.step_time_s:>7.2f} {plan.step_time_s / published_s - 1:>+7.1%}"
                  f"  not counted: CUDA graphs ({graphs}) not expressible, priced eager")
            continue
        errors.append(_row(name, layout, published_s, evaluate(job, layout)))
    return errors


def field_reports() -> list[float]:
    errors = []
    mixtral = Job(model=load_model("mixtral-8x7b"), cluster=_cluster("DGX-H100", 16, "field"), global_batch_size=128, seq_length=2048)
    # Megatron-LM sets the expert TP size to TP when not given (arguments.py):
    # EP8 x ETP2 spans both nodes.
    layout = Layout(tp=2, pp=1, dp=8, cp=1, ep=8, etp=2, micro_batch_size=1, global_batch_size=128, sequence_parallel=True,
                    distributed_optimizer=True)
    errors.append(_row("field: mixtral-8x7b 16 H100", layout, 5.58, evaluate(mixtral, layout)))
    qwen = Job(model=load_model(QWEN3_30B), cluster=_cluster("DGX-H100", 32, "field"), global_batch_size=256, seq_length=4096)
    layout = Layout(tp=1, pp=1, dp=32, cp=1, ep=8, micro_batch_size=1, global_batch_size=256, distributed_optimizer=True)
    # The report's 120 TFLOP/s is Megatron-LM's own count (Dec. 2025: causal
    # attention's unmasked half), not loom's model FLOPs.
    measured_s = megatron_flops_per_token(qwen.model, qwen.seq_length) * 256 * 4096 / (120e12 * 32)
    errors.append(_row("field: qwen3-30b-a3b 32 H100", layout, measured_s, evaluate(qwen, layout)))
    return errors


def plans() -> None:
    for model, nodes, batch in [("mixtral-8x7b", 8, 256), ("deepseek-v3", 128, 4096)]:
        job = Job(model=load_model(model), cluster=_cluster("DGX-H100", nodes * 8, "plan"), global_batch_size=batch, seq_length=4096)
        result = search(job, top_k=3)
        for plan in result.plans:
            print(f"{model:<13} {nodes * 8:>5} H100: {plan.layout.label():<34} {plan.step_time_s:7.3f} s  MFU {plan.mfu:.1%}"
                  f"  peak {plan.peak_memory.peak_bytes / 2**30:.1f} of {plan.capacity_bytes / 2**30:.1f} GiB")
        print(f"{'':<13} searched {result.candidates} layouts in {result.wall_time_s:.1f} s")


def _summary(label: str, errors: list[float]) -> None:
    sizes = [abs(e) for e in errors]
    print(f"{label}: median |error| {statistics.median(sizes):.1%}, largest {max(sizes):.1%}, "
          f"{sum(s <= 0.35 for s in sizes)} of {len(sizes)} within 35%")


if __name__ == "__main__":
    published = published_runs()
    _summary("published MoE runs", published)
    print()
    _summary("Megatron MoE team's Qwen3-235B runs", moe_team_runs())
    print()
    _summary("Megatron-LM's MoE recipes", megatron_recipes())
    print()
    field = field_reports()
    _summary("field reports", field)
    print()
    plans()
