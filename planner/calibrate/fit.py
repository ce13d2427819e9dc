"""Fit a calibration (profiles/calibration.py) to runs of plans: ``loom calibrate``.

Each run is a plan (a plan.json's best plan, rebuilt for the job: its layout
and its stages' layers, ``plan_of``) and what the run reported. What is
learnt, and from what:

- kernel rates. From profiler traces, each kind on its own: loom's GEMM
  (attention, elementwise) seconds on the traced rank's stage over the
  trace's, summed over the traced runs. From logs alone, one factor on all
  three, found per run by the secant method on log(step time) (the step
  falls as the rates rise, not in proportion: communication and the bubble
  stay) and combined over runs as the geometric mean;
- link efficiency, from traces: loom's tensor-parallel collective time
  (before overlap) over the trace's TP kernels, on the link kind (NVLink or
  network) that the plan's TP group spans;
- the memory overhead: the median over runs of the measured peak (like for
  like, compare.py) minus loom's, never below 0.

A factor outside [FACTOR_MIN, FACTOR_MAX] means the run is not what the
plan describes, and is refused (SpecError naming the log).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Callable

from loom.planner.calibrate.compare import check_layout, predicted_memory_bytes, step_time_s
from loom.planner.cost.network import Links
from loom.planner.output.report import PlanReport, Report
from loom.planner.plan import Plan, build_plan
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Job, calibrated_cluster
from loom.planner.specs.layout import Layout
from loom.planner.specs.stages import split_stages
from loom.profiles.calibration import FACTOR_MAX, FACTOR_MIN, CalibratedRun, CalibrationDocument, Factor
from loom.profiles.run_logs.record import RunLog

# The secant method stops when the predicted step is within this fraction of
# the measured one, or after SECANT_STEPS steps; a factor at its bound that
# still misses the step by more than BOUND_SLACK is refused.
SECANT_TOLERANCE = 1e-4
SECANT_STEPS = 8
BOUND_SLACK = 0.01
# How far a log's own parameter count (torchtitan prints it) may be from the
# job model's before the log is taken to be of another model: loom's counts
# are within 0.5% of the model cards (tests/test_decoder_families.py).
PARAMETER_TOLERANCE = 0.005


@dataclass(frozen=True)
class Run:
    """One run: the plan.json it ran (its best plan) and what it reported."""

    plan_path: str
    report: Report
    logs: tuple[RunLog, ...]

    @property
    def plan(self) -> PlanReport:
        return self.report.plans[0]

    @property
    def timed(self) -> RunLog:
        """The log whose step time counts: a training log before a trace."""
        return sorted(self.logs, key=lambda log: log.format == "chrome-trace")[0]


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


def _with(job: Job, document: CalibrationDocument) -> Job:
    return replace(job, cluster=calibrated_cluster(job, job.cluster, document, "calibration"))


def _document(job: Job, runs: list[CalibratedRun], **factors) -> CalibrationDocument:
    gpu = job.cluster.slowest.gpu
    return CalibrationDocument(schema_version=1, kind="calibration", gpu=gpu.name, precision=job.precision, framework=job.framework,
                               cluster=job.cluster.name, runs=runs, **factors)


def _placeholder_run() -> CalibratedRun:
    return CalibratedRun(plan="-", logs=["-"], model="-", layout="-", tokens_per_step=0, measured_step_time_s=0, predicted_step_time_s=0,
                         calibrated_step_time_s=0)


def _bounded(value: float, source: str, what: str) -> float:
    if not FACTOR_MIN <= value <= FACTOR_MAX:
        raise SpecError(source, what, f"a run within {FACTOR_MIN:g}x-{FACTOR_MAX:g}x of loom's rates for its plan (is the log of the "
                        "plan given? a straggler or a broken link?)", f"{value:.3g}x")
    return value


def rate_factor(job: Job, price: Callable[[Job], float], measured_s: float, source: str) -> float:
    """The one rate factor on GEMM, attention and elementwise kernels under
    which ``price`` (a job -> its predicted step, seconds) gives ``measured_s``
    (module docstring): the secant method on x = log(factor), y =
    log(predicted / measured), from x = 0 and x = y(0) (exact if the whole
    step scaled with 1 / rate).

    Raises SpecError naming ``source`` when no factor within bounds explains it."""
    low, high = math.log(FACTOR_MIN), math.log(FACTOR_MAX)

    def error(x: float) -> float:
        return math.log(price(rates_applied(job, math.exp(x)) if x else job) / measured_s)

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
        raise SpecError(source, "step time", f"a run within {FACTOR_MIN:g}x-{FACTOR_MAX:g}x of loom's kernel rates for its plan "
                        "(is the log of the plan given? a straggler or a broken link?)",
                        f"{math.exp(y1):.3g}x loom's step even at a factor of {math.exp(x1):.3g}")
    return math.exp(x1)


def rate_calibration(job: Job, factor: float, source: str) -> CalibrationDocument:
    """A calibration of ``job``'s GPU, precision and framework with one
    ``factor`` on its kernel rates (GEMM, attention, elementwise), learnt from ``source``."""
    kinds = {kind: Factor(value=factor, source=source) for kind in ("gemm", "attention", "elementwise")}
    return _document(job, [_placeholder_run()], **kinds)


def rates_applied(job: Job, factor: float) -> Job:
    """``job`` with its GPUs' kernel rates multiplied by ``factor``."""
    return _with(job, rate_calibration(job, factor, "fit"))


