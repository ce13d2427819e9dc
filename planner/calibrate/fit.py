"""Fit a calibration (profiles/calibration.py) to runs of plans: ``loom calibrate``.

Each run is a plan (a plan.json's best plan) and what the run reported. The
plan is priced again for the job as the plan.json says it was made
(``job_overrides``: its framework, precision, sequence, stack, batch and
profiles, calibrations left out so that the new one replaces them; its
features must be the job's), with its layout and its stages' layers
(``plan_of``). What is learnt, and from what:

- kernel rates. From profiler traces, each kind on its own: loom's GEMM
  (attention, elementwise) seconds on the traced rank's stage over the
  trace's, summed over the traced runs; the step times are then not fitted.
  From logs alone, one factor on all three, found per run by the secant
  method on log(step time) (the step falls as the rates rise, not in
  proportion: communication and the bubble stay) and combined over runs as
  the geometric mean;
- link efficiency, from traces: loom's tensor-parallel collective time
  (before overlap) over the trace's TP kernels, on the link kind (NVLink or
  network) that the plan's TP group spans. A collective kernel's time
  includes waiting for the slowest peer, so this factor errs low;
- the memory overhead: the median over runs of the measured peak (like for
  like, compare.py) minus loom's, never below 0.

Runs must share the GPU type, precision, framework and cluster (one
calibration holds for one of each). A factor outside [FACTOR_MIN,
FACTOR_MAX], or an overhead above the profile's bound, means the run is not
what the plan describes, and is refused (SpecError naming the log).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, replace
from typing import Callable

from loom.planner.calibrate.compare import check_layout, measured_memory, step_time_s, timed_log, traced_stage
from loom.planner.cost.efficiency import HBM_EFFICIENCY
from loom.planner.cost.network import Links
from loom.planner.output.report import PlanReport, Report
from loom.planner.plan import Plan, build_plan
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Job, calibrated_cluster
from loom.planner.specs.layout import Layout
from loom.planner.specs.stages import split_stages
from loom.profiles.calibration import (FACTOR_MAX, FACTOR_MIN, MEMORY_OVERHEAD_MAX_FRACTION, CalibratedRun, CalibrationDocument,
                                       Factor)
from loom.profiles.layer_profile import PEAK_TOLERANCE
from loom.profiles.run_logs.record import GiB, RunLog

# The secant method stops when the predicted step is within this fraction of
# the measured one, or after SECANT_STEPS steps; a factor at its bound that
# still misses the step by more than BOUND_SLACK is refused.
SECANT_TOLERANCE = 1e-4
SECANT_STEPS = 8
BOUND_SLACK = 0.01
KERNEL_KINDS = ("gemm", "attention", "elementwise")


@dataclass(frozen=True)
class Run:
    """One run: the job its plan was made for, the plan.json it ran (its best
    plan) and what it reported."""

    job: Job
    plan_path: str
    report: Report
    logs: tuple[RunLog, ...]

    @property
    def plan(self) -> PlanReport:
        return self.report.plans[0]

    @property
    def timed(self) -> RunLog:
        return timed_log(list(self.logs))

    @property
    def measured_step_s(self) -> float:
        return step_time_s(self.report, self.plan, self.timed)


def job_overrides(report: Report, is_calibration: Callable[[str], bool]) -> dict:
    """``load_job`` overrides that make a job the one ``report``'s plans were
    made for: its framework, precision, sequence, stack and global batch, and
    its profiles but the calibrations (``is_calibration`` tells them by path)."""
    # A plan of precision mxfp8 is saved as fp8 with fp8_recipe mxfp8: given
    # back as fp8, the job would take the stack's default recipe.
    mxfp8 = report.precision == "fp8" and report.features.get("fp8_recipe") == "mxfp8"
    return dict(framework=report.framework, precision="mxfp8" if mxfp8 else report.precision, seq_length=report.seq_length, stack=report.stack,
                global_batch_size=report.plans[0].parallel.global_batch_size,
                profiles=[path for path in report.profiles if not is_calibration(path)])


def check_features(job: Job, report: Report, source: str) -> None:
    """The job's features must be those the report's plans were made with.

    Raises SpecError naming ``source`` and the first feature that differs."""
    ours = json.loads(json.dumps(job.features.model_dump(mode="json")))
    for name, theirs in sorted(report.features.items()):
        if ours.get(name) != theirs:
            raise SpecError(source, f"features.{name}", f"{ours.get(name)!r}, the job's (calibrate with the job and features the "
                            "plans were made with)", theirs)


def plan_of(job: Job, report: Report, plan: PlanReport, source: str) -> Plan:
    """``plan`` of a saved report priced again for ``job``: its layout and its
    stages' layers (the placement: Megatron's order).

    Raises SpecError naming ``source`` when the report is of another model,
    cluster, framework, precision or sequence length than the job."""
    for field, theirs, ours in (("model", report.model, job.model.name), ("cluster", report.cluster, job.cluster.name),
                                ("framework", report.framework, job.framework), ("precision", report.precision, job.precision),
                                ("seq_length", report.seq_length, job.seq_length)):
        if theirs != ours:
            raise SpecError(source, field, f"{ours!r}, the job's (calibrate a plan of the job given)", theirs)
    parallel = plan.parallel.model_dump()
    layout = Layout(**{**parallel, "recompute_modules": tuple(parallel["recompute_modules"])})
    sizes = tuple(plan.stages[c % layout.pp].layer_ranges[c // layout.pp] for c in range(layout.pp * layout.vpp))
    stages = split_stages(layout, tuple(last - first for first, last in sizes), vision=job.model.vision is not None)
    return build_plan(job, layout, stages)


def _document(job: Job, runs: list[CalibratedRun], **learnt) -> CalibrationDocument:
    """A calibration of ``job``'s GPU, precision, framework and cluster."""
    return CalibrationDocument(schema_version=1, kind="calibration", gpu=job.cluster.slowest.gpu.name, precision=job.precision,
                               framework=job.framework, cluster=job.cluster.name, runs=runs, **learnt)


