"""Measured against predicted: one plan (a plan.json's report) and what the
runs of it reported (``RunLog``s), figure by figure (``loom compare``).

What is compared, when the run reported it:

- the step time: the median steady-state iteration (record.py says which
  iterations are warm-up); a rate (torchtitan's tps, DeepSpeed's samples/s)
  is turned into a time with the plan's batch and sequence;
- the peak memory of the fullest GPU, like for like: PyTorch's allocator
  statistics (max reserved, else max allocated) never include the CUDA
  context or NCCL's buffers, which the driver and NCCL allocate outside the
  caching allocator (PyTorch "CUDA semantics: memory management"), nor, for
  max allocated, the allocator's fragmentation; those terms of loom's peak
  are left out of the prediction compared;
- terms: Megatron's timers (``--timing-log-level 1``, megatron/core/timers.py;
  what each times is in ``MEGATRON_TIMERS``), DeepSpeed's wall-clock
  breakdown, or a profiler trace's kernels (per kind, and each collective's
  time not hidden behind compute), each against the loom terms it covers.

Rows come largest discrepancy (in seconds, or bytes) first, each with what
in loom's model it points to (``POINTS_TO``).
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass

from loom.planner.output.report import PlanReport, Report
from loom.planner.specs.errors import SpecError
from loom.profiles.run_logs.record import GiB, RankMemory, RunLog

# loom's predicted terms (breakdown_s keys) grouped as each framework times them.
ALL_BUT_OPTIMIZER = ("compute_forward", "compute_backward", "recompute", "tp_comm", "cp_comm", "ep_comm", "host_overhead",
                     "overlap_contention", "sharding_comm", "offload_copies", "pp_comm", "pipeline_bubble", "dp_grad_reduce", "sharding_comm_once",
                     "embedding_sync")
WORK = ("compute_forward", "compute_backward", "recompute", "tp_comm", "cp_comm", "ep_comm", "host_overhead", "overlap_contention")
# Megatron's timers (megatron/core/timers.py), by the code each wraps:
# forward-backward the whole schedule incl. finalize_model_grads
# (core/pipeline_parallel/schedules.py), all-grads-sync finish_grad_sync
# (core/distributed/finalize_model_grads.py), params-all-gather the
# distributed optimizer's gather (core/optimizer/distrib_optimizer.py),
# optimizer the whole optimizer.step() (training.py train_step). Times are per
# iteration (training_log normalises by the log interval). "forward-compute"
# and "backward-compute" wrap each micro batch's forward_step/backward_step,
# TP/CP/EP communication inside them included; the p2p timers (recv, send)
# include waiting for the neighbour stage, i.e. the bubble.
MEGATRON_TIMERS = {
    "forward-backward": ALL_BUT_OPTIMIZER,
    "forward-compute + backward-compute": WORK,
    "pipeline send/recv (p2p timers)": ("pp_comm", "pipeline_bubble"),
    "all-grads-sync": ("dp_grad_reduce", "sharding_comm_once"),
    "embedding-grads-all-reduce": ("embedding_sync",),
    "params-all-gather": ("dp_param_gather",),
    "optimizer": ("optimizer", "dp_param_gather"),
}
MEGATRON_P2P = ("forward-recv", "forward-send", "backward-recv", "backward-send", "forward-send-forward-recv",
                "forward-send-backward-recv", "backward-send-forward-recv", "backward-send-backward-recv",
                "forward-backward-send-forward-backward-recv")
# DeepSpeed's global timers (deepspeed/runtime/engine.py): fwd and bwd summed
# over the step's micro batches; bwd_allreduce the gradient reduction; step
# the optimizer step (ZeRO's parameter gather after it included). A
# pipeline's send/recv timers (runtime/pipe/engine.py) wait for the
# neighbour stage, so hold the bubble.
DEEPSPEED_PIPE = ("pipe_send_output", "pipe_send_grad", "pipe_recv_input", "pipe_recv_grad")
DEEPSPEED_TIMERS = {
    "pipeline send/recv (pipe timers)": ("pp_comm", "pipeline_bubble"),
    "fwd": ("compute_forward",),
    "bwd_inner": ("compute_backward", "recompute", "overlap_contention"),
    "bwd_allreduce": ("dp_grad_reduce", "sharding_comm", "sharding_comm_once"),
    "step": ("optimizer", "dp_param_gather", "offload_copies"),
}
# A trace's exposed collectives and idle time against loom's exposed terms.
TRACE_EXPOSED = {
    "tp_comm": ("tp_comm",),
    "cp_comm": ("cp_comm",),
    "ep_comm": ("ep_comm",),
    "pp_comm": ("pp_comm",),
    "dp_comm": ("dp_grad_reduce", "dp_param_gather", "sharding_comm", "sharding_comm_once", "embedding_sync"),
    "idle": ("pipeline_bubble", "host_overhead"),
    # collectives whose group the trace does not say (torch < 2.4 copies no process group onto kernels): all of loom's
    "comm": ("tp_comm", "cp_comm", "ep_comm", "pp_comm", "dp_grad_reduce", "dp_param_gather", "sharding_comm", "sharding_comm_once",
             "embedding_sync"),
}
# What to do when a run reported no per-term figure, by log format.
NO_TERMS = {
    "megatron": "no per-term figures: Megatron prints its timers with --timing-log-level 1 (loom plan --trials sets it); a "
                "torch.profiler trace gives every kernel",
    "deepspeed": "no per-term figures: DeepSpeed prints them with wall_clock_breakdown (loom plan --trials sets it); a "
                 "torch.profiler trace gives every kernel",
    "torchtitan": "torchtitan prints no per-term figures: give its profiler trace after the log (loom plan --trials switches the "
                  "profiler on: profile_traces/iteration_N/rank0_trace.json under its dump folder)",
}
FRAMEWORK_LOGS = ("megatron", "torchtitan", "deepspeed")  # log formats of one framework (a trace is of any)
# Megatron's argument names for the layout fields a plan fixes.
# (Not expert_tensor_parallel_size: Megatron sets it to the TP size when not
# given, so a dense model's dump differs from the plan's etp 1.)
MEGATRON_ARGUMENTS = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp", "context_parallel_size": "cp",
                      "expert_model_parallel_size": "ep", "data_parallel_size": "dp", "micro_batch_size": "micro_batch_size",
                      "global_batch_size": "global_batch_size"}
# How far a log's own parameter count (torchtitan prints it) may be from the
# plan's model before the log is taken to be of another model: loom's counts
# are within 0.5% of the model cards (tests/test_decoder_families.py).
PARAMETER_TOLERANCE = 0.005
# Terms outside PyTorch's caching allocator (see the module docstring).
OUTSIDE_ALLOCATOR = ("cuda_context", "nccl_buffers")

# What a discrepancy in each measured term points to in loom's model.
POINTS_TO = {
    "step time": "the terms below; with none measured, rerun with loom plan --trials' logging flags or a torch.profiler trace",
    "peak memory": "memory.py's terms (loom explain lists them); loom calibrate learns the framework overhead",
    "forward-backward": "the pipeline: compute rates, TP/CP/EP communication and the schedule's bubble",
    "forward-compute + backward-compute": "compute rates (gemm_efficiency, attention_efficiency in gpus.yaml) and TP/CP/EP links",
    "pipeline send/recv (p2p timers)": "the pipeline bubble (stage balance, schedule) and the PP link",
    "all-grads-sync": "the data-parallel reduce-scatter/all-reduce left after backward (NIC efficiency, overlap_grad_reduce)",
    "embedding-grads-all-reduce": "the tied-embedding sync between the first and last stage",
    "params-all-gather": "the distributed optimizer's parameter all-gather (overlap_param_gather)",
    "optimizer": "the optimizer step (HBM streaming of its states) and the parameter gather",
    "pipeline send/recv (pipe timers)": "the pipeline bubble (stage balance, schedule) and the PP link",
    "fwd": "forward compute rates",
    "bwd_inner": "backward compute rates and recomputation",
    "bwd_allreduce": "the gradient reduction (NIC efficiency, ZeRO's bucket overlap)",
    "step": "the optimizer step and ZeRO's parameter gather",
    "gemm": "GEMM efficiency (gpus.yaml gemm_efficiency; loom profile gemm measures it)",
    "attention": "attention efficiency (gpus.yaml attention_efficiency)",
    "elementwise": "memory-bound kernels (HBM bandwidth x HBM_EFFICIENCY in efficiency.py)",
    "optimizer kernels": "the optimizer step's HBM streaming",
    "tp_comm": "tensor-parallel collectives not hidden behind GEMMs (NVLink efficiency, tp_comm_overlap)",
    "cp_comm": "context-parallel ring exchange not hidden behind attention",
    "ep_comm": "MoE token dispatch and combine (all-to-all link, dispatcher)",
    "pp_comm": "pipeline send/recv not hidden",
    "dp_comm": "data-parallel gradient reduce and parameter gather not hidden behind compute",
    "idle": "pipeline bubble and host overhead (kernel launches, data loading)",
    "comm": "collectives of groups the trace does not name (torch < 2.4), against all of loom's exposed communication",
}


@dataclass(frozen=True)
class Row:
    """One figure: ``measured`` against ``predicted`` (seconds, or bytes for
    memory), where the measurement came from and what it points to."""

    quantity: str
    measured: float
    predicted: float
    unit: str  # "s" | "bytes"
    source: str
    points_to: str

    @property
    def error(self) -> float:
        """predicted / measured - 1: below 0, loom is too optimistic."""
        return self.predicted / self.measured - 1 if self.measured else float("inf") if self.predicted else 0.0

    @property
    def difference(self) -> float:
        """predicted - measured (seconds or bytes)."""
        return self.predicted - self.measured


@dataclass(frozen=True)
class Comparison:
    """A plan against its runs: the step time, the memory (when the logs
    reported it) and the terms, largest discrepancy first."""

    label: str
    step: Row
    memory: Row | None
    terms: tuple[Row, ...]
    warmup_iterations: int
    steady_intervals: int
    notes: tuple[str, ...]


def stage_of_rank(stages: Iterable[tuple[int, Container[int]]], rank: int | None) -> int:
    """The pipeline stage (of ``(index, its ranks)`` pairs) a global rank
    belongs to; stage 0 when the rank is unknown."""
    return next((index for index, ranks in stages if rank is not None and rank in ranks), 0)


def timed_log(logs: list[RunLog]) -> RunLog:
    """The log whose step time counts: a training log (more iterations)
    before a trace, one with steady-state intervals before one without."""
    return sorted(logs, key=lambda log: (not log.steady, log.format == "chrome-trace"))[0]


def step_time_s(report: Report, plan: PlanReport, log: RunLog) -> float:
    """The run's median steady-state step, in seconds (rates turned into time
    with the plan's batch). Raises SpecError when the log has none."""
    parallel = plan.parallel
    tokens_per_gpu = parallel.global_batch_size * report.seq_length / parallel.world_size
    return log.step_time_s(tokens_per_step_per_gpu=tokens_per_gpu, samples_per_step=parallel.global_batch_size)


