"""Rank placement on clusters with realistic faults: Megatron's default order,
simulated annealing (Pipette's search) with the same time budget, and loom's
solver. Prints predicted communication and step time, the solver's bound and
gap, and solve times.

    python benchmarks/placement.py [--sizes 64 512 4096] [--plot placement.png]
    python benchmarks/placement.py --brute-force   # exact vs brute force on 16 GPUs

Each size runs three clusters built by ``cluster_spec``:

- uniform: no faults, non-blocking. Priced through the cluster graph (an
  override that changes nothing), so the solver runs and must keep the default;
- faults: leaves in node order behind a 2:1 oversubscribed spine, 7% of NICs
  and 5% of NVLink pairs at a quarter or half speed, and one rail missing;
- fragmented: the same faults, with the nodes handed out across leaf switches
  in random order, as a scheduler does after months of churn.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.search.placement import placement_problem
from loom.planner.plan import build_plan, evaluate
from loom.planner.specs.stages import Placement
from loom.solvers.placement import anneal, brute_force, exact, solve

# size -> (model, layout, global batch, nodes per leaf): a stage of each layout
# fills exactly one leaf, so its data-parallel group can avoid the spine.
CASES = {
    64: ("llama-3-8b", dict(tp=2, pp=2, dp=16), 256, 4),
    512: ("llama-3-70b", dict(tp=4, pp=4, dp=32), 1024, 16),
    4096: ("llama-3-70b", dict(tp=8, pp=16, dp=32), 2048, 32),
}
NIC_FAULTS = 0.07
NVLINK_FAULTS = 0.05
MISSING_RAIL = 3
TIME_LIMIT_S = 10.0


def cluster_spec(gpus: int, scenario: str, nodes_per_leaf: int, seed: int = 0, per_node: int = 8) -> dict:
    nodes = gpus // per_node
    spec = {"name": f"h100-{gpus}-{scenario}", "nodes": nodes, "gpus_per_node": per_node, "gpu": "H100", "nvlink_GBps": 450,
            "nics_per_node": per_node, "nic_Gbps": 400}
    if scenario == "uniform":
        return {**spec, "nic_overrides": [{"node": 0, "nic": 0, "Gbps": 400}]}
    rng = np.random.default_rng(seed)
    order = rng.permutation(nodes) if scenario == "fragmented" else np.arange(nodes)
    leaves = [order[i : i + nodes_per_leaf].tolist() for i in range(0, nodes, nodes_per_leaf)]
    nics = rng.choice(nodes * per_node, size=max(1, round(NIC_FAULTS * nodes * per_node)), replace=False)
    pairs = [(n, a, b) for n in range(nodes) for a in range(per_node) for b in range(a + 1, per_node)]
    links = rng.choice(len(pairs), size=max(1, round(NVLINK_FAULTS * len(pairs))), replace=False)
    rail = MISSING_RAIL % per_node
    return {
        **spec,
        "leaves": leaves,
        "spine_oversubscription": 2,
        "nic_overrides": [{"nic": rail, "Gbps": 0}]
        + [{"node": int(i // per_node), "nic": int(i % per_node), "Gbps": float(rng.choice([100, 200]))} for i in sorted(nics) if i % per_node != rail],
        "link_overrides": [{"node": pairs[i][0], "gpus": list(pairs[i][1:]), "GBps": float(rng.choice([112.5, 225]))} for i in sorted(links)],
    }


def run(gpus: int, scenario: str) -> dict:
    model, degrees, batch, per_leaf = CASES[gpus]
    cluster = parse_cluster(cluster_spec(gpus, scenario, per_leaf), "benchmark")
    job = Job(model=load_model(model), cluster=cluster, global_batch_size=batch, seq_length=8192)
    layout = Layout(**degrees, cp=1, micro_batch_size=1, global_batch_size=batch, sequence_parallel=degrees["tp"] > 1,
                    distributed_optimizer=True, recompute="selective")
    plan = evaluate(job, layout)
    problem = placement_problem(plan)
    started = time.perf_counter()
    solution = solve(problem, TIME_LIMIT_S)
    loom_s = time.perf_counter() - started
    annealed = anneal(problem, loom_s, seed=0)

    def step_s(slot_of_rank: np.ndarray) -> float:
        placement = Placement(gpus=tuple(cluster.topology.gpus[slot] for slot in slot_of_rank))
        return build_plan(job, layout, list(plan.stages), placement).step_time_s

    return {
        "gpus": gpus, "scenario": scenario, "layout": layout.label(),
        "default": (solution.start_s, plan.step_time_s),
        "anneal": (annealed.communication_s, step_s(annealed.slot_of_rank)),
        "loom": (solution.communication_s, step_s(solution.slot_of_rank)),
        "bound_s": solution.bound_s, "gap": solution.gap, "status": solution.status, "method": solution.method,
        "solve_s": loom_s,
    }


def check_brute_force(seeds: range = range(3)) -> None:
    """16 GPUs (4 nodes x 4) with the fault mix above: the exact CP-SAT
    model's optimum against all 8 million block-preserving placements."""
    print(f"{'seed':>4} {'layout':<22} {'exact s':>9} {'brute force s':>13} {'exact solve s':>13} {'brute force s':>13}")
    for seed in seeds:
        cluster = parse_cluster(cluster_spec(16, "fragmented", 2, seed, per_node=4), "brute-force")
        job = Job(model=load_model("llama-3-8b"), cluster=cluster, global_batch_size=64, seq_length=4096)
        layout = Layout(tp=2, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, distributed_optimizer=True)
        problem = placement_problem(evaluate(job, layout))
        solved, reference = exact(problem, TIME_LIMIT_S), brute_force(problem)
        print(f"{seed:>4} {layout.label():<22} {solved.communication_s:>9.4f} {reference.communication_s:>13.4f}"
              f" {solved.wall_time_s:>13.2f} {reference.wall_time_s:>13.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(CASES))
    parser.add_argument("--plot", help="draw predicted step times to this image")
    parser.add_argument("--brute-force", action="store_true", help="check the exact model on 16 GPUs instead")
    args = parser.parse_args()
    if args.brute_force:
        check_brute_force()
        return
    rows = []
    print(f"{'GPUs':>5} {'cluster':<11} {'layout':<26} {'comm s: default':>15} {'anneal':>8} {'loom':>8} {'bound':>8} {'gap':>5}"
          f" {'step s: default':>15} {'anneal':>8} {'loom':>8} {'saved':>6} {'solve s':>8}  method")
    for gpus in args.sizes:
        for scenario in ("uniform", "faults", "fragmented"):
            row = run(gpus, scenario)
            rows.append(row)
            saved = 1 - row["loom"][1] / row["default"][1]
            print(f"{gpus:>5} {scenario:<11} {row['layout']:<26} {row['default'][0]:>15.3f} {row['anneal'][0]:>8.3f} {row['loom'][0]:>8.3f}"
                  f" {row['bound_s']:>8.3f} {row['gap']:>5.0%} {row['default'][1]:>15.3f} {row['anneal'][1]:>8.3f} {row['loom'][1]:>8.3f}"
                  f" {saved:>6.1%} {row['solve_s']:>8.1f}  {row['method']} ({row['status']})", flush=True)
    if args.plot:
        _plot(rows, args.plot)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    labels = [f"{row['gpus']}\n{row['scenario']}" for row in rows]
    x = np.arange(len(rows))
    for offset, method in zip((-0.25, 0, 0.25), ("default", "anneal", "loom")):
        axis.bar(x + offset, [row[method][1] for row in rows], width=0.25, label=method)
    axis.set_xticks(x, labels)
    axis.set_ylabel("predicted step time, s")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
