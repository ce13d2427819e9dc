"""The ``loom`` command: ``loom plan`` and ``loom evaluate``.

Exit codes (ARCHITECTURE.md): 0 ok, 1 a --gate failed, 2 bad input, 3 no
feasible layout. Logic lives in ``loom.planner``; this module parses flags,
renders and maps errors to exit codes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from loom.cli.common import OneLineErrors, StdoutConsole, check_output, err, run, stdout_may_close
from loom.cli.experts import experts
from loom.cli.explain import explain
from loom.cli.learn import calibrate, compare
from loom.planner.calibrate.fit import expected_gain
from loom.planner.specs.files import read_json
from loom.profiles.calibration import read_calibration
from loom.cli.profile import profile_app
from loom.cli.render import show
from loom.planner.output.files import write_file_set
from loom.planner.output.launch import launch_files, training_script_steps
from loom.planner.output.slurm import nodes_of
from loom.planner.output.trial import TRIAL_ITERATIONS, TRIAL_PROFILE_STEP, trial_job
from loom.planner.specs.errors import InfeasibleError, SpecError
from loom.planner.output.gates import failed_gates, parse_gate
from loom.planner.specs.job import Job, job_warnings, load_job
from loom.planner.specs.layout import RECOMPUTE_MODULES, Layout
from loom.planner.search.placement import place
from loom.planner.plan import Plan, evaluate as evaluate_layout
from loom.planner.output.report import NearbyBatchReport, SearchInfo, build_report, report_json
from loom.planner.search.fixes import cheapest_fix
from loom.planner.specs.rules import default_distributed_optimizer, default_recompute_modules, layout_problems
from loom.planner.specs.stages import default_placement
from loom.planner.search.layouts import search, split_plan
from loom.planner.cost.memory import GiB

app = typer.Typer(add_completion=False, help="Plan the parallel layout of large-model training.", invoke_without_command=True, rich_markup_mode=None,
                  cls=OneLineErrors)
app.add_typer(profile_app, name="profile")
app.command("experts")(experts)
app.command("explain")(explain)
app.command("compare")(compare)
app.command("calibrate")(calibrate)

# Options shared by plan and evaluate: the job file and what overrides it.
JobFile = Annotated[Optional[Path], typer.Argument(help="Job YAML (default: the bundled Llama-3 8B on 64 H100 example).", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(help="Catalogue name or config.json path.")]
ClusterOpt = Annotated[Optional[str], typer.Option(help="Cluster YAML path.")]
BatchOpt = Annotated[Optional[int], typer.Option(help="Global batch size (sequences).")]
SeqOpt = Annotated[Optional[int], typer.Option(help="Sequence length (tokens).")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="bf16 | fp16 | fp8 | mxfp8 (fp8, MXFP8 scaling) | nvfp4 | tf32 | fp32")]
FrameworkOpt = Annotated[Optional[str], typer.Option(help="megatron | deepspeed | torchtitan")]
StackOpt = Annotated[Optional[str], typer.Option(help="Feature presets of a training stack: megatron-lm | megatron-bridge | torchtitan | torchtitan-2412 (default: the framework's).")]
HeadroomOpt = Annotated[Optional[str], typer.Option(help="Memory every plan leaves free: a fraction of capacity (0.05) or a size ('4 GiB').")]
OutOpt = Annotated[Optional[Path], typer.Option(help="Write launch files and plan.json here.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout.")]
GateOpt = Annotated[Optional[list[str]], typer.Option(metavar="CONDITION", help="Exit 1 unless the best plan meets a quoted condition, e.g. --gate 'mfu>=0.4' (repeatable); "
                                                                             "under loom plan, 'memory_headroom>=X' and 'peak_memory_GiB<=X' bound what the search keeps instead (exit 3 when nothing fits).")]
ProfileOpt = Annotated[Optional[list[Path]], typer.Option("--profile", metavar="FILE", help="A loom profile layers or gemm JSON, or a loom calibrate profile: measured numbers replace estimates (repeatable).")]


def _trial_files(plans: list[Plan], info: SearchInfo) -> dict[str, str]:
    """``trial-K/...``: each plan's launch files for a short run with every
    report on (planner/output/trial.py) and its own plan.json, for loom
    compare and loom calibrate to read with the run's logs."""
    files = {}
    for number, plan_ in enumerate(plans, start=1):
        trial = launch_files(trial_job(plan_.job), plan_.layout, list(plan_.stages), plan_.placement)
        report = report_json(build_report([plan_], _timeless(info)))
        files.update({f"trial-{number}/{name}": text for name, text in {**trial, "plan.json": report}.items()})
    return files