def predicted_memory_bytes(peak_bytes: float, breakdown: dict[str, float], reserved: bool) -> float:
    """loom's peak (``peak_bytes``, made of ``breakdown``) as PyTorch's
    allocator reports it: max reserved, or max allocated."""
    left_out = OUTSIDE_ALLOCATOR + (() if reserved else ("allocator_fragmentation",))
    return peak_bytes - sum(breakdown.get(term, 0.0) for term in left_out)


@dataclass(frozen=True)
class MemoryComparison:
    """The fullest rank any log reported against loom's peak, like for like."""

    log: RunLog
    report: RankMemory
    predicted_bytes: float

    @property
    def measured_bytes(self) -> float:
        return self.report.peak_bytes


def measured_memory(logs: list[RunLog], peak_bytes: float, breakdown: dict[str, float]) -> MemoryComparison | None:
    """The fullest rank any log reported and loom's peak (``peak_bytes``, made
    of ``breakdown``) as that report counts (``predicted_memory_bytes``); None
    when no log reported memory."""
    reports = [(log, log.peak_memory) for log in logs if log.peak_memory is not None]
    if not reports:
        return None
    log, peak = max(reports, key=lambda item: item[1].peak_bytes)
    return MemoryComparison(log, peak, predicted_memory_bytes(peak_bytes, breakdown, peak.reserved))


