"""Solve time and step-time gain of the pipeline-partition solver on realistic layer lists.

    python benchmarks/partition_solve_time.py [--time-limit 10]

Each layer list is one entry per decoder layer; the first entry also carries
the embedding and the last the LM head + loss over a 128K vocabulary (its fp32
logits make it the heaviest entry by far).  Per-layer costs come from a rough
transformer cost model on an H100 (bf16 at 50 % MFU, selective recompute,
distributed optimizer): good enough to give the solver realistic shapes, not a
prediction.  Prints, per case, the method that ran, its status, solve time and
gap, and the predicted step time of the uniform split (Megatron's default) vs
the solver's, plus a mixed H100/A100 cluster against the proportional split
(Metis's heuristic).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from loom.solvers.partition import (
    GIB,
    Layer,
    PartitionProblem,
    StageDevice,
    evaluate_partition,
    proportional_partition,
    solve_partition,
    uniform_partition,
)

H100_FLOPS = 989e12 * 0.5
VOCAB = 128_256


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    layer_params: float  # one decoder layer
    tp: int
    dp: int
    seq: int = 8192
    micro_batch: int = 1


MODELS = {
    "llama-3-8b": Model("Llama-3-8B", 32, 4096, 218e6, tp=1, dp=8),
    "llama-3-70b": Model("Llama-3-70B", 80, 8192, 856e6, tp=8, dp=4),
    "gpt-3-175b": Model("GPT-3-175B", 96, 12288, 1.81e9, tp=8, dp=4, seq=2048),
    "llama-3-405b": Model("Llama-3-405B", 126, 16384, 3.2e9, tp=8, dp=8),
    "llama-128": Model("70B-like, 128 layers", 128, 8192, 856e6, tp=8, dp=2),
}


def layer_list(model: Model) -> list[Layer]:
    tokens = model.seq * model.micro_batch

    def entry(params: float, extra_activation: float = 0.0) -> Layer:
        # Forward 2 flops/param/token plus attention; backward twice that.
        forward = tokens * (2 * params + 2 * model.seq * model.hidden) / model.tp / H100_FLOPS
        state = params * (2 + 4 + 12 / model.dp) / model.tp  # bf16 weights, fp32 grads, sharded Adam
        activation = (34 * tokens * model.hidden + extra_activation) / model.tp
        return Layer(forward, 2 * forward, state, activation)

    embedding = model.hidden * VOCAB
    decoder = entry(model.layer_params)
    first = entry(model.layer_params + embedding)
    # The LM head's matmul plus its fp32 logits (and their gradient) for the loss.
    last = entry(model.layer_params + embedding, extra_activation=2 * 4 * tokens * VOCAB)
    return [first] + [decoder] * (model.layers - 2) + [last]


def in_flight(pp: int, vpp: int, m: int) -> tuple[int, ...]:
    """Micro batches (chunk-micro-batches when interleaved) of activations each stage holds at peak."""
    if vpp == 1:
        return tuple(min(m, pp - s) for s in range(pp))
    return tuple(min(m * vpp, (pp - s - 1) * 2 + (vpp - 1) * pp + 1) for s in range(pp))


def problem(model: Model, pp: int, vpp: int, m: int, devices=None, assign: bool = False) -> PartitionProblem:
    devices = devices or (StageDevice(1.0, 80 * GIB, 5 * GIB),) * pp
    return PartitionProblem(tuple(layer_list(model)), pp, vpp, m, in_flight(pp, vpp, m), tuple(devices), assign)


def show(stage_layers: tuple[int, ...]) -> str:
    text = ",".join(map(str, stage_layers))
    return text if len(text) <= 40 else text[:37] + "..."


def fmt(step: float | None) -> str:
    return "does not fit" if step is None else f"{step:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=10.0)
    args = parser.parse_args()

    cases = [
        ("llama-3-8b", 8, 1, 32),
        ("llama-3-70b", 8, 5, 64),
        ("gpt-3-175b", 8, 12, 64),
        ("llama-3-405b", 16, 1, 64),
        ("llama-128", 64, 1, 128),
    ]
    print(f"{'model':<22}{'layers/stages':>15}{'method':>12}{'status':>11}{'solve s':>9}{'gap':>9}"
          f"{'uniform s':>14}{'solver s':>10}{'gain':>7}  layers per stage")
    for key, pp, vpp, m in cases:
        model = MODELS[key]
        p = problem(model, pp, vpp, m)
        result = solve_partition(p, time_limit_s=args.time_limit)
        uniform = evaluate_partition(p, uniform_partition(p))
        stages = f"{model.layers}/{pp}" + (f"x{vpp}" if vpp > 1 else "")
        gain = f"{(1 - result.objective_s / uniform) * 100:.1f}%" if uniform and result.chunk_sizes else "-"
        print(f"{model.name:<22}{stages:>15}{result.method:>12}{result.status:>11}{result.wall_time_s:>9.3f}"
              f"{result.gap:>9.1e}{fmt(uniform):>14}{fmt(result.objective_s if result.chunk_sizes else None):>10}"
              f"{gain:>7}  {show(result.stage_layers) if result.chunk_sizes else result.binding}")

    # Mixed cluster: four H100 groups and four A100-40GB groups (3.2x slower peak).
    print("\nLlama-3-70B, PP 8, on 4 x H100-80GB + 4 x A100-40GB device groups")
    model = MODELS["llama-3-70b"]
    h100, a100 = StageDevice(1.0, 80 * GIB, 5 * GIB), StageDevice(989 / 312, 40 * GIB, 5 * GIB)
    p = problem(model, 8, 1, 64, devices=(h100,) * 4 + (a100,) * 4, assign=True)
    result = solve_partition(p, time_limit_s=args.time_limit)
    baselines = {
        "uniform": evaluate_partition(p, uniform_partition(p)),
        "proportional (Metis)": evaluate_partition(p, proportional_partition(p)),
    }
    for name, step in baselines.items():
        print(f"  {name:<22}{fmt(step):>14}")
    print(f"  {'solver':<22}{fmt(result.objective_s if result.chunk_sizes else None):>14}"
          f"  {result.method} {result.status} in {result.wall_time_s:.3f} s, gap {result.gap:.1e};"
          f" layers per stage {result.stage_layers}, device groups {result.stage_device}")


if __name__ == "__main__":
    main()
