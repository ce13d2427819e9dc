"""``loom compare`` and ``loom calibrate``: a plan set against what its runs
reported, and the calibration profile learnt from them (planner/calibrate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loom.cli.common import check_output, err, run
from loom.planner.calibrate.compare import Comparison, Row, compare as compare_plan
from loom.planner.calibrate.fit import Run, calibrate as fit_calibration
from loom.planner.calibrate.megatron_layout import report_of_run
from loom.planner.output.files import write_text_file
from loom.planner.output.report import Report, read_report
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import load_job
from loom.profiles.calibration import calibration_json
from loom.profiles.run_logs import read_run_log

GiB = 2**30
LOG_SUFFIXES = (".log", ".out", ".txt")  # the logs a trial folder's run left beside its plan.json
TOP_TERMS = 3  # the largest discrepancies whose pointers into the model are printed


def _is_report(path: Path) -> bool:
    """Whether ``path`` is a loom report (plan.json) rather than a log or trace."""
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        with path.open("rb") as file:
            head = file.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    # loom writes schema_version first; Kineto traces say "schemaVersion" and hold "traceEvents".
    return '"schema_version"' in head and '"traceEvents"' not in head


def _runs(files: list[Path]) -> list[tuple[Path, Report, list[Path]]]:
    """PLAN LOG... [PLAN LOG...]: each plan.json followed by the logs of its run.

    Raises SpecError when a log comes before any plan or a plan has no log."""
    runs: list[tuple[Path, Report, list[Path]]] = []
    for path in files:
        if path.is_dir():  # a trial folder: its plan.json and the logs beside it
            logs = sorted(p for p in path.iterdir() if p.suffix in LOG_SUFFIXES and p.is_file())
            runs.append((path / "plan.json", read_report(path / "plan.json"), logs))
        elif _is_report(path):
            runs.append((path, read_report(path), []))
        elif not runs:
            raise SpecError(str(path), "<file>", "a plan.json first (loom plan or loom evaluate --out writes one), then the logs of its run")
        else:
            runs[-1][2].append(path)
    for path, _, logs in runs:
        if not logs:
            raise SpecError(str(path), "<file>", "a training log or profiler trace of this plan's run after it")
    return runs


def _value(row: Row, which: float) -> str:
    return f"{which / GiB:+.2f} GiB".lstrip("+") if row.unit == "bytes" else f"{which:.4g} s"


def _table(comparison: Comparison) -> Table:
    table = Table(title=f"{comparison.label}: measured vs predicted", title_justify="left")
    for column in ("", "measured", "predicted", "loom's error", "difference"):
        table.add_column(column, justify="left" if not column else "right")
    rows = [comparison.step, *([comparison.memory] if comparison.memory else []), *comparison.terms]
    for row in rows:
        table.add_row(escape(row.quantity), _value(row, row.measured), _value(row, row.predicted), f"{row.error:+.1%}" if row.measured else "-",
                      _value(row, row.difference))
    return table


def _row_json(row: Row) -> dict:
    return {"quantity": row.quantity, "measured": row.measured, "predicted": row.predicted, "unit": row.unit,
            "error": row.error if row.measured else None, "source": row.source, "points_to": row.points_to}


def _comparison_json(comparison: Comparison) -> str:
    def side(which: str) -> dict:
        side_ = {"step_time_s": getattr(comparison.step, which)}
        if comparison.memory:
            side_["peak_bytes_per_gpu"] = getattr(comparison.memory, which)
        if comparison.terms:
            side_["terms"] = {row.quantity: getattr(row, which) for row in comparison.terms}
        return side_

    document = {"plan": comparison.label, "measured": side("measured"), "predicted": side("predicted"),
                "warmup_iterations": comparison.warmup_iterations, "steady_intervals": comparison.steady_intervals,
                "rows": [_row_json(row) for row in (comparison.step, *([comparison.memory] if comparison.memory else []), *comparison.terms)],
                "notes": list(comparison.notes)}
    return json.dumps(document, indent=1) + "\n"


def compare(
    plan_file: Annotated[Path, typer.Argument(help="The plan.json the run ran (loom plan or loom evaluate --out writes one), or the job "
                                                   "YAML of a Megatron-LM run whose log prints its arguments.", show_default=False)],
    logs: Annotated[list[Path], typer.Argument(help="Its training log (Megatron-LM, torchtitan, DeepSpeed) and/or a torch.profiler trace (.json).",
                                               show_default=False)],
    plan_index: Annotated[int, typer.Option("--plan", min=1, help="Which plan of the file, 1 = best.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print measured and predicted as JSON on stdout.")] = False,
) -> None:
    """Set a plan against what its run reported: step time, memory and terms, largest discrepancy first."""

    def action() -> None:
        runs = [read_run_log(path) for path in logs]
        report = report_of_run(load_job(plan_file), runs) if plan_file.suffix in (".yaml", ".yml") else read_report(plan_file)
        if plan_index > len(report.plans):
            raise SpecError("--plan", "plan", f"at most {len(report.plans)} ({plan_file} has {len(report.plans)})", plan_index)
        comparison = compare_plan(report, runs, plan_index - 1)
        if as_json:
            typer.echo(_comparison_json(comparison), nl=False)
            return
        console = Console()
        console.print(_table(comparison))
        step = comparison.step
        err.print(f"step time: loom {step.predicted:.4g} s, the run {step.measured:.4g} s ({step.error:+.1%}; median of "
                  f"{comparison.steady_intervals} logged intervals after {comparison.warmup_iterations} warm-up iterations)")
        for row in comparison.terms[:TOP_TERMS]:
            err.print(f"{escape(row.quantity)} ({_value(row, row.difference)}): {escape(row.points_to)}")
        for note in comparison.notes:
            err.print(f"[yellow]note:[/yellow] {escape(note)}")

    run(action)


def calibrate(
    job_file: Annotated[Path, typer.Argument(help="The job YAML the plans were made for.", show_default=False)],
    files: Annotated[list[Path], typer.Argument(help="PLAN LOG... [PLAN LOG...]: each plan.json, then the logs and traces of its run; "
                                                     "or trial folders (loom plan --trials), each with its plan.json and *.log files.",
                                                show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The calibration profile to write (use it with --profile).")],
    model: Annotated[Optional[str], typer.Option(help="Catalogue name or config.json path (overrides the job's).")] = None,
    cluster: Annotated[Optional[str], typer.Option(help="Cluster YAML path (overrides the job's).")] = None,
) -> None:
    """Learn bounded kernel-rate, link and memory corrections from runs of plans; write a calibration profile."""

    def action() -> None:
        check_output(out, folder=False)
        job = load_job(job_file, dict(model=model, cluster=cluster))
        runs = [Run(plan_path=str(path), report=report, logs=tuple(read_run_log(log) for log in logs)) for path, report, logs in _runs(files)]
        document = fit_calibration(job, runs)
        write_text_file(out, calibration_json(document), "--out")
        factors = ", ".join(f"{kind} x{factor.value:.3f}" for kind in ("gemm", "attention", "elementwise", "nvlink", "network")
                            if (factor := getattr(document, kind)) is not None)
        err.print(f"wrote {escape(str(out))}: {factors}; memory overhead {document.memory_overhead_bytes / GiB:.2f} GiB")
        for record in document.runs:
            err.print(f"  {escape(record.layout)}: measured {record.measured_step_time_s:.4g} s, loom {record.predicted_step_time_s:.4g} s "
                      f"-> {record.calibrated_step_time_s:.4g} s calibrated")

    run(action)
