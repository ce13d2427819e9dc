"""Rich rendering of plans for the terminal."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from loom.planner.cost.layers import shape_of, sources
from loom.planner.cost.memory import GiB
from loom.planner.plan import Plan
from loom.planner.output.report import PlanReport
from loom.planner.specs.layout import label_legend
from loom.planner.schedule.simulate import Simulation


def titled_table(title: str, caption: str | None = None) -> Table:
    """loom's table style: no outer box, one space between columns, the
    title and caption left-aligned and the table at least as wide as the
    title, so that a title wraps only at the terminal's edge."""
    return Table(title=title, caption=caption, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                 collapse_padding=True, min_width=len(title))


def whole_figures(table: Table) -> Table:
    """Figures are never cut: each right-aligned (numeric) column keeps the
    width of its widest cell; when a row is too wide for the terminal the
    text columns wrap instead (a long layout label onto a second line)."""
    for column in table.columns:
        if column.justify == "right":
            column.no_wrap = True
            column.min_width = max(len(str(cell)) for cell in [column.header, *column.cells])
        else:
            column.no_wrap, column.overflow = False, "fold"
    return table


def plans_table(plans: list[Plan], title: str) -> Table:
    """The ranked plans, one line each, 80 columns wide for labels up to ~40
    characters (a longer label wraps; the figures are never cut); a legend
    of its words below."""
    # mixed clusters: several (as printed: an A100 and an H100 of 80 GB both hold 79.1 GiB)
    capacities = sorted({f"{capacity / GiB:.1f}" for plan in plans for capacity in plan.stage_capacity_bytes}, key=float)
    table = titled_table(f"{title}, {' or '.join(capacities)} GiB per GPU")
    placed = any(plan.placement_solve for plan in plans)
    idle = any(plan.unused_gpus for plan in plans)
    dispatchers = len({plan.job.features.moe_token_dispatcher for plan in plans})  # a search that tried several names each
    columns = [("#", "right"), ("layout", "left"), ("step s", "right"), ("tok/s", "right"), ("MFU", "right"), ("GiB", "right")]
    for column, justify in columns + ([("placed", "right")] if placed else []) + ([("idle", "right")] if idle else []):
        table.add_column(column, justify=justify)
    for rank, plan in enumerate(plans, start=1):
        row = [
            str(rank),
            plan.layout.label() + (f" {plan.job.features.moe_token_dispatcher}" if dispatchers > 1 else ""),
            f"{plan.step_time_s:.3f}",
            short_count(plan.tokens_per_s),
            f"{plan.mfu:.1%}",
            f"{plan.peak_memory.peak_bytes / GiB:.1f}",
        ]
        table.add_row(*row, *([_placement_saved(plan)] if placed else []), *([str(plan.unused_gpus)] if idle else []))
    captions = [label_legend([plan.layout.label() for plan in plans]) + "; GiB: peak memory of the fullest GPU"
                + ("; then the MoE token dispatcher" if dispatchers > 1 else "")]
    if idle:
        captions.append("idle: GPUs the plan leaves unused: the slowest nodes (a slower kind of GPU, or a node count whose "
                        "prime factors, or the global batch's, force a poor layout), or those the layout given does not fill")
    if placed:
        captions.append("placed: step time the solver's rank placement saves against Megatron's default order on the same links "
                        "(* not proven optimal; -: not re-placed)")
    if plans[0].job.profiles:
        captions.append(_profile_caption(plans[0]))
    table.caption = "\n".join(captions)
    return whole_figures(table)


def figure(value: float) -> str:
    """A measured or estimated figure in at most 6 characters, never in
    exponent form: 0.0166, 343, 12,345, <0.001."""
    if value == 0:
        return "0"
    if abs(value) < 0.001:
        return "<0.001"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def short_count(value: float) -> str:
    """Six characters at most: 987,654 as 987.7k, 12,345,678 as 12.35M."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


def _profile_caption(plan: Plan) -> str:
    """Which of the best plan's figures the --profile files replaced."""
    found = sources(shape_of(plan.job, plan.layout), plan.job.cluster.slowest.gpu, plan.layout.recompute)
    by_level = {level: [name.replace("_", " ") for name, got in found.items() if got == level] for level in ("measured", "interpolated", "estimated")}
    summary = "; ".join(f"{level}: {', '.join(names)}" for level, names in by_level.items() if names)
    return f"--profile {', '.join(plan.job.profiles)} (plan 1) {summary}"