def compute_factor(job: Job, run: Run) -> float:
    """``rate_factor`` for one run of a saved plan."""
    return rate_factor(job, lambda priced: plan_of(priced, run.report, run.plan, run.plan_path).step_time_s,
                       step_time_s(run.report, run.plan, run.timed), run.timed.path)


def _kernel_factors(job: Job, runs: list[Run], plans: list[Plan]) -> dict[str, Factor]:
    """GEMM, attention and elementwise factors from the runs' traces."""
    predicted = {"gemm": 0.0, "attention": 0.0, "elementwise": 0.0}
    measured = dict.fromkeys(predicted, 0.0)
    traces = 0
    for run, plan in zip(runs, plans):
        for log in run.logs:
            if log.format != "chrome-trace":
                continue
            traces += 1
            stage = next((s.index for s in plan.stages if log.rank is not None and log.rank in s.ranks), 0)
            kernels = plan.step.stage_kernels[stage]
            for kind, seconds in (("gemm", kernels.gemm_s), ("attention", kernels.attention_s), ("elementwise", kernels.elementwise_s)):
                if log.timers_s.get(kind):
                    predicted[kind] += seconds
                    measured[kind] += log.timers_s[kind]
    source = f"kernel time of {traces} profiler trace{'s' * (traces > 1)}"
    return {kind: Factor(value=_bounded(predicted[kind] / measured[kind], source, f"{kind} kernels"), source=source)
            for kind in predicted if measured[kind] and predicted[kind]}


def _tp_link_factors(job: Job, runs: list[Run], plans: list[Plan]) -> dict[str, Factor]:
    """nvlink / network factors from the traces' TP collectives (module docstring)."""
    sums: dict[str, list[float]] = {}
    for run, plan in zip(runs, plans):
        if plan.layout.tp == 1:
            continue
        kind = Links.of(job, plan.layout).tp.kind
        for log in run.logs:
            if log.format == "chrome-trace" and log.timers_s.get("tp_comm") and plan.step.stage_tp_busy_s:
                stage = next((s.index for s in plan.stages if log.rank is not None and log.rank in s.ranks), 0)
                total = sums.setdefault(kind, [0.0, 0.0])
                total[0] += plan.step.stage_tp_busy_s[stage]
                total[1] += log.timers_s["tp_comm"]
    return {kind: Factor(value=_bounded(predicted / measured, "traces", f"{kind} TP collectives"),
                         source="tensor-parallel collective kernels of the traces") for kind, (predicted, measured) in sums.items()}


