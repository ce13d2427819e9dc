"""Rich rendering of plans for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from loom.planner.cost.layers import shape_of, sources
from loom.planner.cost.memory import GiB
from loom.planner.plan import Plan
from loom.planner.output.report import PlanReport
from loom.planner.schedule.simulate import Simulation


def plans_table(plans: list[Plan], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    placed = any(plan.placement_solve for plan in plans)
    columns = [("#", "right"), ("layout", "left"), ("step s", "right"), ("tokens/s", "right"),
               ("TFLOP/s/GPU", "right"), ("MFU", "right"), ("peak / capacity GiB", "right")]
    for column, justify in columns + ([("placement saved", "right")] if placed else []):
        table.add_column(column, justify=justify)
    for rank, plan in enumerate(plans, start=1):
        peak = plan.peak_memory.peak_bytes / GiB
        row = [
            str(rank),
            plan.layout.label(),
            f"{plan.step_time_s:.3f}",
            f"{plan.tokens_per_s:,.0f}",
            f"{plan.tflops_per_gpu:.0f}",
            f"{plan.mfu:.1%}",
            f"{peak:.1f} / {plan.capacity_bytes / GiB:.1f}",
        ]
        table.add_row(*row, *([_placement_saved(plan)] if placed else []))
    captions = ["placement saved: step time against Megatron's default rank order on the same links"] if placed else []
    if plans[0].job.profiles:
        captions.append(_profile_caption(plans[0]))
    table.caption = "\n".join(captions) or None
    return table


def _profile_caption(plan: Plan) -> str:
    """Which of the best plan's figures the --profile files replaced."""
    found = sources(shape_of(plan.job, plan.layout), plan.job.cluster.slowest.gpu, plan.layout.recompute)
    by_level = {level: [name.replace("_", " ") for name, got in found.items() if got == level] for level in ("measured", "interpolated", "estimated")}
    summary = "; ".join(f"{level}: {', '.join(names)}" for level, names in by_level.items() if names)
    return f"--profile {', '.join(plan.job.profiles)} (plan 1) {summary}"


def _placement_saved(plan: Plan) -> str:
    """How much faster the step is on the solver's placement, with the solver's gap."""
    solve = plan.placement_solve
    if solve is None:
        return "not placed"
    saved = 1 - plan.step_time_s / plan.start_step_time_s
    return f"{saved:.1%} ({solve.status}, gap {solve.gap:.0%})"


def breakdown_table(plan: Plan) -> Table:
    """Where the best plan's step time and memory go."""
    table = Table(title=f"{plan.layout.label()}: where the time and memory go", title_justify="left")
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
    return table


def show(console: Console, plans: list[Plan], title: str) -> None:
    console.print(plans_table(plans, title))
    console.print(breakdown_table(plans[0]))


def explain_tables(plan: PlanReport, simulation: Simulation) -> list[Table]:
    """A saved plan's step-time breakdown and, per stage, its layers, memory,
    in-flight micro batches and busy time in the simulated schedule."""
    step = plan.predicted.step_time_s
    times = Table(title=f"{plan.label}: {step:.3f} s per step, MFU {plan.predicted.mfu:.1%}", title_justify="left")
    times.add_column("where the step goes")
    times.add_column("s", justify="right")
    times.add_column("share", justify="right")
    for name, seconds in plan.predicted.breakdown_s.items():
        if seconds > 0:
            times.add_row(name, f"{seconds:.3f}", f"{seconds / step:.1%}")
    measured = [name.replace("_", " ") for name, level in plan.sources.items() if level != "estimated"]
    times.caption = f"from measurements: {', '.join(measured)}" if measured else "every figure estimated (no --profile, no measured links)"

    stages = Table(title=f"stages under {simulation.schedule}: idle {simulation.bubble_fraction():.1%} of the pipeline on average", title_justify="left")
    for column in ("stage", "layers", "peak GiB", "capacity GiB", "in flight", "busy s", "idle s"):
        stages.add_column(column, justify="right")
    for report, peak, in_flight, busy in zip(plan.stages, plan.memory.per_stage_peak_bytes, simulation.peak_in_flight, simulation.busy_s):
        stages.add_row(
            str(report.index), str(report.layers), f"{peak / GiB:.1f}", f"{plan.memory.capacity_bytes / GiB:.1f}",
            str(in_flight), f"{busy:.3f}", f"{simulation.pipeline_time_s - busy:.3f}",
        )
    return [times, stages]