def _sum(breakdown: dict[str, float], terms: tuple[str, ...]) -> float:
    """Seconds of ``terms`` in loom's ``breakdown``."""
    return sum(breakdown.get(term, 0.0) for term in terms)


def _timer_rows(plan: PlanReport, log: RunLog) -> list[Row]:
    """Megatron's or DeepSpeed's timers against the loom terms each covers.
    The p2p timers are summed, each the slowest rank's: an upper bound."""
    breakdown, timers = plan.predicted.breakdown_s, dict(log.timers_s)
    rows = []
    if log.format == "megatron":
        if "forward-compute" in timers and "backward-compute" in timers:
            timers["forward-compute + backward-compute"] = timers["forward-compute"] + timers["backward-compute"]
        p2p = [timers[name] for name in MEGATRON_P2P if name in timers]
        if p2p:
            timers["pipeline send/recv (p2p timers)"] = sum(p2p)
        table = MEGATRON_TIMERS
    elif log.format == "deepspeed":
        pipe = [timers[name] for name in DEEPSPEED_PIPE if name in timers]
        if pipe:
            timers["pipeline send/recv (pipe timers)"] = sum(pipe)
        table = DEEPSPEED_TIMERS
    else:
        return rows
    for name, terms in table.items():
        if name in timers:
            rows.append(Row(name, timers[name], _sum(breakdown, terms), "s", f"{log.path}: timer {name}", POINTS_TO[name]))
    return rows