def calibrate(job: Job, runs: list[Run]) -> CalibrationDocument:
    """The calibration the runs support (module docstring), with each run's
    step time before and after.

    Raises SpecError naming a plan that is not of the job, a log that is not
    of its plan or has no steady state, or a factor out of bounds."""
    plans = []
    for run in runs:
        for log in run.logs:
            check_layout(run.report, run.plan, log)
            if log.parameters and abs(log.parameters / job.model.total_params() - 1) > PARAMETER_TOLERANCE:
                raise SpecError(log.path, "total parameters", f"{job.model.total_params():,} ({job.model.name}, within "
                                f"{PARAMETER_TOLERANCE:.1%}): this log is of another model", f"{log.parameters:,}")
        plans.append(plan_of(job, run.report, run.plan, run.plan_path))
    factors: dict[str, Factor] = _kernel_factors(job, runs, plans)
    if not factors:
        per_run = [compute_factor(job, run) for run in runs]
        mean = math.exp(statistics.fmean(math.log(value) for value in per_run))
        source = f"step time of {len(runs)} run{'s' * (len(runs) > 1)} (one factor for every kernel kind)"
        factors = {kind: Factor(value=mean, source=source) for kind in ("gemm", "attention", "elementwise")}
    factors.update(_tp_link_factors(job, runs, plans))
    overheads = []
    for run, plan in zip(runs, plans):
        peaks = [log.peak_memory for log in run.logs if log.peak_memory is not None]
        if peaks:
            peak = max(peaks, key=lambda p: p.max_reserved_bytes or p.max_allocated_bytes or 0.0)
            reserved = peak.max_reserved_bytes is not None
            measured = peak.max_reserved_bytes if reserved else peak.max_allocated_bytes
            overheads.append(measured - predicted_memory_bytes(peak_bytes=plan.peak_memory.peak_bytes,
                                                               breakdown=plan.peak_memory.breakdown_bytes, reserved=reserved))
    overhead = max(0.0, statistics.median(overheads)) if overheads else 0.0
    provisional = _document(job, [_placeholder_run()], memory_overhead_bytes=overhead, **factors)
    calibrated_job = _with(job, provisional)
    records = []
    for run, plan in zip(runs, plans):
        after = plan_of(calibrated_job, run.report, run.plan, run.plan_path)
        peaks = [log.peak_memory for log in run.logs if log.peak_memory is not None]
        peak = max(peaks, key=lambda p: p.max_reserved_bytes or p.max_allocated_bytes or 0.0) if peaks else None
        reserved = peak is not None and peak.max_reserved_bytes is not None
        records.append(CalibratedRun(
            plan=run.plan_path, logs=[log.path for log in run.logs], model=job.model.name, layout=plan.layout.label(),
            tokens_per_step=plan.layout.global_batch_size * job.seq_length,
            measured_step_time_s=step_time_s(run.report, run.plan, run.timed), predicted_step_time_s=plan.step_time_s,
            calibrated_step_time_s=after.step_time_s,
            measured_peak_bytes=None if peak is None else (peak.max_reserved_bytes if reserved else peak.max_allocated_bytes),
            predicted_peak_bytes=None if peak is None else predicted_memory_bytes(
                peak_bytes=plan.peak_memory.peak_bytes, breakdown=plan.peak_memory.breakdown_bytes, reserved=reserved)))
    return provisional.model_copy(update={"runs": records})


def expected_gain(document: CalibrationDocument, job: Job, tokens_per_s: float) -> tuple[CalibratedRun, float] | None:
    """The fastest run of ``job``'s model the calibration learnt from, and how
    much faster (+) or slower (-) a plan predicted at ``tokens_per_s`` under
    it would be; None when it learnt from no run of this model."""
    runs = [run for run in document.runs if run.model == job.model.name and run.measured_step_time_s > 0]
    if not runs:
        return None
    best = max(runs, key=lambda run: run.tokens_per_step / run.measured_step_time_s)
    return best, tokens_per_s / (best.tokens_per_step / best.measured_step_time_s) - 1
