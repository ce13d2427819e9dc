"""Expert placement on seeded loads: contiguous (Megatron, DeepSpeed), greedy
(EPLB) and loom. Prints, per case, each method's busiest and mean GPU load
(routed tokens per layer), the tokens crossing nodes and GPUs between
consecutive layers, loom's bound, gap and solve time, and whether loom kept
greedy's balance.

    python benchmarks/expert_placement.py [--sizes small large] [--time-limit-s 20]

Sizes (each with four load cases):

- small: 64 experts (top-6, like DeepSeek-V2-Lite) x 16 layers on 8 GPUs,
  2 nodes of 4, 9 slots per GPU (8 redundant replicas per layer);
- large: 256 experts (top-8, like DeepSeek-V3) x 58 layers on 64 GPUs,
  8 nodes of 8, 5 slots per GPU (64 redundant replicas per layer).

Cases: uniform, Zipf 1.0 and Zipf 1.5 popularity (a fresh random expert order
per layer, loads only, so no traffic), and a top-k trace with inter-layer
affinity (``correlated_trace``: every expert has 4 preferred successors,
whose scores get +3, about 20 times the odds; popularity Zipf 1.0). For the
trace the benchmark also prints how concentrated the affinity is: the share of
an expert's onward tokens that its S most frequent successors receive.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from loom.solvers.experts import ExpertProblem, affinity_from_trace, evaluate, contiguous_slots, greedy_slots, loads_from_trace, solve
from loom.solvers.synthetic_routing import correlated_trace, zipf_loads

# size -> (experts, layers, GPUs, GPUs per node, slots per GPU, top_k)
SIZES = {
    "small": (64, 16, 8, 4, 9, 6),
    "large": (256, 58, 64, 8, 5, 8),
}
TOKENS = 4096  # per batch; each routes to top_k experts per layer
SUCCESSORS = 4
AFFINITY = 3.0


def cases(size: str, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Case name -> (loads, affinity or None)."""
    experts, layers, _, _, _, top_k = SIZES[size]
    routed = TOKENS * top_k
    built = {f"zipf {exponent:g}" if exponent else "uniform": (zipf_loads(layers, experts, routed, exponent, seed), None)
             for exponent in (0.0, 1.0, 1.5)}
    trace = correlated_trace(TOKENS, layers, experts, top_k, 1.0, seed, SUCCESSORS, AFFINITY)
    built["trace"] = (loads_from_trace(trace, experts), affinity_from_trace(trace, experts))
    return built


def concentration(affinity: np.ndarray, top: int) -> float:
    """Share of an expert's onward tokens that its ``top`` most frequent successors receive."""
    return float(np.sort(affinity, axis=2)[:, :, -top:].sum() / affinity.sum())


def run(size: str, time_limit_s: float) -> None:
    experts, layers, gpus, per_node, slots, top_k = SIZES[size]
    print(f"\n{experts} experts (top-{top_k}) x {layers} layers on {gpus} GPUs ({gpus // per_node} nodes of {per_node}), "
          f"{slots} slots per GPU; loads: routed tokens per GPU per layer; time limit {time_limit_s:g} s")
    print(f"{'case':<9} {'method':<11} {'max load':>9} {'mean':>8} {'max/mean':>8} {'cross-node':>11} {'cross-GPU':>10}"
          f" {'objective':>11} {'bound':>10} {'gap':>6} {'time s':>7}")
    for name, (loads, affinity) in cases(size).items():
        problem = ExpertProblem(loads, np.arange(gpus) // per_node, slots, affinity)
        solution = solve(problem, time_limit_s)
        rows = {"contiguous": contiguous_slots(problem), "greedy": greedy_slots(problem), "loom": solution.expert_of_slot}
        figures = {method: evaluate(problem, placement) for method, placement in rows.items()}
        for method, f in figures.items():
            traffic = f"{f.cross_node_tokens:>11,.0f} {f.cross_gpu_tokens:>10,.0f}" if affinity is not None else f"{'-':>11} {'-':>10}"
            solved = f"{solution.bound:>10,.1f} {solution.gap:>6.1%} {solution.wall_time_s:>7.1f}" if method == "loom" else ""
            print(f"{name:<9} {method:<11} {f.max_load_tokens / layers:>9,.1f} {f.mean_load_tokens / layers:>8,.1f} {f.imbalance:>8.4f}"
                  f" {traffic} {f.objective:>11,.1f} {solved}")
        kept = figures["loom"].max_load_tokens <= figures["greedy"].max_load_tokens * (1 + 1e-9)
        note = f"loom {'kept' if kept else 'LOST'} greedy's balance ({solution.method}, {solution.status})"
        if affinity is not None:
            cut = 1 - figures["loom"].cross_node_tokens / figures["greedy"].cross_node_tokens
            note += (f"; cross-node tokens cut {cut:.1%} vs greedy; affinity: an expert's top {slots} successors"
                     f" get {concentration(affinity, slots):.0%} of its onward tokens, top {slots * per_node} get"
                     f" {concentration(affinity, slots * per_node):.0%}")
        print(f"{'':<9} {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "large"])
    parser.add_argument("--time-limit-s", type=float, default=20.0)
    args = parser.parse_args()
    started = time.perf_counter()
    for size in args.sizes:
        run(size, args.time_limit_s)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