def traced_stage(plan: PlanReport, log: RunLog) -> int:
    """The stage of the rank a trace was taken on (0 when it does not say).

    Raises SpecError naming the trace when its rank is not one of the plan's."""
    if log.rank is not None and log.rank >= plan.parallel.world_size:
        raise SpecError(log.path, "distributedInfo.rank", f"a rank of the plan's {plan.parallel.world_size} ({plan.label})", log.rank)
    return stage_of_rank(((s.index, s.global_ranks) for s in plan.stages), log.rank)


def _trace_rows(plan: PlanReport, log: RunLog) -> list[Row]:
    """A trace's kernels by kind (on the traced rank's stage), optimizer
    kernels, exposed collectives and idle time against loom's terms."""
    stage = plan.stages[traced_stage(plan, log)]
    breakdown, rows = plan.predicted.breakdown_s, []
    for kind in ("gemm", "attention", "elementwise"):
        if kind in log.timers_s and kind in stage.kernels_s:
            rows.append(Row(kind, log.timers_s[kind], stage.kernels_s[kind], "s", f"{log.path}: {kind} kernels, stage {stage.index}",
                            POINTS_TO[kind]))
    if "optimizer" in log.timers_s:
        rows.append(Row("optimizer kernels", log.timers_s["optimizer"], breakdown.get("optimizer", 0.0), "s",
                        f"{log.path}: optimizer kernels", POINTS_TO["optimizer kernels"]))
    # Collectives the trace names no group for (torch < 2.4) are set against all
    # of loom's communication, once: each group's own row then only where the
    # trace measured that group, and no "comm" row where it named every one.
    unlabelled = log.exposed_s.get("comm", 0.0) > 0
    for term, terms in TRACE_EXPOSED.items():
        measured, predicted = log.exposed_s.get(term, 0.0), _sum(breakdown, terms)
        grouped = term not in ("comm", "idle")
        if (term == "comm" and not unlabelled) or (grouped and unlabelled and not measured):
            continue
        if measured or predicted:
            rows.append(Row(term, measured, predicted, "s", f"{log.path}: {term} exposed", POINTS_TO[term]))
    return rows


def compare(report: Report, logs: list[RunLog], plan_index: int = 0) -> Comparison:
    """The plan ``report.plans[plan_index]`` against ``logs`` (one run: its
    log, and optionally its trace). The step time is the first log's that
    has one (a training log before a trace: its iterations are more).

    Raises SpecError naming a log with no steady-state step, or whose
    arguments contradict the plan's layout (``check_layout``)."""
    plan = report.plans[plan_index]
    for log in logs:
        check_layout(report, plan, log)
    timed = timed_log(logs)
    measured_s = step_time_s(report, plan, timed)
    notes = []
    step = Row("step time", measured_s, plan.predicted.step_time_s, "s",
               f"{timed.path}: median of {len(timed.steady)} logged intervals after {timed.warmup_iterations} warm-up iterations",
               POINTS_TO["step time"])
    memory_row = None
    found = measured_memory(logs, plan.memory.peak_bytes_per_gpu, plan.memory.breakdown_bytes)
    if found:
        log, peak = found.log, found.report
        largest = max(plan.memory.per_stage_capacity_bytes or [plan.memory.capacity_bytes])  # a mixed cluster's largest GPU (schema 1.8)
        if peak.peak_bytes > largest:
            raise SpecError(log.path, f"line {peak.line}", f"a peak within the GPU's {largest / GiB:.2f} GiB (PyTorch's "
                            "allocator hands out no more): this log is of another GPU", f"{peak.peak_bytes / GiB:,.2f} GiB")
        statistic = "max reserved" if peak.reserved else "max allocated"
        memory_row = Row("peak memory", found.measured_bytes, found.predicted_bytes, "bytes",
                         f"{log.path}:{peak.line}: rank {peak.rank} {statistic}", POINTS_TO["peak memory"])
        if plan.parallel.pp > 1 and log.format == "torchtitan" and len(log.memory) == 1:
            notes.append("torchtitan logs rank 0's memory only (LOG_RANK): the first pipeline stage, not necessarily the fullest")
    estimate = next((log.framework_estimate_bytes for log in logs if log.framework_estimate_bytes), None)
    if estimate:
        notes.append(f"Megatron's own estimate (theoretical_memory_usage.py, weights, optimizer and activations only): "
                     f"{estimate / GiB:.2f} GiB")
    terms = [row for log in logs for row in (_trace_rows(plan, log) if log.format == "chrome-trace" else _timer_rows(plan, log))]
    if not terms:
        notes.append(NO_TERMS.get(timed.format, NO_TERMS["megatron"]))
    traced = [log for log in logs if log.format == "chrome-trace"]
    if traced and plan.parallel.pp > 1:
        stage = traced_stage(plan, traced[0])
        notes.append(f"the trace is of rank {traced[0].rank if traced[0].rank is not None else '(unknown: taken as 0)'}, stage "
                     f"{stage}; loom's breakdown is of its slowest stage")
    terms.sort(key=lambda row: -abs(row.difference))
    return Comparison(label=plan.label, step=step, memory=memory_row, terms=tuple(terms), warmup_iterations=timed.warmup_iterations,
                      steady_intervals=len(timed.steady), notes=tuple(notes))


