"""Does calibrating on real runs help? Leave-one-out over the published runs.

    python benchmarks/calibration.py

Rows: NVIDIA's tables (shared/validation/nvidia_perf_runs.yaml, grouped by
system: DGX-H100, DGX-B200) and the papers' runs (published_runs.yaml,
grouped by cluster: Selene, Eos). For each row j, ``loom calibrate``'s fit
from a step time alone (planner/calibrate/fit.py ``rate_factor``: one factor
on the GPU's kernel rates) is learnt from that row, then applied to every
other row i of the same group (the GEMM factor only where i runs at j's
precision, profiles/calibration.py), and row i predicted again. A row is
never calibrated on itself. Printed per row: loom's error uncalibrated, the
median |error| over the one-run calibrations from the others, and the error
when calibrated on all the others at once (their factors' geometric mean).
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from loom.planner.calibrate.fit import rate_calibration, rate_factor
from loom.planner.plan import evaluate
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Job, calibrated_cluster, load_job
from loom.planner.specs.layout import Layout
from loom.planner.specs.rules import default_recompute_modules
from loom.profiles.published import assumed_layout, load_validation, nvidia_runs, published_step_time_s, write_inputs


def published_rows(folder: Path) -> list[tuple[str, str, Job, Layout, float]]:
    """(group, id, job, layout, measured step s) of every row of published_runs.yaml."""
    data, rows = load_validation(), []
    for row in data["runs"]:
        (folder / row["id"]).mkdir()
        job = load_job(write_inputs(row, data["clusters"], folder / row["id"]))
        flags = assumed_layout(row)
        layout = Layout(tp=flags["tp"], pp=flags["pp"], dp=flags["dp"], cp=flags["cp"], vpp=flags["vpp"], micro_batch_size=flags["mbs"],
                        global_batch_size=row["gbs"], sequence_parallel=flags["sequence_parallel"], recompute=flags["recompute"],
                        recompute_modules=default_recompute_modules(job, flags["recompute"]),
                        distributed_optimizer=flags["distributed_optimizer"])
        rows.append((row["cluster"], row["id"], job, layout, published_step_time_s(row)))
    return rows


def nvidia_rows() -> list[tuple[str, str, Job, Layout, float]]:
    return [(run.row["gpu"], run.row["id"], run.job, run.layout, run.step_time_s) for run in nvidia_runs() if run.job is not None]


def step_s(job: Job, layout: Layout) -> float:
    return evaluate(job, layout).step_time_s


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = published_rows(Path(tmp)) + nvidia_rows()
    factors: dict[str, float | None] = {}
    for group, name, job, layout, measured in rows:
        try:
            factors[name] = rate_factor(job, lambda priced, layout=layout: step_s(priced, layout), measured, name)
        except SpecError:
            factors[name] = None  # beyond the calibration's bounds: such a run is refused, and calibrates nothing
    print(f"{'run':<36}{'group':<14}{'factor':>8}{'error':>9}{'one-run':>9}{'all-others':>11}   (one-run: median |error| calibrated on each other row)")
    before, one_run, all_others = {}, {}, {}
    for group, name, job, layout, measured in rows:
        error = step_s(job, layout) / measured - 1
        others = [(other, factors[other]) for g, other, *_ in rows if g == group and other != name and factors[other] is not None]
        sources = {other: job_ for g, other, job_, *_ in rows if g == group}
        errors = []
        for other, factor in others:
            document = rate_calibration(sources[other], factor, other)
            calibrated = replace(job, cluster=calibrated_cluster(job, job.cluster, document, other))
            errors.append(step_s(calibrated, layout) / measured - 1)
        mean = math.exp(statistics.fmean(math.log(f) for _, f in others)) if others else 1.0
        pooled = replace(job, cluster=calibrated_cluster(job, job.cluster, rate_calibration(job, mean, "others"), "others"))
        loo = step_s(pooled, layout) / measured - 1
        before.setdefault(group, []).append(abs(error))
        one_run.setdefault(group, []).extend(abs(e) for e in errors)
        all_others.setdefault(group, []).append(abs(loo))
        factor = f"{factors[name]:.3f}" if factors[name] is not None else "refused"
        median = f"{statistics.median(abs(e) for e in errors):.1%}" if errors else "-"
        print(f"{name:<36}{group:<14}{factor:>8}{error:>+9.1%}{median:>9}{loo:>+11.1%}")
    print()
    print(f"{'group':<14}{'rows':>5}{'median |error| uncalibrated':>29}{'one-run calibrated':>20}{'all-others':>12}")
    for group in sorted(before):
        print(f"{group:<14}{len(before[group]):>5}{statistics.median(before[group]):>29.1%}{statistics.median(one_run[group]):>20.1%}"
              f"{statistics.median(all_others[group]):>12.1%}")
    every = lambda table: statistics.median([e for group in table.values() for e in group])  # noqa: E731
    print(f"{'all':<14}{sum(map(len, before.values())):>5}{every(before):>29.1%}{every(one_run):>20.1%}{every(all_others):>12.1%}")


if __name__ == "__main__":
    main()
