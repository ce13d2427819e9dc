"""When a layout does not fit: the cheapest change of one knob that makes it
fit, which ``loom evaluate`` suggests beside what binds.

The candidates are the knobs a Megatron or DeepSpeed user turns first when a
job runs out of memory, each changed alone: more recomputation, the
distributed optimizer, a higher ZeRO stage or sharding the weights over
data parallelism (FSDP), a smaller micro batch, less
interleaving, sequence parallelism, and twice the tensor, pipeline or
context parallelism in place of data parallelism (the GPU count stays) or,
when the layout leaves GPUs idle, one of data, tensor, pipeline or context
parallelism multiplied by 2, 4, ... onto them.
Each is priced whole (time and memory); the fastest one that leaves the
job's memory headroom is the answer.
"""

from __future__ import annotations

from dataclasses import replace

from loom.planner.plan import Plan, build_plan
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.rules import default_distributed_optimizer, layout_problems


def single_changes(job: Job, layout: Layout) -> list[tuple[str, Layout]]:
    """(the flags that make the change, the changed layout) for every knob
    that can move towards less memory, whether or not the result is valid."""
    changes: list[tuple[str, Layout]] = []
    plain = dict(recompute_modules=(), recompute_num_layers=0)  # the recompute flags replaced, not added to
    if layout.recompute == "none" or layout.recompute_modules:
        changes.append(("--recompute selective", replace(layout, recompute="selective", **plain)))
    if layout.recompute != "full" or layout.recompute_num_layers:
        changes.append(("--recompute full", replace(layout, recompute="full", **plain)))
    if job.framework == "megatron" and not layout.distributed_optimizer:
        changes.append(("--distributed-optimizer", replace(layout, distributed_optimizer=True)))
    if job.framework == "deepspeed":
        for stage in range(layout.zero_stage + 1, 4):
            changes.append((f"--zero-stage {stage}", replace(layout, zero_stage=stage, fsdp=layout.dp if stage == 3 else 0)))
    if job.framework == "torchtitan" and not layout.fsdp and layout.dp > 1:
        changes.append((f"--fsdp {layout.dp}", replace(layout, fsdp=layout.dp)))
    if job.framework == "megatron" and not layout.fsdp:
        dropped = " --no-offload-optimizer" if layout.optimizer_offload else ""
        changes.append((f"--fsdp {layout.dp}{dropped}", replace(layout, fsdp=layout.dp, distributed_optimizer=True, optimizer_offload=False)))
    if not layout.optimizer_offload:
        # Megatron offloads the distributed optimizer only.
        changes.append(("--offload-optimizer", replace(layout, optimizer_offload=True,
                                                       distributed_optimizer=layout.distributed_optimizer or job.framework == "megatron")))
    mbs = layout.micro_batch_size // 2
    while mbs >= 1:
        changes.append((f"--mbs {mbs}", replace(layout, micro_batch_size=mbs)))
        mbs //= 2
    if layout.vpp > 1:
        changes.append(("--vpp 1", replace(layout, vpp=1)))
    if layout.tp > 1 and not layout.sequence_parallel:
        changes.append(("--sequence-parallel", replace(layout, sequence_parallel=True)))
    if layout.dp % 2 == 0:
        half = layout.dp // 2
        # Sequence parallelism stays as the user set it, or on where TP starts.
        sequence_parallel = layout.sequence_parallel or layout.tp == 1
        changes.append((f"--tp {2 * layout.tp} --dp {half}", replace(layout, tp=2 * layout.tp, dp=half, sequence_parallel=sequence_parallel)))
        changes.append((f"--pp {2 * layout.pp} --dp {half}", replace(layout, pp=2 * layout.pp, dp=half)))
        changes.append((f"--cp {2 * layout.cp} --dp {half}", replace(layout, cp=2 * layout.cp, dp=half)))
    # GPUs the layout leaves idle: one degree multiplied by 2, 4, ... while the cluster has the GPUs.
    factor = 2
    while factor * layout.world_size <= job.cluster.num_gpus:
        dp = f" --dp {layout.dp}"
        # As loom evaluate --dp sets it: Megatron's distributed optimizer on once dp > 1.
        sharded = layout.distributed_optimizer or job.framework == "megatron"
        changes.append((f"--dp {factor * layout.dp}", replace(layout, dp=factor * layout.dp, distributed_optimizer=sharded)))
        changes.append((f"--tp {factor * layout.tp}{dp}", replace(layout, tp=factor * layout.tp, sequence_parallel=layout.sequence_parallel or layout.tp == 1)))
        changes.append((f"--pp {factor * layout.pp}{dp}", replace(layout, pp=factor * layout.pp)))
        changes.append((f"--cp {factor * layout.cp}{dp}", replace(layout, cp=factor * layout.cp)))
        factor *= 2
    return changes


def _with_optimizer_flag(job: Job, flags: str, changed: Layout) -> str:
    """``flags`` plus the distributed-optimizer flag where loom evaluate's
    default for the changed layout would not give what it prices."""
    default = default_distributed_optimizer(job, changed.dp * changed.cp, changed.fsdp, changed.optimizer_offload)
    if "distributed-optimizer" in flags or default == changed.distributed_optimizer:
        return flags
    return flags + (" --distributed-optimizer" if changed.distributed_optimizer else " --no-distributed-optimizer")


def cheapest_fix(job: Job, layout: Layout) -> tuple[str, Plan] | None:
    """The fastest single change of ``layout`` whose plan leaves the job's
    memory headroom, with its flags; None when no single change does."""
    found: list[tuple[float, str, Plan]] = []
    for flags, changed in single_changes(job, layout):
        if layout_problems(job, changed):
            continue
        flags = _with_optimizer_flag(job, flags, changed)
        plan = build_plan(job, changed)
        if plan.leaves_headroom:
            found.append((plan.step_time_s, flags, plan))
    if not found:
        return None
    _, flags, plan = min(found, key=lambda item: (item[0], item[1]))
    return flags, plan