def rate_calibration(job: Job, factor: float, source: str) -> CalibrationDocument:
    """A calibration of ``job``'s GPU with one ``factor`` on its kernel rates
    (GEMM, attention, elementwise), learnt from ``source``, and no runs."""
    return _document(job, [], **{kind: Factor(value=factor, source=source) for kind in KERNEL_KINDS})


def calibrated(job: Job, document: CalibrationDocument, source: str = "the calibration being fitted") -> Job:
    """``job`` with ``document`` (read from ``source``) applied to its cluster."""
    return replace(job, cluster=calibrated_cluster(job, job.cluster, document, source))


def rate_factor(job: Job, price: Callable[[Job], float], measured_s: float, source: str) -> float:
    """The one rate factor on GEMM, attention and elementwise kernels under
    which ``price`` (a job -> its predicted step, seconds) gives ``measured_s``
    (module docstring): the secant method on x = log(factor), y =
    log(predicted / measured), from x = 0 and x = y(0) (exact if the whole
    step scaled with 1 / rate).

    Raises SpecError naming ``source`` when no factor within bounds explains it."""
    low, high = math.log(FACTOR_MIN), math.log(FACTOR_MAX)

    def error(x: float) -> float:
        return math.log(price(calibrated(job, rate_calibration(job, math.exp(x), "fit")) if x else job) / measured_s)

    x0, y0 = 0.0, error(0.0)
    x1, y1 = 0.0, y0
    if abs(y0) >= SECANT_TOLERANCE:
        x1 = min(max(y0, low), high)
        y1 = error(x1)
    for _ in range(SECANT_STEPS):
        if abs(y1) < SECANT_TOLERANCE or y1 == y0:
            break
        x0, y0, x1 = x1, y1, min(max(x1 - y1 * (x1 - x0) / (y1 - y0), low), high)
        y1 = error(x1)
    if abs(y1) > BOUND_SLACK:
        taken = f"{1 / math.exp(y1):.3g}x loom's step at its {'highest' if y1 > 0 else 'lowest'} kernel rates ({math.exp(x1):.3g}x)"
        why = ("faster than the GPU's peak rates allow: is the log of the plan given (its layout, batch, sequence)?" if y1 > 0 else
               "is the log of the plan given? a straggler or a broken link?")
        raise SpecError(source, "step time", f"a run within {FACTOR_MIN:g}x-{FACTOR_MAX:g}x of loom's kernel rates ({why})", taken)
    return math.exp(x1)


