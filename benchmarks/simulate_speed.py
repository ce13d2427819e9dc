"""Time the schedule simulator on pipelines of >= 10,000 micro-batch-stage events.

    python benchmarks/simulate_speed.py [--repeats 5]

Each case has uneven stages (a heavier first and last stage, as the embedding
and the LM head make them), p2p latency, and an overlapped DP reduce and
optimizer step, so every kind of event is produced. An event here is one
compute op (F, B or W) of one micro batch on one stage; the sends, reduces and
optimizer steps the timeline also records are counted apart. Prints the best
of the repeats.
"""

from __future__ import annotations

import argparse
import time

from loom.planner.schedule.simulate import COMPUTE_KINDS, ChunkCost, PipelineCosts, simulate

# (schedule, pp, vpp, micro batches)
CASES = [
    ("gpipe", 16, 1, 640),
    ("1f1b", 16, 1, 640),
    ("zb-h1", 16, 1, 640),
    ("interleaved", 8, 4, 320),
    ("interleaved", 32, 2, 320),
]


def costs_of(pp: int, vpp: int, m: int) -> PipelineCosts:
    def chunk(s: int) -> ChunkCost:
        extra = 0.3 if s in (0, pp - 1) else 0.0  # embedding / LM head
        return ChunkCost(
            forward_s=(1.0 + extra) / vpp, backward_s=(2.0 + 2 * extra) / vpp, weight_grad_s=0.9 / vpp, activation_bytes=1e9 / vpp
        )

    return PipelineCosts(
        stages=tuple(tuple(chunk(s) for _ in range(vpp)) for s in range(pp)), microbatches=m, p2p_s=0.02,
        dp_reduce_s=(5.0,) * pp, optimizer_s=(0.5,) * pp,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'schedule':<12}{'pp':>4}{'vpp':>4}{'m':>5}{'events':>9}{'all events':>12}{'best s':>9}{'events/s':>11}{'bubble':>8}")
    for schedule, pp, vpp, m in CASES:
        costs = costs_of(pp, vpp, m)
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            sim = simulate(costs, schedule)
            seconds.append(time.perf_counter() - started)
        compute = sum(1 for e in sim.events if e.kind in COMPUTE_KINDS)
        best = min(seconds)
        print(
            f"{schedule:<12}{pp:>4}{vpp:>4}{m:>5}{compute:>9,}{len(sim.events):>12,}{best:>9.3f}"
            f"{compute / best:>11,.0f}{sim.bubble_fraction():>8.3f}"
        )


if __name__ == "__main__":
    main()