def check_layout(report: Report, plan: PlanReport, log: RunLog) -> None:
    """A log must be of the plan: what it printed of its configuration
    (Megatron's argument dump, torchtitan's model size) must match the
    plan's layout, sequence, model and precision.

    Raises SpecError naming the log, the field, the plan's value and the log's."""
    if log.format in FRAMEWORK_LOGS and log.format != report.framework:
        raise SpecError(log.path, "<file>", f"a {report.framework} log (the plan is for {report.framework})", f"a {log.format} log")
    parallel = plan.parallel.model_dump()
    for argument, field in MEGATRON_ARGUMENTS.items():
        text = log.arguments.get(argument)
        if text is not None and text.strip().isdigit() and int(text) != parallel[field]:
            raise SpecError(log.path, argument, f"{parallel[field]}, the plan's {field} ({plan.label}): this log is of another "
                            "layout", int(text))
    batch = plan.parallel.global_batch_size
    other = next((interval for interval in log.steady if interval.global_batch_size not in (None, batch)), None)
    if other is not None:
        raise SpecError(log.path, f"line {other.line}", f"global batch size {batch}, the plan's, in every timed iteration: this log is of "
                        "another job, or of a batch-size ramp-up (time the run after it)", other.global_batch_size)
    text = log.arguments.get("seq_length")
    if text is not None and text.strip().isdigit() and int(text) != report.seq_length:
        raise SpecError(log.path, "seq_length", f"{report.seq_length}, the plan's sequence length", int(text))
    if log.pipelined is not None and log.pipelined != (plan.parallel.pp > 1):
        engine = "PipelineEngine's 'steps: ... iter time' lines" if log.pipelined else "DeepSpeedEngine's throughput lines"
        raise SpecError(log.path, "<file>", f"a log of {plan.parallel.pp} pipeline stage(s), the plan's ({plan.label})",
                        f"{engine}: a run {'with' if log.pipelined else 'without'} a pipeline")
    total = report.model_parameters
    if log.parameters and total and abs(log.parameters / total - 1) > PARAMETER_TOLERANCE:
        raise SpecError(log.path, "total parameters", f"{total:,} ({report.model}, within {PARAMETER_TOLERANCE:.1%}): this log is of "
                        "another model", f"{log.parameters:,}")
    logged = megatron_precision(log.arguments)
    if logged is not None and logged[1] != report.precision:
        argument, precision = logged
        raise SpecError(log.path, argument, f"the plan's precision, {report.precision}: this log ran {precision}", log.arguments[argument])
    recipe, planned = log.arguments.get("fp8_recipe"), report.features.get("fp8_recipe")
    if logged is not None and logged[1] == "fp8" and recipe is not None and planned is not None and recipe != planned:
        raise SpecError(log.path, "fp8_recipe", f"the plan's fp8 recipe, {planned} (it sets the GEMMs' rate as the precision does)", recipe)


def megatron_precision(arguments: dict[str, str]) -> tuple[str, str] | None:
    """The precision a Megatron argument dump says the run trained in, as
    loom names it, and the argument that says so (None: no dump): fp4 or
    fp8 set (not "None") for NVFP4 and fp8 GEMMs, else bf16 or fp16 True,
    else fp32 weights (loom's tf32; megatron/training/arguments.py)."""
    if "bf16" not in arguments and "fp16" not in arguments:
        return None
    for argument, precision in (("fp4", "nvfp4"), ("fp8", "fp8")):
        if arguments.get(argument, "None") != "None":
            return argument, precision
    for argument in ("bf16", "fp16"):
        if arguments.get(argument) == "True":
            return argument, argument
    return ("bf16" if "bf16" in arguments else "fp16"), "tf32"