def _bounded(value: float, source: str, what: str) -> float:
    """``value``, a factor measured from ``source``, within the bounds; else SpecError."""
    if not FACTOR_MIN <= value <= FACTOR_MAX:
        raise SpecError(source, what, f"a run within {FACTOR_MIN:g}x-{FACTOR_MAX:g}x of loom's rates for its plan (is the trace of "
                        "the plan given?)", f"{value:.3g}x")
    return value


def _traces(runs: list[Run], plans: list[Plan]) -> list[tuple[RunLog, Plan, int]]:
    """Each trace with its run's plan and the stage of the rank it was taken on."""
    return [(log, plan, traced_stage(run.plan, log)) for run, plan in zip(runs, plans) for log in run.logs if log.format == "chrome-trace"]


def _peak_factor(job: Job, kind: str) -> float:
    """The largest rate factor of ``kind`` that keeps the GPU within its
    peak: its GEMM efficiency (at the job's precision), attention
    efficiency, or HBM streaming efficiency at 1."""
    gpu = job.cluster.slowest.gpu
    efficiency = {"gemm": gpu.gemm_efficiency.get(job.precision) or 1.0, "attention": gpu.attention_efficiency,
                  "elementwise": HBM_EFFICIENCY}[kind]
    return 1.0 / efficiency


def _kernel_factors(job: Job, traces: list[tuple[RunLog, Plan, int]]) -> dict[str, Factor]:
    """GEMM, attention and elementwise factors from the traces (module
    docstring); a factor that would take a kernel past the GPU's peak is
    refused, naming the trace."""
    predicted, measured = dict.fromkeys(KERNEL_KINDS, 0.0), dict.fromkeys(KERNEL_KINDS, 0.0)
    for log, plan, stage in traces:
        kernels = plan.step.stage_kernels[stage]
        for kind, seconds in zip(KERNEL_KINDS, (kernels.gemm_s, kernels.attention_s, kernels.elementwise_s)):
            if log.timers_s.get(kind):
                predicted[kind] += seconds
                measured[kind] += log.timers_s[kind]
    source = f"kernel time of {len(traces)} profiler trace{'s' * (len(traces) > 1)}"
    factors = {kind: Factor(value=_bounded(predicted[kind] / measured[kind], traces[0][0].path, f"{kind} kernels"), source=source)
               for kind in KERNEL_KINDS if measured[kind] and predicted[kind]}
    for kind, factor in factors.items():
        if factor.value > _peak_factor(job, kind) * (1 + PEAK_TOLERANCE):
            raise SpecError(traces[0][0].path, f"{kind} kernels", f"kernels no faster than the {job.cluster.slowest.gpu.name}'s peak "
                            f"allows (at most {_peak_factor(job, kind):.3g}x loom's rate; is the trace of the plan given?)",
                            f"{factor.value:.3g}x")
    return factors


def _tp_link_factors(job: Job, traces: list[tuple[RunLog, Plan, int]]) -> dict[str, Factor]:
    """nvlink / network factors from the traces' TP collectives (module docstring)."""
    sums: dict[str, list] = {}
    for log, plan, stage in traces:
        if plan.layout.tp > 1 and log.timers_s.get("tp_comm"):
            total = sums.setdefault(Links.of(job, plan.layout).tp.kind, [0.0, 0.0, log.path])
            total[0] += plan.step.stage_tp_busy_s[stage]
            total[1] += log.timers_s["tp_comm"]
    return {kind: Factor(value=_bounded(predicted / measured, path, f"{kind} TP collectives"),
                         source="tensor-parallel collective kernels of the traces") for kind, (predicted, measured, path) in sums.items()}


def _memory_overhead(runs: list[Run], plans: list[Plan]) -> float:
    """The median over runs of measured minus predicted peak memory, at least 0.

    Raises SpecError naming a log whose overhead is beyond the profile's bound."""
    overheads = []
    for run, plan in zip(runs, plans):
        found = measured_memory(list(run.logs), plan.peak_memory.peak_bytes, plan.peak_memory.breakdown_bytes)
        if found is None:
            continue
        limit = MEMORY_OVERHEAD_MAX_FRACTION * plan.capacity_bytes
        if found.measured_bytes - found.predicted_bytes > limit:
            raise SpecError(found.log.path, f"line {found.report.line}", f"a peak within {limit / GiB:.1f} GiB of loom's "
                            f"{found.predicted_bytes / GiB:.1f} GiB for its plan (is the log of the plan given?)",
                            f"{found.measured_bytes / GiB:.1f} GiB")
        overheads.append(found.measured_bytes - found.predicted_bytes)
    return max(0.0, statistics.median(overheads)) if overheads else 0.0


