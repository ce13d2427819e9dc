"""Every row of NVIDIA's performance tables through loom: predicted step
time against published, and the memory left free, one line per row.

    python benchmarks/nvidia_runs.py

Rows: ``shared/validation/nvidia_perf_runs.yaml`` (dense, MoE and
Megatron-FSDP runs; benchmarks/moe_runs.py breaks the MoE rows down
further). Published step time = gbs x seq / (tokens/s/GPU x GPUs).
"""

from __future__ import annotations

import statistics

from loom.planner.plan import evaluate
from loom.profiles.published import nvidia_runs


def main() -> None:
    print(f"{'run':<36}{'layout':<40}{'published s':>12}{'loom s':>9}{'error':>8}{'free':>8}")
    errors: dict[str, list[float]] = {}
    for run in nvidia_runs():
        if run.job is None:
            print(f"{run.row['id']:<36}not expressible ({run.reason})")
            continue
        plan = evaluate(run.job, run.layout)
        error = plan.step_time_s / run.step_time_s - 1
        free = 1 - plan.peak_memory.peak_bytes / plan.capacity_bytes
        errors.setdefault(run.row["family"], []).append(error)
        print(f"{run.row['id']:<36}{run.layout.label():<40}{run.step_time_s:>12.3f}{plan.step_time_s:>9.3f}{error:>+8.1%}{free:>+8.1%}")
    print()
    for family, found in sorted(errors.items()):
        print(f"{family:<12} {len(found):>3} rows: median |error| {statistics.median(abs(e) for e in found):.1%}, "
              f"largest {max(abs(e) for e in found):.1%}")


if __name__ == "__main__":
    main()
