"""``loom explain``: a saved plan.json, checked (``read_report``), re-simulated
and shown: where its step time and memory go, per stage, and on request a
timeline of its schedule and a chart of the candidate layouts."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from loom.cli import figures
from loom.cli.common import StdoutConsole, check_output, err, run
from loom.cli.render import explain_tables
from loom.planner.output.report import PlanReport, read_report
from loom.planner.schedule.simulate import MAX_OPS, SCHEDULES, PipelineCosts, Simulation, simulate
from loom.planner.specs.errors import SpecError

FIGURE_SUFFIXES = (".png", ".svg", ".html", ".htm")


def explain(
    plan_file: Annotated[Path, typer.Argument(help="A plan.json written by loom plan --out (or its --json output).")],
    plan_index: Annotated[int, typer.Option("--plan", min=1, help="Which plan of the file, 1 = best.")] = 1,
    schedule: Annotated[Optional[str], typer.Option(help=f"Simulate another schedule instead: {', '.join(SCHEDULES)}.")] = None,
    timeline: Annotated[Optional[Path], typer.Option(help="Draw the simulated schedule to this .png, .svg or .html file.")] = None,
    candidates: Annotated[Optional[Path], typer.Option(help="Plot predicted step time of every plan in the file.")] = None,
) -> None:
    """Check a saved plan, show where its step time and memory go; draw its schedule."""

    def action() -> None:
        for flag, path in (("--timeline", timeline), ("--candidates", candidates)):
            if path is not None:
                if path.suffix.lower() not in FIGURE_SUFFIXES:
                    raise SpecError(flag, flag.lstrip("-"), "a .png, .svg or .html file", str(path))
                figures.require_matplotlib(flag)
                check_output(path, flag, folder=False)
        report = read_report(plan_file)
        if plan_index > len(report.plans):
            raise SpecError("--plan", "plan", f"at most {len(report.plans)} (the plans in {plan_file})", plan_index)
        chosen = report.plans[plan_index - 1]
        saved = chosen.schedule.name
        name = schedule or saved
        costs = _bounded_costs(plan_file, plan_index - 1, chosen)
        with _status("simulating the schedule"):
            simulation = _simulate(costs, name, ("--schedule", "schedule") if schedule else (str(plan_file), f"plans.{plan_index - 1}.schedule.name"))
            base = simulation if name == saved else _simulate(costs, saved, (str(plan_file), f"plans.{plan_index - 1}.schedule.name"))
        console = StdoutConsole()  # its reader may close it (loom explain plan.json | head) before the figures are drawn
        for table in explain_tables(chosen, simulation, base):
            console.print(table)
        if name != saved:
            console.print(f"{name}: pipeline {simulation.pipeline_time_s:.3f} s against {saved}'s {base.pipeline_time_s:.3f} s")
        if timeline is not None:
            with _status(f"drawing the timeline ({costs.ops:,} ops)"):
                figures.save(figures.timeline_figure(simulation, f"{report.model} {chosen.label} ({name})"), timeline, "--timeline")
        if candidates is not None:
            figures.save(figures.candidates_figure([plan.label for plan in report.plans], [plan.predicted.step_time_s for plan in report.plans],
                                                   f"{report.model} on {report.gpus} GPUs: predicted step time"), candidates, "--candidates")

    run(action)


def _bounded_costs(plan_file: Path, index: int, plan: PlanReport) -> PipelineCosts:
    """The plan's simulator inputs, refused as bad input (its micro batches
    named) when simulating them would take more than MAX_OPS ops."""
    costs = plan.schedule.costs()
    if costs.ops > MAX_OPS:
        per_microbatch = costs.ops // costs.microbatches
        raise SpecError(str(plan_file), f"plans.{index}.schedule.microbatches",
                        f"at most {MAX_OPS // per_microbatch:,} micro batches: explain simulates at most MAX_OPS = {MAX_OPS:,} ops "
                        f"(stages x micro batches x chunks = {len(costs.stages)} x m x {len(costs.stages[0])})", costs.microbatches)
    return costs


def _simulate(costs: PipelineCosts, name: str, blame: tuple[str, str]) -> Simulation:
    """``simulate``, a schedule that cannot run these costs (interleaving
    without vpp > 1, an unknown name) blamed on ``blame`` (source, field)."""
    if name not in SCHEDULES:
        raise SpecError(*blame, f"one of {', '.join(SCHEDULES)}", name)
    try:
        return simulate(costs, name)
    except ValueError as error:
        raise SpecError(*blame, f"a schedule this plan can run ({error})", name) from None


def _status(text: str) -> AbstractContextManager:
    """A spinner on stderr while ``text`` runs, when stderr is a terminal."""
    return err.status(text) if err.is_terminal else nullcontext()