def _placement_saved(plan: Plan) -> str:
    """How much faster the step is on the solver's placement; * where the
    solver did not prove it optimal."""
    solve = plan.placement_solve
    if solve is None:
        return "-"
    saved = 1 - plan.step_time_s / plan.start_step_time_s
    return f"{saved:.1%}" + ("" if solve.status == "optimal" else "*")


def breakdown_table(plan: Plan) -> Table:
    """Where the best plan's step time and memory go."""
    table = titled_table(f"plan 1, {plan.layout.label()}: {plan.tflops_per_gpu:.0f} TFLOP/s per GPU")
    table.add_column("time", justify="left")
    table.add_column("s", justify="right")
    table.add_column("memory (peak stage)", justify="left")
    table.add_column("GiB", justify="right")
    times = [(k, v) for k, v in plan.step.breakdown_s.items() if v > 0]
    memory = [(k, v) for k, v in plan.peak_memory.breakdown_bytes.items() if v > 0]
    for i in range(max(len(times), len(memory))):
        t = times[i] if i < len(times) else ("", None)
        m = memory[i] if i < len(memory) else ("", None)
        table.add_row(t[0], "" if t[1] is None else f"{t[1]:.3f}", m[0], "" if m[1] is None else f"{m[1] / GiB:.2f}")
    stages = ", ".join(str(stage.num_layers) for stage in plan.stages)
    table.caption = f"layers per stage: {stages}"
    return whole_figures(table)


def show(console: Console, plans: list[Plan], title: str) -> None:
    console.print(plans_table(plans, title))
    console.print(breakdown_table(plans[0]))


def explain_tables(plan: PlanReport, simulation: Simulation, saved: Simulation | None = None) -> list[Table]:
    """A saved plan's step-time breakdown and, per stage, its layers, memory,
    in-flight micro batches and busy time in the simulated schedule. Under
    another schedule than the plan's (``saved`` its simulation) a stage's
    peak changes by the activations that schedule holds beyond the saved
    one's (Simulation.peak_activation_bytes, from the plan's own per-chunk
    activations)."""
    saved = saved or simulation
    peaks = [peak + held - held_saved for peak, held, held_saved in
             zip(plan.memory.per_stage_peak_bytes, simulation.peak_activation_bytes, saved.peak_activation_bytes)]
    step = plan.predicted.step_time_s
    times = titled_table(f"{plan.label}: {step:.3f} s per step, MFU {plan.predicted.mfu:.1%}")
    times.add_column("where the step goes")
    times.add_column("s", justify="right")
    times.add_column("share", justify="right")
    for name, seconds in plan.predicted.breakdown_s.items():
        if seconds > 0:
            times.add_row(name, f"{seconds:.3f}", f"{seconds / step:.1%}")
    measured = [name.replace("_", " ") for name, level in plan.sources.items() if level != "estimated"]
    times.caption = f"from measurements: {', '.join(measured)}" if measured else "every figure estimated (no --profile, no measured links)"

    stages = titled_table(f"stages under {simulation.schedule}: idle {simulation.bubble_fraction():.1%} of the pipeline on average")
    for column in ("stage", "layers", "peak GiB", "capacity GiB", "in flight", "busy s", "idle s"):
        stages.add_column(column, justify="right")
    for report, peak, in_flight, busy in zip(plan.stages, peaks, simulation.peak_in_flight, simulation.busy_s):
        stages.add_row(
            str(report.index), str(report.layers), f"{peak / GiB:.1f}", f"{plan.memory.stage_capacity_bytes(report.index) / GiB:.1f}",
            str(in_flight), f"{busy:.3f}", f"{simulation.pipeline_time_s - busy:.3f}",
        )
    capacity = [plan.memory.stage_capacity_bytes(stage) for stage in range(len(peaks))]
    fullest = max(range(len(peaks)), key=lambda stage: peaks[stage] / capacity[stage])
    if not plan.memory.fits or peaks[fullest] > capacity[fullest]:
        stages.caption = (f"does not fit under {simulation.schedule}: stage {fullest} needs {peaks[fullest] / GiB:.1f} GiB of a "
                          f"{capacity[fullest] / GiB:.1f} GiB GPU")
    return [whole_figures(times), whole_figures(stages)]
