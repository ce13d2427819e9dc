"""The layout a Megatron-LM run used, from the argument dump its log starts
with (``_print_args`` in megatron/training/arguments.py: ``  name ..... value``
for every argument after ``validate_args`` filled in the derived ones, such as
``data_parallel_size``), so ``loom compare JOB LOG`` can price the layout a
user runs today without a plan.json.

Arguments read (megatron-core 0.16 names; older releases print the same
ones they have): the parallel sizes, ``micro_batch_size``,
``global_batch_size``, ``sequence_parallel``, ``recompute_granularity``,
``recompute_modules``, ``recompute_method`` with ``recompute_num_layers``
(``block``: the first N layers of each chunk; ``uniform``: every layer),
``use_distributed_optimizer``,
``virtual_pipeline_model_parallel_size`` (or
``num_layers_per_virtual_pipeline_stage``), ``use_megatron_fsdp`` (sharded over
all of data parallel), and ``seq_length``, ``num_layers``, ``hidden_size`` to
check the run is of the job's model.
"""

from __future__ import annotations

import ast

from loom.planner.calibrate.compare import MEGATRON_ARGUMENTS
from loom.planner.output.report import Report, SearchInfo, build_report
from loom.planner.plan import evaluate
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.profiles.run_logs.record import RunLog

REQUIRED = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size", "micro_batch_size", "global_batch_size")


def _argument(arguments: dict[str, str], name: str, default: object = None) -> object:
    """An argument as Python prints it (``4``, ``True``, ``None``, ``['core_attn']``), else its text."""
    text = arguments.get(name)
    if text is None:
        return default
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _count(arguments: dict[str, str], name: str, source: str, default: int | None = None) -> int:
    """A positive integer argument (``default`` when the dump lacks it); SpecError naming it otherwise."""
    value = _argument(arguments, name, default)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(source, name, "a positive integer in the log's argument dump", value)
    return value


def layout_from_arguments(job: Job, arguments: dict[str, str], source: str) -> Layout:
    """The layout of the run whose argument dump is ``arguments``.

    Raises SpecError naming ``source``: no argument dump, a size that is not a
    positive integer, or a run of another model or sequence than the job's."""
    missing = [name for name in REQUIRED if name not in arguments]
    if missing:
        raise SpecError(source, missing[0], "a Megatron-LM log with its argument dump ('---- arguments ----', printed by rank 0 at "
                        "start-up), or give the plan.json the run ran instead of the job")
    for name, ours in (("num_layers", job.model.num_layers), ("hidden_size", job.model.hidden_size), ("seq_length", job.seq_length)):
        theirs = _argument(arguments, name)
        if theirs is not None and theirs != ours:
            raise SpecError(source, name, f"{ours}, the job's ({job.model.name}, sequence {job.seq_length}): this log is of another run", theirs)
    tp, pp = _count(arguments, "tensor_model_parallel_size", source), _count(arguments, "pipeline_model_parallel_size", source)
    dp = _count(arguments, "data_parallel_size", source)
    vpp = _argument(arguments, "virtual_pipeline_model_parallel_size")
    per_chunk = _argument(arguments, "num_layers_per_virtual_pipeline_stage")
    if vpp is None and isinstance(per_chunk, int) and per_chunk > 0:
        vpp = job.model.num_layers // (pp * per_chunk)
    recompute = _argument(arguments, "recompute_granularity") or "none"
    if recompute not in ("selective", "full", "none"):
        raise SpecError(source, "recompute_granularity", "selective, full or None", recompute)
    modules = _argument(arguments, "recompute_modules")
    return Layout(
        tp=tp, pp=pp, dp=dp, cp=_count(arguments, "context_parallel_size", source, 1), ep=_count(arguments, "expert_model_parallel_size", source, 1),
        # A dense model has no experts to split: Megatron fills expert_tensor_parallel_size with TP regardless (validate_args).
        etp=_count(arguments, "expert_tensor_parallel_size", source, 1) if job.model.moe is not None else 1, vpp=vpp if isinstance(vpp, int) and vpp > 1 else 1,
        micro_batch_size=_count(arguments, "micro_batch_size", source), global_batch_size=_count(arguments, "global_batch_size", source),
        sequence_parallel=_argument(arguments, "sequence_parallel") is True, recompute=recompute,
        recompute_modules=tuple(modules) if recompute == "selective" and isinstance(modules, list) and modules != ["core_attn"] else (),
        recompute_num_layers=_count(arguments, "recompute_num_layers", source)
        if recompute == "full" and _argument(arguments, "recompute_method") == "block" else 0,
        distributed_optimizer=_argument(arguments, "use_distributed_optimizer") is True,
        fsdp=dp if _argument(arguments, "use_megatron_fsdp") is True else 0,
    )


def report_of_run(job: Job, logs: list[RunLog]) -> Report:
    """The report of the one plan a Megatron-LM run's logs describe: the
    layout of the first log with an argument dump, priced for ``job`` (even
    split, Megatron's rank order).

    Raises SpecError when no log has an argument dump, or as ``layout_from_arguments`` and ``evaluate``."""
    dumped = next((log for log in logs if log.arguments), None)
    if dumped is None:
        raise SpecError(logs[0].path, "arguments", "a Megatron-LM log with its argument dump (printed by rank 0 at start-up); for other "
                        "logs give the plan.json the run ran (loom evaluate ... --out DIR writes one)")
    try:
        plan = evaluate(job, layout_from_arguments(job, dumped.arguments, dumped.path), source=dumped.path)
    except SpecError as error:  # a layout loom refuses: name the log's arguments, not loom's fields
        names = {field: argument for argument, field in MEGATRON_ARGUMENTS.items()}
        problems = [(names.get(field, field), expected, got) for field, expected, got in error.problems]
        raise SpecError.of(error.source, problems) from None
    return build_report([plan], SearchInfo(candidates=1, feasible=int(plan.fits), wall_time_s=None, solver="none", status="evaluated", gap=0.0))
