"""Every published run's layout through loom's memory model: the fullest
stage's predicted peak against the GPU's capacity. Every one of these runs
ran, so every one must fit.

    python benchmarks/memory_runs.py [--breakdown]

Rows: ``shared/validation/nvidia_perf_runs.yaml`` (NVIDIA's tables; rows
loom cannot express are listed with the reason) and
``shared/validation/published_runs.yaml`` (papers). ``--breakdown`` adds
the fullest stage's terms in GiB.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from loom.planner.plan import Plan, evaluate
from loom.planner.specs.job import load_job
from loom.planner.specs.layout import Layout
from loom.profiles.published import assumed_layout, load_validation, nvidia_runs, write_inputs

GiB = 2**30


def _row(name: str, plan: Plan, breakdown: bool) -> tuple[str, bool]:
    memory = plan.peak_memory
    peak, capacity = memory.peak_bytes / GiB, plan.capacity_bytes / GiB
    line = f"{name:<34}{plan.layout.label():<34}{memory.stage:>5}{peak:>8.1f}{capacity:>8.1f}{1 - peak / capacity:>+8.1%}  {'yes' if plan.fits else 'NO'}"
    if breakdown:
        terms = sorted(memory.breakdown_bytes.items(), key=lambda item: -item[1])
        line += "  " + ", ".join(f"{term} {value / GiB:.1f}" for term, value in terms if value > 0)
    return line, plan.fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--breakdown", action="store_true", help="print the fullest stage's terms")
    args = parser.parse_args()
    header = f"{'run':<34}{'layout':<34}{'stage':>5}{'peak':>8}{'GiB':>8}{'free':>8}  fits"
    results: list[bool] = []

    print("NVIDIA performance tables (nvidia_perf_runs.yaml)")
    print(header)
    skipped = []
    for run in nvidia_runs():
        if run.job is None:
            skipped.append(f"{run.row['id']} ({run.reason})")
            continue
        name = run.row["id"] + ("*" if run.model_used != run.row["model"] else "")
        line, fits = _row(name, evaluate(run.job, run.layout), args.breakdown)
        results.append(fits)
        print(line)
    print(f"* priced on the row's approx_model stand-in; not expressible: {', '.join(skipped) or 'none'}")

    print("\nPapers (published_runs.yaml)")
    print(header)
    data = load_validation()
    for row in data["runs"]:
        with tempfile.TemporaryDirectory() as folder:
            job = load_job(write_inputs(row, data["clusters"], Path(folder)))
        flags = assumed_layout(row)
        layout = Layout(tp=flags["tp"], pp=flags["pp"], dp=flags["dp"], cp=1, vpp=flags["vpp"], micro_batch_size=flags["mbs"],
                        global_batch_size=row["gbs"], sequence_parallel=flags["sequence_parallel"], recompute=flags["recompute"],
                        distributed_optimizer=flags["distributed_optimizer"])
        line, fits = _row(row["id"], evaluate(job, layout), args.breakdown)
        results.append(fits)
        print(line)
    print(f"\n{sum(results)} of {len(results)} layouts that ran are predicted to fit")


if __name__ == "__main__":
    main()
