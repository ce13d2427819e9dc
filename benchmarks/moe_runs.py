"""MoE runs NVIDIA published, predicted with `loom evaluate`, and the plans
`loom plan` makes for Mixtral 8x7B on 64 H100 and DeepSeek-V3 on 1,024 H100.

    python benchmarks/moe_runs.py

Rows: Megatron-Bridge's performance summary, 25.11 NeMo container
(github.com/NVIDIA-NeMo/Megatron-Bridge, docs/performance-summary.md), the
DGX-H100 and DGX-B200 MoE pre-training rows whose model is in loom's
catalogue. They force-balance tokens over experts (imbalance 1.0 here) and
drop no tokens. The H100 Qwen3 row prints no global batch size (its row is
missing a column); 2,048 is assumed, which only sets the bubble's share. FP8
current scaling and MXFP8 are both priced as loom's fp8.
"""

from __future__ import annotations

from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.plan import evaluate
from loom.planner.search.layouts import search

DGX_H100 = {"gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
DGX_B200 = {"gpus_per_node": 8, "gpu": "B200", "nvlink_GBps": 900, "nics_per_node": 8, "nic_Gbps": 400}

# (model, system, GPUs, global batch, seq, tp, pp, vp, ep, published tokens/s/GPU)
RUNS = [
    ("qwen3-235b-a22b", DGX_H100, 256, 2048, 4096, 2, 8, 4, 32, 1575),
    ("qwen3-235b-a22b", DGX_B200, 64, 1024, 4096, 1, 8, 2, 8, 3269),
    ("deepseek-v3", DGX_B200, 256, 2048, 4096, 1, 16, 1, 8, 2139),
]


def published_runs() -> None:
    print(f"{'model':<17} {'system':<5} {'GPUs':>5} {'layout':<28} {'published':>9} {'loom':>7} {'error':>7}  largest parts of the step")
    for model, system, gpus, batch, seq, tp, pp, vp, ep, published in RUNS:
        cluster = parse_cluster({**system, "nodes": gpus // 8}, "published")
        job = Job(model=load_model(model), cluster=cluster, global_batch_size=batch, seq_length=seq, precision="fp8")
        layout = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), cp=1, ep=ep, vpp=vp, micro_batch_size=1, global_batch_size=batch,
                        sequence_parallel=tp > 1, distributed_optimizer=True)
        plan = evaluate(job, layout)
        predicted = plan.tokens_per_s / gpus
        parts = sorted(plan.step.breakdown_s.items(), key=lambda item: -item[1])[:3]
        shares = ", ".join(f"{name} {seconds / plan.step_time_s:.0%}" for name, seconds in parts)
        print(f"{model:<17} {system['gpu']:<5} {gpus:>5} {layout.label():<28} {published:>9} {predicted:>7.0f} {predicted / published - 1:>+7.1%}  {shares}")


def plans() -> None:
    for model, nodes, batch in [("mixtral-8x7b", 8, 256), ("deepseek-v3", 128, 4096)]:
        job = Job(model=load_model(model), cluster=parse_cluster({**DGX_H100, "nodes": nodes}, "plan"), global_batch_size=batch, seq_length=4096)
        result = search(job, top_k=3)
        for plan in result.plans:
            print(f"{model:<13} {nodes * 8:>5} H100: {plan.layout.label():<34} {plan.step_time_s:7.3f} s  MFU {plan.mfu:.1%}"
                  f"  peak {plan.peak_memory.peak_bytes / 2**30:.1f} of {plan.capacity_bytes / 2**30:.1f} GiB")
        print(f"{'':<13} searched {result.candidates} layouts in {result.wall_time_s:.1f} s")


if __name__ == "__main__":
    published_runs()
    print()
    plans()