def _print_expected_gain(best: Plan) -> None:
    """Under a calibration learnt from runs of this job: how the best plan
    compares with the fastest of those runs (both as calibrated predictions)."""
    for path in best.job.profiles:
        data = read_json(Path(path), "profile JSON")
        if not (isinstance(data, dict) and data.get("kind") == "calibration"):
            continue
        found = expected_gain(read_calibration(Path(path)), best.job, best.tokens_per_s)
        if found is None:
            continue
        run_, gain = found
        fastest = f"{escape(run_.layout)}, {run_.tokens_per_step / run_.measured_step_time_s:,.0f} tokens/s measured"
        if run_.layout == best.layout.label():
            err.print(f"[yellow]note:[/yellow] the best plan is the fastest run {escape(path)} learnt from ({fastest})")
        elif gain > 0:
            err.print(f"[yellow]note:[/yellow] expected gain {gain:+.1%} over the fastest run {escape(path)} learnt from ({fastest}), "
                      "calibrated predictions of both")
        else:
            err.print(f"[yellow]note:[/yellow] no plan is predicted faster than the fastest run {escape(path)} learnt from: keep it "
                      f"({fastest}; {best.layout.label()} {gain:+.1%}, calibrated predictions of both)")


def _finish(plans: list[Plan], info: SearchInfo, out: Optional[Path], as_json: bool, gates: list[str], trials: int = 0) -> None:
    """Render, write files, check gates: what plan and evaluate share. Files
    are written even when a gate fails, so CI can keep plan.json to see why."""
    job = plans[0].job
    parsed_gates = [parse_gate(text) for text in gates]
    for warning in job_warnings(job):
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    for summary in sorted({node.gpu.calibration for node in job.cluster.nodes if node.gpu.calibration}):
        err.print(f"[yellow]note:[/yellow] measured, not estimated: {escape(summary)}")
    # The report leaves out the wall time (plan prints it on stderr) so that the
    # same inputs print the same bytes; plan.json is the very same text.
    report = report_json(build_report(plans, _timeless(info)))
    with stdout_may_close():
        if as_json:
            typer.echo(report, nl=False)
        else:
            console = StdoutConsole()
            idle = plans[0].idle_gpus
            show(console, plans, f"{job.model.name} on {job.cluster.gpu_summary}{f' + {idle} idle' if idle else ''} ({job.framework})")
            for nearby in info.nearby_global_batch_sizes:
                idle = f", {nearby.idle_gpus} GPUs idle" if nearby.idle_gpus else ""
                console.print(f"global batch {nearby.global_batch_size} instead of {plans[0].layout.global_batch_size}: "
                              f"{escape(nearby.label)}{idle}, {nearby.tokens_per_s:,.0f} tokens/s ({nearby.gain:+.1%})")
    _print_expected_gain(plans[0])
    if out is not None:
        best = plans[0]
        files = launch_files(job, best.layout, list(best.stages), best.placement)
        write_file_set(out, {**files, "plan.json": report, **_trial_files(plans[:trials], info)})
        if not files:
            err.print(f"[yellow]note:[/yellow] no launch files for {escape(job.model.name)} (vision-language models are planned, not launched, for now)")
        if not as_json:
            err.print(f"wrote {', '.join(sorted([*files, 'plan.json']))} to {escape(str(out))}")
        for step in training_script_steps(job, best.layout):
            err.print(f"[yellow]note:[/yellow] your training script must {escape(step)}")
        if trials:
            if len(plans) < trials:
                # Not by keeping more plans: how many the search keeps can change which wins (uneven splits are tried on those kept).
                err.print(f"[yellow]note:[/yellow] --trials {trials}: {len(plans)} plan(s) kept (raise --top-k for more)")
            folders = "trial-1" if trials == 1 or len(plans) == 1 else f"trial-1 ... trial-{min(trials, len(plans))}"
            trace = (f" and its profile_traces/iteration_{TRIAL_PROFILE_STEP}/rank0_trace.json" if job.framework == "torchtitan" else "")
            err.print(f"wrote {folders} to {escape(str(out))}: {TRIAL_ITERATIONS} iterations each; keep each run's output as "
                      f"trial-K/train.log{trace}, then: loom calibrate <this job> {escape(str(out))}/trial-*")
    failures = failed_gates(parsed_gates, plans[0])
    if failures:
        err.print(f"[red]gate failed:[/red] {escape('; '.join(failures))}")
        raise typer.Exit(1)


