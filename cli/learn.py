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
from loom.planner.calibrate.fit import Run, calibrate as fit_calibration, job_overrides
from loom.planner.calibrate.megatron_layout import report_of_run
from loom.planner.output.files import MANIFEST, write_text_file
from loom.planner.output.report import Report, read_report
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Job, load_job
from loom.profiles.calibration import calibration_json
from loom.profiles.run_logs import read_run_log
from loom.profiles.run_logs.record import GiB

LOG_SUFFIXES = (".log", ".out", ".txt")  # the logs a trial folder's run left beside its plan.json
TRACE_SUFFIXES = (".json", ".json.gz")  # and its profiler traces (any JSON but plan.json)
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


def _read_plan(path: Path) -> Report:
    """A plan.json; a profiler trace in its place is named as such (SpecError)."""
    if path.name.endswith(TRACE_SUFFIXES) and path.is_file() and not _is_report(path):
        raise SpecError(str(path), "<file>", "a loom plan.json here (loom plan or loom evaluate --out writes one), not a profiler trace")
    return read_report(path)


def _trial_logs(folder: Path) -> list[Path]:
    """What a trial folder's run left beside the files loom wrote there (its
    plan.json, launch files, listed in the output folder's manifest): one
    log, and at most one trace.

    Raises SpecError naming the folder when it holds none, or several of either."""
    try:
        written = set(json.loads((folder.parent / MANIFEST).read_text()))
    except (OSError, ValueError):
        written = set()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "plan.json"
                   and f"{folder.name}/{p.name}" not in written and not (p.name.endswith(".json") and _is_calibration(str(p))))
    logs = [p for p in files if p.suffix in LOG_SUFFIXES]
    traces = [p for p in files if p.name.endswith(TRACE_SUFFIXES)]
    for kind, found in (("training log (*.log, *.out, *.txt)", logs), ("profiler trace (*.json)", traces)):
        if len(found) > 1:
            raise SpecError(str(folder), "<file>", f"one {kind} of the trial's run (or name the files after its plan.json)",
                            ", ".join(p.name for p in found))
    if not logs and not traces:
        raise SpecError(str(folder), "<file>", "the trial's training log (train.log) beside its plan.json")
    return logs + traces


def _runs(files: list[Path]) -> list[tuple[Path, Report, list[Path]]]:
    """PLAN LOG... [PLAN LOG...]: each plan.json followed by the logs of its run.

    Raises SpecError when a log comes before any plan, a plan has no log or
    a log is given twice."""
    runs: list[tuple[Path, Report, list[Path]]] = []
    for path in files:
        if not path.exists():
            raise SpecError(str(path), "<file>", "an existing plan.json, log, trace or trial folder")
        if path.is_dir():  # a trial folder: its plan.json and the logs beside it
            runs.append((path / "plan.json", read_report(path / "plan.json"), _trial_logs(path)))
        elif _is_report(path):
            runs.append((path, read_report(path), []))
        elif not runs:
            raise SpecError(str(path), "<file>", "a plan.json first (loom plan or loom evaluate --out writes one), then the logs of its run")
        else:
            runs[-1][2].append(path)
    seen: set[Path] = set()
    for path, _, logs in runs:
        if not logs:
            raise SpecError(str(path), "<file>", "a training log or profiler trace of this plan's run after it")
        for log in logs:
            if log.resolve() in seen:
                raise SpecError(str(log), "<file>", "each run once (given twice, one run would count as two)")
            seen.add(log.resolve())
    return runs


def _value(row: Row, which: float) -> str:
    """A measured, predicted or difference figure of ``row`` in its unit (below 1 ns: 0)."""
    if row.unit == "bytes":
        return f"{which / GiB:.2f} GiB"
    return f"{which:.4g} s" if abs(which) >= 1e-9 else "0 s"


def _error(row: Row) -> str:
    """loom's error as a percentage, or as a ratio when it is past 100x."""
    if not row.measured:
        return "-"
    return f"{row.error:+.1%}" if abs(row.error) < 100 else f"{row.predicted / row.measured:.3g}x"


def _table(comparison: Comparison) -> Table:
    """The comparison as a rich table, step time and memory first."""
    table = Table(title=f"{comparison.label}: measured vs predicted", title_justify="left")
    for column in ("", "measured", "predicted", "loom's error", "difference"):
        table.add_column(column, justify="left" if not column else "right")
    rows = [comparison.step, *([comparison.memory] if comparison.memory else []), *comparison.terms]
    for row in rows:
        table.add_row(escape(row.quantity), _value(row, row.measured), _value(row, row.predicted), _error(row),
                      _value(row, row.difference))
    return table


def _row_json(row: Row) -> dict:
    """One row of ``--json``'s ``rows``."""
    return {"quantity": row.quantity, "measured": row.measured, "predicted": row.predicted, "unit": row.unit,
            "error": row.error if row.measured else None, "source": row.source, "points_to": row.points_to}


