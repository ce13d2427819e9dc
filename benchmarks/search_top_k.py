"""Does the best plan depend on how many plans are kept? And what keeping
more costs.

    python benchmarks/search_top_k.py

For each job, the search runs at top k 1, 5 and 20. Per k: plan 1 (its
layout and simulated step), the search's wall time, and that time as a ratio
to k = 1's in the same run (each job is searched once untimed first: the
first search fills the cost model's memos). The last column says whether plan 1 is the same
at every k, which branch and bound promises wherever its bounds hold (every
layout whose bound is below the k-th plan is split and simulated:
planner/search/layouts.py). Jobs: Llama-3 8B and 70B on 64 GPUs mixing
A100-40GB and H100 nodes (the mixed-GPU search's cases), Llama-3 8B, 70B and
405B, Mixtral 8x7B, DeepSeek-V2-Lite and DeepSeek-V3 on H100 clusters.
"""

from __future__ import annotations

import time

from loom.planner.search.layouts import search
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Job
from loom.planner.specs.model import load_model

H100 = {"gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
TOP_KS = (1, 5, 20)


def cluster(nodes: int, a100_40gb_nodes: int = 0):
    overrides = [{"node": node, "gpu": "A100-SXM4-40GB"} for node in range(a100_40gb_nodes)]
    return parse_cluster({"nodes": nodes, **H100, **({"node_overrides": overrides} if overrides else {})}, f"h100-{nodes * 8}")


# (name, model, nodes, of which A100-40GB, global batch, seq)
JOBS = [
    ("llama-3-8b, 16 A100 + 48 H100", "llama-3-8b", 8, 2, 512, 8192),
    ("llama-3-70b, 32 A100 + 32 H100", "llama-3-70b", 8, 4, 256, 4096),
    ("llama-3-8b, 16 H100", "llama-3-8b", 2, 0, 128, 8192),
    ("deepseek-v2-lite, 32 H100", "deepseek-v2-lite", 4, 0, 64, 4096),
    ("llama-3-70b, 64 H100", "llama-3-70b", 8, 0, 256, 4096),
    ("mixtral-8x7b, 64 H100", "mixtral-8x7b", 8, 0, 512, 4096),
    ("llama-3-405b, 1,024 H100", "llama-3-405b", 128, 0, 2048, 8192),
    ("deepseek-v3, 1,024 H100", "deepseek-v3", 128, 0, 4096, 4096),
]


def main() -> None:
    print(f"{'job':32s} {'k':>3s}  {'plan 1':44s} {'step s':>9s} {'search s':>9s} {'x k=1':>6s}  same plan 1")
    for name, model, nodes, a100s, batch, seq in JOBS:
        job = Job(model=load_model(model), cluster=cluster(nodes, a100s), global_batch_size=batch, seq_length=seq)
        search(job, TOP_KS[0])
        rows = []
        for top_k in TOP_KS:
            started = time.perf_counter()
            best = search(job, top_k).plans[0]
            rows.append((top_k, best, time.perf_counter() - started))
        same = len({(best.layout, best.stages, round(best.step_time_s, 9)) for _, best, _ in rows}) == 1
        for top_k, best, wall_s in rows:
            print(f"{name:32s} {top_k:3d}  {best.layout.label():44s} {best.step_time_s:9.4f} {wall_s:9.1f} {wall_s / rows[0][2]:6.2f}  "
                  f"{'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