# The flags of a layout field in evaluate's messages: blame what the user typed.
LAYOUT_FLAGS = {
    "tp": "--tp", "pp": "--pp", "cp": "--cp", "ep": "--ep", "etp": "--etp", "vpp": "--vpp", "pp*vpp": "--pp x --vpp",
    "tp*pp*dp*cp": "--tp x --pp x --dp x --cp", "global_batch_size": "--global-batch-size (or the job's global_batch_size) and --mbs x --dp",
    "sequence_parallel": "--sequence-parallel", "recompute": "--recompute", "recompute_modules": "--recompute-modules",
    "recompute_num_layers": "--recompute-num-layers", "zero_stage": "--zero-stage", "distributed_optimizer": "--distributed-optimizer",
    "fsdp": "--fsdp", "reshard_after_forward": "--reshard-after-forward", "optimizer_offload": "--offload-optimizer",
}


def _launch_problems(job: Job, layout: Layout) -> list[tuple[str, str, object]]:
    """What keeps ``--out`` from launching ``layout`` on Megatron's default
    placement: a per-node launcher (torchrun, deepspeed's hostfile, srun)
    starts as many ranks on every node it uses (slurm.nodes_of, which the
    launch files are written from). A layout larger than the cluster is
    layout_problems' to name."""
    if layout.world_size > job.cluster.num_gpus:
        return []
    try:
        nodes_of(default_placement(job.cluster, layout.world_size))
    except ValueError:
        return [("tp*pp*dp*cp", f"whole nodes for the launch files --out writes (nodes of {job.cluster.gpus_per_node} GPUs: a "
                 "per-node launcher starts as many ranks on every node), or one node's GPUs at most", layout.world_size)]
    return []


def _timeless(info: SearchInfo) -> SearchInfo:
    """``info`` without its wall time, which differs run to run."""
    return info.model_copy(update={"wall_time_s": None})


def _show(plan_: Plan, info: SearchInfo, as_json: bool) -> None:
    """The report or the table of one plan, on stdout."""
    job = plan_.job
    if as_json:
        typer.echo(report_json(build_report([plan_], _timeless(info))), nl=False)
    else:
        show(Console(), [plan_], f"{job.model.name} on {job.cluster.gpu_summary} ({job.framework})")


def _does_not_fit(job, plan_: Plan) -> str:
    """What binds, how much is missing and the cheapest single change that fits."""
    stage, capacity = plan_.peak_memory, plan_.capacity_bytes
    short = (stage.peak_bytes - capacity) / GiB
    terms = sorted(stage.breakdown_bytes.items(), key=lambda item: -item[1])[:3]
    largest = ", ".join(f"{name} {value / GiB:.1f}" for name, value in terms)
    message = (f"{plan_.layout.label()} does not fit: stage {stage.stage} needs {stage.peak_bytes / GiB:.1f} GiB of a "
               f"{capacity / GiB:.1f} GiB GPU, {short:.1f} GiB short (largest: {largest} GiB)")
    fix = cheapest_fix(job, plan_.layout)
    if fix is None:
        return message + "; none of the single changes loom tries fits: loom plan searches every layout"
    flags, fixed = fix
    return message + f"; the cheapest single change that fits: {flags} ({fixed.layout.label()}, {fixed.step_time_s:.3f} s per step)"


def _modules(text: str | None) -> tuple[str, ...]:
    """--recompute-modules, comma-separated, in megatron-core's order (it
    accepts any; loom's labels and files are the same for the same set)."""
    if not text:
        return ()
    names = tuple(name.strip() for name in text.split(","))
    known = [name for name in RECOMPUTE_MODULES if name in names]
    unknown = [name for name in names if name not in RECOMPUTE_MODULES]
    return (*known, *unknown) if len(set(names)) == len(names) else names