def _comparison_json(comparison: Comparison) -> str:
    """``loom compare --json``: ``measured`` and ``predicted`` (step_time_s,
    peak_bytes_per_gpu, terms), the warm-up left out, every row, the notes."""
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
        report = report_of_run(load_job(plan_file), runs) if plan_file.suffix in (".yaml", ".yml") else _read_plan(plan_file)
        if plan_index > len(report.plans):
            raise SpecError("--plan", "plan", f"at most {len(report.plans)} ({plan_file} has {len(report.plans)})", plan_index)
        comparison = compare_plan(report, runs, plan_index - 1)
        if as_json:
            typer.echo(_comparison_json(comparison), nl=False)
            return
        console = Console()
        console.print(_table(comparison))
        step = comparison.step
        intervals = f"{comparison.steady_intervals} logged interval{'s' * (comparison.steady_intervals != 1)}"
        warmup = f"{comparison.warmup_iterations} warm-up iteration{'s' * (comparison.warmup_iterations != 1)}"
        err.print(f"step time: loom {step.predicted:.4g} s, the run {step.measured:.4g} s ({_error(step)}; median of {intervals} after {warmup})")
        for row in comparison.terms[:TOP_TERMS]:
            err.print(f"{escape(row.quantity)} ({_value(row, row.difference)}): {escape(row.points_to)}")
        for note in comparison.notes:
            err.print(f"[yellow]note:[/yellow] {escape(note)}")

    run(action)


def _job_of(job_file: Path, report: Report, plan_path: Path, model: str | None, cluster: str | None) -> Job:
    """The job as ``report``'s plans were made for (``job_overrides``); what
    in the plan.json the job cannot take is blamed on the plan.json."""
    overrides = job_overrides(report, _is_calibration)
    missing = [path for path in overrides["profiles"] if not Path(path).is_file()]
    if missing:
        raise SpecError(str(plan_path), "profiles", "profiles that exist from this folder (plan.json keeps their paths as loom plan "
                        "was given them: run loom calibrate where loom plan ran)", missing[0])
    try:
        return load_job(job_file, dict(model=model, cluster=cluster, **overrides))
    except SpecError as error:
        if error.source != "command line":
            raise
        raise SpecError(str(plan_path), error.field.lstrip("-").replace("-", "_"), error.expected, error.got) from None


def _is_calibration(path: str) -> bool:
    """Whether a profile a plan was made with is a calibration (kind: calibration)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False  # load_job names the file when it reads it
    return isinstance(data, dict) and data.get("kind") == "calibration"


def calibrate(
    job_file: Annotated[Path, typer.Argument(help="The job YAML the plans were made for.", show_default=False)],
    files: Annotated[list[Path], typer.Argument(help="PLAN LOG... [PLAN LOG...]: each plan.json, then the logs and traces of its run; "
                                                     "or trial folders (loom plan --trials), each with its plan.json, logs "
                                                     "(*.log, *.out, *.txt) and traces (*.json).",
                                                show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The calibration profile to write (use it with --profile).")],
    model: Annotated[Optional[str], typer.Option(help="Catalogue name or config.json path (overrides the job's).")] = None,
    cluster: Annotated[Optional[str], typer.Option(help="Cluster YAML path (overrides the job's).")] = None,
) -> None:
    """Learn bounded kernel-rate, link and memory corrections from runs of plans; write a calibration profile."""

    def action() -> None:
        check_output(out, folder=False)
        if out.exists() and not _is_calibration(str(out)):
            raise SpecError("--out", "out", "a new file or a calibration profile to replace (it holds something else)", str(out))
        runs = []
        for path, report, logs in _runs(files):
            if len(report.plans) != 1:
                raise SpecError(str(path), "plans", "the one plan the run ran (a trial's plan.json, or loom evaluate --out's)",
                                f"{len(report.plans)} plans")
            runs.append(Run(job=_job_of(job_file, report, path, model, cluster), plan_path=str(path), report=report,
                            logs=tuple(read_run_log(log) for log in logs)))
        document = fit_calibration(runs)
        write_text_file(out, calibration_json(document), "--out")
        factors = ", ".join(f"{kind} x{factor.value:.3f}" for kind in ("gemm", "attention", "elementwise", "nvlink", "network")
                            if (factor := getattr(document, kind)) is not None)
        measured = any(log.peak_memory is not None for run in runs for log in run.logs)
        memory = f"memory overhead {document.memory_overhead_bytes / GiB:.2f} GiB" if measured else "no memory measured (kept at 0)"
        err.print(f"wrote {escape(str(out))}: {factors}; {memory}")
        for record in document.runs:
            err.print(f"  {escape(record.layout)}: measured {record.measured_step_time_s:.4g} s, loom {record.predicted_step_time_s:.4g} s "
                      f"-> {record.calibrated_step_time_s:.4g} s calibrated")
        if document.gemm and "trace" in document.gemm.source:
            err.print("[yellow]note:[/yellow] kernel rates from the traces; the step times were not fitted: what remains between "
                      "calibrated and measured is outside the kernels (communication, the bubble, the host)")

    run(action)