def _check(runs: list[Run]) -> None:
    """Runs of one GPU type, precision, framework and cluster, each log of its plan and model."""
    first = runs[0].job
    for run in runs:
        for field, ours, theirs in (("gpu", first.cluster.slowest.gpu.name, run.job.cluster.slowest.gpu.name),
                                    ("precision", first.precision, run.job.precision), ("framework", first.framework, run.job.framework),
                                    ("cluster", first.cluster.name, run.job.cluster.name)):
            if ours != theirs:
                raise SpecError(run.plan_path, field, f"{ours!r} like the first run's (one calibration per GPU type, precision, framework "
                                "and cluster)", theirs)
        check_features(run.job, run.report, run.plan_path)
        for log in run.logs:
            check_layout(run.report, run.plan, log)


def calibrate(runs: list[Run]) -> CalibrationDocument:
    """The calibration the runs support (module docstring), with each run's
    step time before and after.

    Raises SpecError naming a plan that is not of its job, a log that is not
    of its plan or has no steady state, or a factor out of bounds."""
    _check(runs)
    job = runs[0].job
    plans = [plan_of(run.job, run.report, run.plan, run.plan_path) for run in runs]
    traces = _traces(runs, plans)
    factors: dict[str, Factor] = _kernel_factors(job, traces) if traces else {}
    if not factors:
        per_run = [rate_factor(run.job, lambda priced, run=run: plan_of(priced, run.report, run.plan, run.plan_path).step_time_s,
                               run.measured_step_s, run.timed.path) for run in runs]
        mean = math.exp(statistics.fmean(math.log(value) for value in per_run))
        source = f"step time of {len(runs)} run{'s' * (len(runs) > 1)} (one factor for every kernel kind)"
        factors = {kind: Factor(value=mean, source=source) for kind in KERNEL_KINDS}
    factors.update(_tp_link_factors(job, traces))
    learnt = _document(job, [], memory_overhead_bytes=_memory_overhead(runs, plans), **factors)
    records = []
    for run, plan in zip(runs, plans):
        after = plan_of(calibrated(run.job, learnt), run.report, run.plan, run.plan_path)
        memory = measured_memory(list(run.logs), plan.peak_memory.peak_bytes, plan.peak_memory.breakdown_bytes)
        records.append(CalibratedRun(
            plan=run.plan_path, logs=[log.path for log in run.logs], model=run.job.model.name, layout=plan.layout.label(),
            tokens_per_step=plan.layout.global_batch_size * run.job.seq_length, measured_step_time_s=run.measured_step_s,
            predicted_step_time_s=plan.step_time_s, calibrated_step_time_s=after.step_time_s,
            measured_peak_bytes=memory.measured_bytes if memory else None, predicted_peak_bytes=memory.predicted_bytes if memory else None))
    return learnt.model_copy(update={"runs": records})


def expected_gain(document: CalibrationDocument, job: Job, tokens_per_s: float) -> tuple[CalibratedRun, float] | None:
    """Of the runs the calibration learnt from that ran this job (its model,
    cluster, framework and tokens per step), the fastest measured, and how
    much faster (+) or slower (-) a plan predicted at ``tokens_per_s`` under
    the calibration is than that run's own calibrated prediction: predicted
    against predicted, so what the calibration leaves unexplained is no
    gain. None when it learnt from no run of this job."""
    if (document.cluster, document.framework) != (job.cluster.name, job.framework):
        return None
    runs = [run for run in document.runs if run.model == job.model.name and run.measured_step_time_s > 0
            and run.tokens_per_step == job.global_batch_size * job.seq_length]
    if not runs:
        return None
    best = max(runs, key=lambda run: run.tokens_per_step / run.measured_step_time_s)
    return best, tokens_per_s / (best.tokens_per_step / best.calibrated_step_time_s) - 1
