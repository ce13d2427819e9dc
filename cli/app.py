"""The ``loom`` command: ``loom plan`` and ``loom evaluate``.

Exit codes (ARCHITECTURE.md): 0 ok, 1 a --gate failed, 2 bad input, 3 no
feasible layout. Logic lives in ``loom.planner``; this module parses flags,
renders and maps errors to exit codes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress

from loom.cli.render import show
from loom.planner.emit import launch_files, write_atomically
from loom.planner.errors import InfeasibleError, SpecError
from loom.planner.gates import failed_gates, parse_gate
from loom.planner.job import Job, load_job
from loom.planner.layout import Layout
from loom.planner.plan import Plan, evaluate as evaluate_layout
from loom.planner.report import SearchInfo, build_report, report_json
from loom.planner.search import search

app = typer.Typer(add_completion=False, help="Plan the parallel layout of large-model training.", invoke_without_command=True)
err = Console(stderr=True)

JobArg = typer.Argument(None, help="Job YAML (default: the bundled Llama-3 8B on 64 H100 example).", show_default=False)


def _load(job_file: Optional[Path], **overrides) -> Job:
    return load_job(job_file, overrides)


def _finish(job: Job, plans: list[Plan], info: SearchInfo, out: Optional[Path], as_json: bool, gates: list[str]) -> None:
    """Render, write files, check gates: what plan and evaluate share."""
    parsed_gates = [parse_gate(text) for text in gates]
    report = report_json(build_report(plans, info))
    if as_json:
        typer.echo(report, nl=False)
    else:
        show(Console(), plans, f"{job.model.name} on {job.cluster.num_gpus} x {job.cluster.slowest.gpu.name} ({job.framework})")
    if out is not None:
        best = plans[0]
        files = launch_files(job, best.layout, list(best.stages), best.placement)
        write_atomically(out, {**files, "plan.json": report})
        if not as_json:
            err.print(f"wrote {', '.join(sorted([*files, 'plan.json']))} to {out}")
    failures = failed_gates(parsed_gates, plans[0])
    if failures:
        err.print(f"[red]gate failed:[/red] {'; '.join(failures)}")
        raise typer.Exit(1)


def _run(action) -> None:
    """Map loom's errors to exit codes with a one-line message."""
    try:
        action()
    except SpecError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(2) from None
    except InfeasibleError as error:
        err.print(f"[red]infeasible:[/red] {error}", highlight=False)
        raise typer.Exit(3) from None


@app.callback()
def main(ctx: typer.Context) -> None:
    """With no command, ``loom`` plans the bundled example."""
    if ctx.invoked_subcommand is None:
        plan()


@app.command()
def plan(
    job_file: Optional[Path] = JobArg,
    model: Optional[str] = typer.Option(None, help="Catalogue name or config.json path."),
    cluster: Optional[str] = typer.Option(None, help="Cluster YAML path."),
    global_batch_size: Optional[int] = typer.Option(None),
    seq_length: Optional[int] = typer.Option(None),
    precision: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp8"),
    framework: Optional[str] = typer.Option(None, help="megatron | deepspeed"),
    top_k: Optional[int] = typer.Option(None, help="How many plans to keep."),
    out: Optional[Path] = typer.Option(None, help="Write launch files and plan.json here."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report on stdout."),
    gate: list[str] = typer.Option([], help="Fail (exit 1) unless the best plan meets e.g. mfu>=0.4."),
) -> None:
    """Search layouts for a job and rank them by predicted step time."""

    def action() -> None:
        job = _load(job_file, model=model, cluster=cluster, global_batch_size=global_batch_size, seq_length=seq_length,
                    precision=precision, framework=framework, top_k=top_k)
        for text in gate:
            parse_gate(text)  # bad gates are bad input: fail before searching
        with Progress(console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
            task = bar.add_task("searching layouts", total=None)
            result = search(job, job.top_k, progress=lambda done, total: bar.update(task, completed=done, total=total))
        info = SearchInfo(candidates=result.candidates, feasible=result.feasible, wall_time_s=result.wall_time_s,
                          solver="enumeration", status="optimal", gap=0.0)
        _finish(job, result.plans, info, out, as_json, gate)

    _run(action)


@app.command()
def evaluate(
    job_file: Optional[Path] = JobArg,
    model: Optional[str] = typer.Option(None),
    cluster: Optional[str] = typer.Option(None),
    global_batch_size: Optional[int] = typer.Option(None),
    seq_length: Optional[int] = typer.Option(None),
    precision: Optional[str] = typer.Option(None),
    framework: Optional[str] = typer.Option(None),
    tp: int = typer.Option(1),
    pp: int = typer.Option(1),
    dp: Optional[int] = typer.Option(None, help="Default: the rest of the cluster's GPUs."),
    cp: int = typer.Option(1),
    ep: int = typer.Option(1),
    vpp: int = typer.Option(1),
    mbs: int = typer.Option(1),
    recompute: str = typer.Option("none", help="none | selective | full"),
    sequence_parallel: Optional[bool] = typer.Option(None, "--sequence-parallel/--no-sequence-parallel", help="Default: on when tp > 1."),
    distributed_optimizer: Optional[bool] = typer.Option(None, "--distributed-optimizer/--no-distributed-optimizer", help="Default: on with Megatron when dp > 1."),
    zero_stage: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json"),
    gate: list[str] = typer.Option([]),
) -> None:
    """Predict step time and memory of one fixed layout."""

    def action() -> None:
        job = _load(job_file, model=model, cluster=cluster, global_batch_size=global_batch_size, seq_length=seq_length,
                    precision=precision, framework=framework)
        if recompute not in ("none", "selective", "full"):
            raise SpecError("--recompute", "recompute", "none, selective or full", recompute)
        if ep != 1:
            raise SpecError("--ep", "ep", "1 (expert parallelism needs an MoE model)", ep)
        data_parallel = dp if dp is not None else max(1, job.cluster.num_gpus // (tp * pp * cp))
        layout = Layout(
            tp=tp, pp=pp, dp=data_parallel, cp=cp, vpp=vpp, micro_batch_size=mbs, global_batch_size=job.global_batch_size,
            sequence_parallel=tp > 1 if sequence_parallel is None else sequence_parallel, recompute=recompute,
            zero_stage=zero_stage,
            distributed_optimizer=(job.framework == "megatron" and data_parallel * cp > 1) if distributed_optimizer is None else distributed_optimizer,
        )
        plan_ = evaluate_layout(job, layout, source="evaluate flags")
        info = SearchInfo(candidates=1, feasible=int(plan_.fits), wall_time_s=0.0, solver="none", status="evaluated", gap=0.0)
        _finish(replace(job), [plan_], info, out, as_json, gate)

    _run(action)