def _headroom(text: str | None) -> float | str | None:
    """--memory-headroom as the job field takes it: a number or a size string."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _paths(paths: list[Path] | None) -> list[str] | None:
    """--profile files as job-file overrides (None: keep the file's own)."""
    return [str(path) for path in paths] if paths else None


@app.callback()
def main(ctx: typer.Context) -> None:
    """With no command, ``loom`` plans the bundled example."""
    if ctx.invoked_subcommand is None:
        plan()


@app.command()
def plan(
    job_file: JobFile = None,
    model: ModelOpt = None,
    cluster: ClusterOpt = None,
    global_batch_size: BatchOpt = None,
    seq_length: SeqOpt = None,
    precision: PrecisionOpt = None,
    framework: FrameworkOpt = None,
    stack: StackOpt = None,
    memory_headroom: HeadroomOpt = None,
    top_k: Annotated[Optional[int], typer.Option(help="How many plans to keep.")] = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    gate: GateOpt = None,
    profile: ProfileOpt = None,
    trials: Annotated[int, typer.Option(min=0, help="Also write the top N plans' launch files for a short trial run with every "
                                                   "report on, under --out/trial-1 ... (then loom compare / loom calibrate).")] = 0,
) -> None:
    """Search layouts for a job and rank them by predicted step time."""
    gates = gate or []

    def action() -> None:
        parsed = [parse_gate(text) for text in gates]  # bad gates are bad input: fail before searching
        if trials and out is None:
            raise SpecError("--trials", "trials", "--out DIR as well (the trial launch files are written under it)", trials)
        check_output(out)
        job = load_job(job_file, dict(model=model, cluster=cluster, global_batch_size=global_batch_size,
                                      seq_length=seq_length, precision=precision, framework=framework, stack=stack, top_k=top_k,
                                      profiles=_paths(profile), memory_headroom=_headroom(memory_headroom)))
        # A memory gate that bounds what a plan may use is a constraint of the search, not a check of its winner.
        for gate_ in parsed:
            if gate_.metric == "memory_headroom" and gate_.op in (">=", ">"):
                if not 0 <= gate_.threshold < 1:
                    raise SpecError("--gate", "gate", "memory_headroom as a fraction of capacity in [0, 1)", str(gate_))
                job = replace(job, memory_headroom=job.memory_headroom.at_least(gate_.threshold))
            if gate_.metric == "peak_memory_GiB" and gate_.op in ("<=", "<"):
                if not gate_.threshold > 0:
                    raise SpecError("--gate", "gate", "peak_memory_GiB above 0", str(gate_))
                job = replace(job, memory_headroom=job.memory_headroom.capped(gate_.threshold * GiB))
        with Progress(console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
            task = bar.add_task("searching layouts", total=None)
            result = search(job, job.top_k, progress=lambda done, total: bar.update(task, completed=done, total=total))
        nearby = [NearbyBatchReport(global_batch_size=n.global_batch_size, label=n.label, tokens_per_s=n.tokens_per_s, gain=n.gain,
                                    idle_gpus=n.idle_gpus)
                  for n in result.nearby_batches]
        info = SearchInfo(candidates=result.candidates, feasible=result.feasible, wall_time_s=result.wall_time_s,
                          solver=result.solver, status=result.status, gap=result.gap, nearby_global_batch_sizes=nearby)
        err.print(f"searched {result.candidates:,} layouts ({result.feasible:,} fit) in {result.wall_time_s:.2f} s")
        _check_measured_rates(result.plans)
        _warn_unpinned(job, result.plans[0])
        _finish(result.plans, info, out, as_json, gates, trials)

    run(action)


def _warn_unpinned(job: Job, best: Plan) -> None:
    """A plan on some of a mixed cluster's nodes whose hosts have no names:
    the launch files cannot say which nodes (job_warnings says so only when
    the plan spans the whole mixed cluster)."""
    if best.idle_gpus and not job.cluster.named_hosts and not job.cluster.uniform:
        err.print(f"[yellow]warning:[/yellow] the plan runs on {escape(best.job.cluster.gpu_summary)} of {escape(job.cluster.gpu_summary)}, "
                  "but the cluster names no hosts: a scheduler may hand the launch files any of its nodes; give hosts: to pin those planned")


def _check_measured_rates(plans: list[Plan]) -> None:
    """Bad input: measured layer, GEMM or calibration figures (--profile)
    that put a plan's model FLOPs above the GPUs' peak; the profiles'
    schemas cannot tell a time too short for the GPU it names."""
    for plan_ in plans:
        if plan_.mfu > 1 and plan_.job.profiles:
            raise SpecError(", ".join(plan_.job.profiles), "--profile", f"measured times the GPU's peak allows: with them "
                            f"{plan_.layout.label()} would run its model FLOPs at {plan_.mfu:.0%} of {plan_.job.precision} peak")


def _on_fastest_nodes(job: Job, layout: Layout) -> tuple[Job, int]:
    """A layout of whole nodes that leaves some of a mixed cluster's nodes
    idle runs on its fastest ones, as loom plan places it
    (Cluster.fastest_nodes), with the GPUs left idle; otherwise as given."""
    cluster = job.cluster
    nodes, rest = divmod(layout.world_size, cluster.gpus_per_node)
    if cluster.uniform or rest or nodes >= len(cluster.nodes):
        return job, 0
    try:
        fastest = cluster.fastest_nodes(nodes)
    except ValueError:  # it would split an NVLink domain, or the links were measured pair by pair
        return job, 0
    return replace(job, cluster=fastest), cluster.num_gpus - fastest.num_gpus


@app.command()
def evaluate(
    job_file: JobFile = None,
    model: ModelOpt = None,
    cluster: ClusterOpt = None,
    global_batch_size: BatchOpt = None,
    seq_length: SeqOpt = None,
    precision: PrecisionOpt = None,
    framework: FrameworkOpt = None,
    stack: StackOpt = None,
    memory_headroom: HeadroomOpt = None,
    tp: Annotated[int, typer.Option(min=1)] = 1,
    pp: Annotated[int, typer.Option(min=1)] = 1,
    dp: Annotated[Optional[int], typer.Option(min=1, help="Default: the rest of the cluster's GPUs.")] = None,
    cp: Annotated[int, typer.Option(min=1)] = 1,
    ep: Annotated[int, typer.Option(min=1, help="Expert parallel size (MoE models).")] = 1,
    etp: Annotated[int, typer.Option(min=1, help="Expert tensor parallel size (MoE models).")] = 1,
    vpp: Annotated[int, typer.Option(min=1)] = 1,
    mbs: Annotated[int, typer.Option(min=1)] = 1,
    recompute: Annotated[str, typer.Option(help="none | selective | full")] = "none",
    recompute_modules: Annotated[Optional[str], typer.Option(help="With selective: megatron-core's modules, comma-separated, from: core_attn, mlp, moe, shared_experts, moe_act, layernorm, mla_up_proj; with torchtitan: op (its per-op checkpointing, the default).", show_default=False)] = None,
    recompute_num_layers: Annotated[int, typer.Option(min=0, help="With full: recompute the first N layers of each model chunk (0: every layer).")] = 0,
    sequence_parallel: Annotated[Optional[bool], typer.Option("--sequence-parallel/--no-sequence-parallel", help="Default: on when tp > 1.")] = None,
    distributed_optimizer: Annotated[Optional[bool], typer.Option("--distributed-optimizer/--no-distributed-optimizer", help="Default: on with Megatron when dp x cp > 1, with --fsdp, offload or bf16 optimizer states.")] = None,
    zero_stage: Annotated[int, typer.Option(min=0, max=3)] = 0,
    fsdp: Annotated[Optional[int], typer.Option(min=0, help="Shard the weights, gradients and optimizer state over N data-parallel ranks "
                                                "(x CP): Megatron-FSDP and ZeRO-3 (over all of dp), torchtitan's FSDP2; 0 off; the replicas "
                                                "(HSDP) are dp / N. Default: dp with torchtitan (or with --zero-stage 3), else 0.")] = None,
    reshard_after_forward: Annotated[Optional[bool], typer.Option("--reshard-after-forward/--no-reshard-after-forward",
                                                                  help="Gather each layer's weights again for backward. Default: on, "
                                                                       "off with a torchtitan pipeline (its default).")] = None,
    offload_optimizer: Annotated[bool, typer.Option("--offload-optimizer/--no-offload-optimizer",
                                                    help="Optimizer state and step on the host CPU (torchtitan: also the "
                                                         "sharded weights and gradients).")] = False,
    split: Annotated[str, typer.Option(help="even: the same layers on every stage (Megatron's default); best: also the "
                                            "partition MILP's split, as loom plan chooses (written as --pipeline-model-parallel-layout)")] = "even",
    out: OutOpt = None,
    as_json: JsonOpt = False,
    gate: GateOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Predict step time and memory of one fixed layout."""
    gates = gate or []

    def action() -> None:
        for text in gates:
            parse_gate(text)
        if split not in ("even", "best"):
            raise SpecError("--split", "split", "even or best", split)
        check_output(out)
        job = load_job(job_file, dict(model=model, cluster=cluster, global_batch_size=global_batch_size,
                                      seq_length=seq_length, precision=precision, framework=framework, stack=stack,
                                      profiles=_paths(profile), memory_headroom=_headroom(memory_headroom)))
        if recompute not in ("none", "selective", "full"):
            raise SpecError("--recompute", "recompute", "none, selective or full", recompute)
        data_parallel = dp if dp is not None else max(1, job.cluster.num_gpus // (tp * pp * cp))
        titan = job.framework == "torchtitan" and (data_parallel > 1 or cp > 1)
        sharded = fsdp if fsdp is not None else data_parallel if titan or zero_stage == 3 else 0
        zero = 3 if job.framework == "deepspeed" and sharded and not zero_stage else zero_stage
        layout = Layout(
            tp=tp, pp=pp, dp=data_parallel, cp=cp, ep=ep, etp=etp, vpp=vpp, micro_batch_size=mbs, global_batch_size=job.global_batch_size,
            sequence_parallel=tp > 1 if sequence_parallel is None else sequence_parallel, recompute=recompute,
            recompute_modules=_modules(recompute_modules) or default_recompute_modules(job, recompute),
            recompute_num_layers=recompute_num_layers,
            zero_stage=zero,
            distributed_optimizer=default_distributed_optimizer(job, data_parallel * cp, sharded, offload_optimizer)
            if distributed_optimizer is None else distributed_optimizer,
            fsdp=sharded,
            reshard_after_forward=not (job.framework == "torchtitan" and pp > 1) if reshard_after_forward is None else reshard_after_forward,
            optimizer_offload=offload_optimizer,
        )
        problems = layout_problems(job, layout) + (_launch_problems(job, layout) if out is not None else [])
        if problems:
            named = [(LAYOUT_FLAGS.get(field, field), expected, got) for field, expected, got in problems]
            if dp is None:  # a dp the user did not give: say where it came from
                derived = f"--dp (not given: {job.cluster.num_gpus} GPUs // (tp x pp x cp) = {data_parallel})"
                named = [(field.replace("--dp", derived), expected, got) for field, expected, got in named]
            raise SpecError.of("command line", named)
        whole, (job, idle) = job, _on_fastest_nodes(job, layout)
        plan_ = evaluate_layout(job, layout) if split == "even" else split_plan(job, layout)
        plan_ = replace(plan_, idle_gpus=idle)
        _check_measured_rates([plan_])
        _warn_unpinned(whole, plan_)
        solve = plan_.split_solve
        # --split best: which split solver ran, and whether it proved its split (split_plan keeps the even one otherwise).
        info = SearchInfo(candidates=1, feasible=int(plan_.fits), wall_time_s=0.0, solver=solve.method if solve else "none",
                          status="time_limit" if solve is not None and solve.status == "time_limit" else "evaluated",
                          gap=solve.gap if plan_.runs_split else 0.0)  # the solver's gap describes only a split the plan runs
        if not plan_.fits:
            _show(plan_, info, as_json)
            raise InfeasibleError(_does_not_fit(job, plan_))
        if not plan_.leaves_headroom:
            stage, capacity = plan_.peak_memory, plan_.capacity_bytes
            err.print(f"[yellow]warning:[/yellow] stage {stage.stage} leaves {(capacity - stage.peak_bytes) / GiB:.1f} GiB free, "
                      f"less than {job.memory_headroom.describe()} (--memory-headroom)")
        _finish([place(plan_)], info, out, as_json, gates)

    run(action)
