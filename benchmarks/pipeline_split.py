"""Uniform vs optimal pipeline splits: predicted step time and solve time.

    python benchmarks/pipeline_split.py

For each model and pipeline layout, the plan with Megatron's even split is
compared with the plan whose split the partition solver chose (both priced by
the full time model, both checked against memory). On a cluster mixing H100
and A100 nodes it also compares a split proportional to each stage's speed
(Metis's and AMP's heuristic) with the MILP, which chooses the split and which
device group runs which stage jointly, and, for the largest of those
(SC'21's 1T GPT: 128 layers on 64 stages of 32 A100 and 32 H100 nodes), the
exact typed program against the MILP at the search's 2 s and at 10 s, on the
partition's own objective; and a memory-tight interleaved case (Llama-3
405B, TP8 PP32x2 on 256 H100, whose even split does not fit) the same way:
the exact interleaved method against the MILP.
"""

from __future__ import annotations

import time

from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model, model_from_hf_config
from loom.planner.search.split import partition_problem, solve_split
from loom.planner.plan import build_plan
from loom.planner.specs.stages import split_stages
from loom.solvers.partition import evaluate_partition, proportional_partition, solve_partition

H100 = {"gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
A100 = {"gpus_per_node": 8, "gpu": "A100-80GB", "nvlink_GBps": 300, "nics_per_node": 8, "nic_Gbps": 200}

# (model, GPUs, global batch, seq, layout)
CASES = [
    ("llama-3-8b", 32, 256, 8192, dict(tp=2, pp=4, dp=4)),
    ("llama-3-8b", 64, 256, 8192, dict(tp=2, pp=8, dp=4)),
    ("llama-3-70b", 128, 512, 8192, dict(tp=8, pp=8, dp=2)),
    ("llama-3-70b", 256, 512, 8192, dict(tp=8, pp=16, dp=2)),
    ("llama-3-70b", 128, 512, 8192, dict(tp=8, pp=8, dp=2, vpp=5)),
    ("gpt3-175b", 128, 256, 2048, dict(tp=8, pp=8, dp=2, vpp=3)),
    ("llama-3-405b", 256, 256, 8192, dict(tp=8, pp=16, dp=2)),
    ("gpt-1t", 512, 512, 2048, dict(tp=8, pp=64, dp=1)),  # 128 layers into 64 stages
    ("llava-1.5-7b", 32, 256, 2048, dict(tp=1, pp=4, dp=8)),  # ViT + projector + decoder
]
# SC'21's 1T-parameter GPT (128 layers), for the largest split.
GPT_1T = {"model_type": "gpt2", "n_embd": 25600, "n_layer": 128, "n_head": 160, "n_positions": 2048, "vocab_size": 51200}


def job_on(model: str, nodes: list[dict], gbs: int, seq: int) -> Job:
    overrides = [{"node": i, **{k: v for k, v in node.items() if k in ("gpu", "nvlink_GBps", "nic_Gbps")}} for i, node in enumerate(nodes)]
    cluster = parse_cluster({**nodes[0], "nodes": len(nodes), "node_overrides": overrides}, "benchmark")
    spec = model_from_hf_config(GPT_1T, "gpt-1t", "benchmark") if model == "gpt-1t" else load_model(model)
    return Job(model=spec, cluster=cluster, global_batch_size=gbs, seq_length=seq)


def layout_of(parallel: dict, gbs: int) -> Layout:
    return Layout(cp=1, micro_batch_size=1, global_batch_size=gbs, sequence_parallel=parallel["tp"] > 1,
                  distributed_optimizer=parallel["dp"] > 1, recompute="selective", **parallel)


def compare(job: Job, layout: Layout) -> tuple:
    even = build_plan(job, layout)
    started = time.perf_counter()
    split = solve_split(job, layout, time_limit_s=60)
    solve_s = time.perf_counter() - started
    planned = build_plan(job, layout, split.stages, split.placement)
    return even, planned, split.solution, solve_s


def row(label: str, baseline_name: str, baseline, planned, solution, solve_s: float) -> None:
    layers = lambda plan: "/".join(str(s.num_layers) for s in plan.stages)[:40]  # noqa: E731
    fits = lambda plan: "" if plan.fits else " (OOM)"  # noqa: E731
    print(f"{label:<48}{baseline_name:<12}{baseline.step_time_s:>9.3f}{fits(baseline):<6} {planned.step_time_s:>9.3f}{fits(planned):<6}"
          f"{baseline.step_time_s / planned.step_time_s - 1:>+8.1%}{solve_s:>9.3f}  {solution.method}/{solution.status}  {layers(planned)}")


def main() -> None:
    print(f"{'job':<48}{'baseline':<12}{'base s':>9}{'':<6} {'split s':>9}{'':<6}{'gain':>8}{'solve s':>9}  method     layers per stage")
    for model, gpus, gbs, seq, parallel in CASES:
        job = job_on(model, [H100] * (gpus // 8), gbs, seq)
        layout = layout_of(parallel, gbs)
        even, planned, solution, solve_s = compare(job, layout)
        row(f"{model} {gpus}xH100 {layout.label()}", "uniform", even, planned, solution, solve_s)

    # Mixed cluster: half the nodes H100, half A100; the A100 nodes come first
    # so that Megatron's default order puts the first stages on the slower GPUs.
    for model, gpus, gbs, seq, parallel in [("llama-3-70b", 128, 512, 8192, dict(tp=8, pp=8, dp=2)),
                                            ("llama-3-8b", 64, 256, 8192, dict(tp=2, pp=8, dp=4))]:
        job = job_on(model, [A100] * (gpus // 16) + [H100] * (gpus // 16), gbs, seq)
        layout = layout_of(parallel, gbs)
        _, planned, solution, solve_s = compare(job, layout)
        sizes = list(proportional_partition(partition_problem(job, layout)))
        sizes[0] -= 1  # the layer list starts with the embedding and ends with the head
        sizes[-1] -= 1
        proportional = build_plan(job, layout, split_stages(layout, tuple(sizes)))
        row(f"{model} {gpus//2}xA100+{gpus//2}xH100 {layout.label()}", "proportional", proportional, planned, solution, solve_s)

    problem = partition_problem(job_on("gpt-1t", [A100] * 32 + [H100] * 32, 512, 2048), layout_of(dict(tp=8, pp=64, dp=1), 512))
    print()
    print("gpt-1t on 32 A100 + 32 H100 nodes, TP8 PP64, the solver placing the stages (partition objective, s):")
    print(f"  proportional in node order: {evaluate_partition(problem, proportional_partition(problem))}")
    solver_rows(problem, "typed")

    job, layout = job_on("llama-3-405b", [H100] * 32, 512, 4096), layout_of(dict(tp=8, pp=32, dp=1, vpp=2), 512)
    even, planned, solution, solve_s = compare(job, layout)
    print()
    print(f"llama-3-405b on 256 H100, seq 4096, {layout.label()} (memory-tight: the even split needs "
          f"{even.peak_memory.peak_bytes / 2**30:.1f} GiB), partition objective, s:")
    solver_rows(partition_problem(job, layout), "interleaved")
    print(f"  simulated step of the plan on the interleaved split: {planned.step_time_s:.3f} s (fits: {planned.fits})")


def solver_rows(problem, exact: str) -> None:
    """The exact method and the MILP at the search's 2 s and at 10 s."""
    for method, limit in [(exact, 10), ("milp", 2), ("milp", 10)]:
        started = time.perf_counter()
        result = solve_partition(problem, time_limit_s=limit, method=method)
        print(f"  {result.method:<11} limit {limit:>2} s: step {result.objective_s:8.3f}  bound {result.bound_s:8.3f}  gap {result.gap:6.1%}  "
              f"{result.status:<10} in {time.perf_counter() - started:5.2f} s")


if __name__ == "__main__":
    main()
