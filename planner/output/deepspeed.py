"""DeepSpeed launch files: ``ds_config.json``, ``hostfile``, ``launch.sh``;
with a pipeline, ``pipeline_snippet.py`` for the user's training script; and,
when the placement orders some host's GPUs other than ascending,
``gpu_order.py``, which the launcher starts in place of the training script.

In loom, DeepSpeed runs ZeRO data parallelism, optionally under a
``PipelineModule`` pipeline; TP and CP are Megatron's (tp = cp = 1 here).
DeepSpeed numbers ranks pipe-major, ``rank = stage * dp + data``
(``PipeDataParallelTopology``), which is Megatron's order with tp = cp = 1, so
loom's stages carry over unchanged.
"""

from __future__ import annotations

import json
import shlex
import textwrap

from loom.planner.output import optimizer
from loom.planner.output.slurm import NodeRanks, nodes_of
from loom.planner.output.trial import TRIAL_LOG_INTERVAL
from loom.planner.specs.job import FP32_PRECISIONS, Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.stages import Placement, Stage, default_stages

STEPS_PER_PRINT = 10
MASTER_PORT = 29500


def deepspeed_files(job: Job, layout: Layout, stages: list[Stage], placement: Placement) -> dict[str, str]:
    """All DeepSpeed launch files for this layout; raises ValueError for a
    layout DeepSpeed cannot run as planned."""
    check_layout(job, layout, stages, placement)
    nodes = nodes_of(placement, job.cluster)
    files = {"ds_config.json": json.dumps(ds_config(job, layout), indent=2) + "\n", "launch.sh": launch_sh(job, layout, nodes)}
    if job.cluster.named_hosts:  # otherwise launch.sh writes it from the nodes it is given
        files["hostfile"] = hostfile(nodes, job.cluster.gpus_per_node)
    if needs_gpu_order(nodes):
        files[GPU_ORDER] = gpu_order_py(nodes)
    if layout.pp > 1:
        files["pipeline_snippet.py"] = pipeline_snippet(layout, stages)
    if job.model.moe is not None:
        files["moe_snippet.py"] = moe_snippet(job, layout)
    return files


def script_steps(job: Job, layout: Layout) -> list[str]:
    """What the user's training script must do for the plan to hold, which
    no DeepSpeed config can switch on: build the pipeline and MoE layers as
    the snippets show, and, without a pipeline, checkpoint every layer
    itself when the plan recomputes (DeepSpeed's activation_checkpointing
    section only configures deepspeed.checkpointing.checkpoint; PipelineModule
    calls it for a pipeline, a plain model must call it per layer)."""
    steps = []
    if layout.pp > 1:
        steps.append("build the model as a PipelineModule as pipeline_snippet.py shows (it checkpoints layers when the plan recomputes)")
    elif layout.recompute == "full":
        steps.append("wrap each layer's forward in deepspeed.checkpointing.checkpoint(layer, hidden): the plan recomputes every "
                     "layer's activations (full recompute), and its memory assumes it")
    if job.precision == "tf32":
        steps.append("set torch.backends.cuda.matmul.allow_tf32 = True before training (precision tf32: fp32 matmuls on TF32 tensor cores)")
    if job.model.moe is not None:
        steps.append("replace each MoE layer's MLP with moe_snippet.py's moe_layer(expert), and build the optimizer from its optimizer_groups(model)")
    return steps


def check_layout(job: Job, layout: Layout, stages: list[Stage], placement: Placement) -> None:
    problems = []
    if (layout.tp, layout.cp, layout.etp, layout.vpp) != (1, 1, 1, 1):
        problems.append("TP, CP, expert TP and virtual stages must be 1 (they are Megatron features)")
    if layout.ep > 1 and job.model.moe is None:
        problems.append(f"expert parallelism (EP{layout.ep}) on a dense model")
    if layout.sequence_parallel or layout.distributed_optimizer:
        problems.append("sequence parallelism / Megatron's distributed optimizer are not DeepSpeed features")
    if layout.pp > 1 and layout.zero_stage > 1:
        # PipelineModule docstring: "Pipeline parallelism is not compatible with ZeRO-2 and ZeRO-3."
        problems.append(f"ZeRO stage {layout.zero_stage} with a pipeline (at most ZeRO-1)")
    if layout.recompute == "selective":
        problems.append("selective recompute is Megatron's; DeepSpeed checkpoints whole layers (full)")
    if layout.optimizer_offload and not layout.zero_stage:
        problems.append("optimizer offload needs a ZeRO stage")
    if layout.fsdp != (layout.dp if layout.zero_stage == 3 else 0) or not layout.reshard_after_forward:
        problems.append("ZeRO-3 shards weights over all of DP, resharding after forward; other stages do not shard weights")
    if job.precision == "fp8":
        problems.append("fp8 has no DeepSpeed config switch (it needs Transformer Engine in the model code)")
    if layout.global_batch_size % (layout.micro_batch_size * layout.dp):
        problems.append(f"global batch {layout.global_batch_size} not a multiple of mbs x dp")
    if stages != default_stages(job.model, layout, job.framework):
        # PipelineModule has no explicit stage boundaries (see pipeline_snippet).
        problems.append("only a uniform layer split can be given to PipelineModule")
    if len(placement.gpus) != layout.world_size:
        problems.append(f"placement has {len(placement.gpus)} ranks for world size {layout.world_size}")
    if problems:
        raise ValueError(f"DeepSpeed cannot run layout {layout.label()} as planned: " + "; ".join(problems))


def ds_config(job: Job, layout: Layout) -> dict:
    """The DeepSpeed config (https://www.deepspeed.ai/docs/config-json/).

    All three batch fields are given so DeepSpeed checks
    train_batch_size == micro batch x accumulation x data-parallel size."""
    config: dict = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.num_microbatches,
        "steps_per_print": TRIAL_LOG_INTERVAL if job.trial else STEPS_PER_PRINT,
        **({"wall_clock_breakdown": True, "log_level": "info"} if job.trial else {}),
        **_optimizer(job),
        **_precision(job),
        "zero_optimization": _zero(job, layout),
    }
    if layout.recompute == "full":
        # Configures deepspeed.checkpointing, which PipelineModule's
        # activation_checkpoint_interval (or the user's model) calls per layer.
        config["activation_checkpointing"] = {
            "partition_activations": False,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
        }
    return config


def _optimizer(job: Job) -> dict:
    """The shared optimiser settings (output/optimizer.py): DeepSpeed's Adam
    (AdamW: adam_w_mode defaults on) and its WarmupCosineLR schedule
    (runtime/lr_schedules.py), linear warm-up from 0 and cosine to the
    shared floor."""
    schedule = optimizer.schedule_of(job.model, job.train_iters)
    return {
        "gradient_clipping": optimizer.CLIP_GRAD,
        "optimizer": {"type": "Adam", "params": {"lr": schedule.peak_lr, "betas": list(optimizer.ADAM_BETAS), "eps": optimizer.ADAM_EPS,
                                                 "weight_decay": optimizer.WEIGHT_DECAY}},
        # WarmupCosineLR takes a warm-up of at least one step (lr_schedules.py raises on 0).
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": schedule.steps, "warmup_num_steps": max(1, schedule.warmup_steps),
                                                           "warmup_min_ratio": 0.0, "warmup_type": "linear",
                                                           "cos_min_ratio": optimizer.MIN_LR_FRACTION}},
    }


def _precision(job: Job) -> dict:
    """fp32 and tf32: neither section (DeepSpeed then trains in fp32)."""
    if job.precision in FP32_PRECISIONS:
        return {}
    if job.precision == "fp16":
        # loss_scale 0 = dynamic loss scaling.
        return {"fp16": {"enabled": True, "loss_scale": 0}}
    return {"bf16": {"enabled": True}}


def _zero(job: Job, layout: Layout) -> dict:
    zero: dict = {"stage": layout.zero_stage}
    if layout.zero_stage >= 1:
        # Overlap the gradient reduce-scatter with the backward pass, as the time model assumes.
        zero["overlap_comm"] = job.features.overlap_grad_reduce
        zero["contiguous_gradients"] = True
    if layout.optimizer_offload:
        # ZeRO-Offload: fp32 master and Adam on the host, pinned for async copies
        # (runtime/zero/offload_config.py; DeepSpeedCPUAdam is chosen for it).
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero


def hostfile(nodes: list[NodeRanks], gpus_per_node: int) -> str:
    """``host slots=N`` per node in node-rank order; the DeepSpeed runner gives
    ranks to hosts in file order. Slots are the node's GPUs (what may be
    chosen from); ``launch.sh`` narrows them with ``--include`` when the plan
    uses only some."""
    return "".join(f"{node.host} slots={gpus_per_node}\n" for node in nodes)


def include_filter(nodes: list[NodeRanks], gpus_per_node: int) -> str | None:
    """The runner's ``--include host:gpu,gpu@...``, or None when every node runs
    all its GPUs (the default).

    It chooses which GPUs of a host run, not their order: the runner sorts each
    host's list (``parse_node_config_list`` in deepspeed/launcher/runner.py),
    launch.py sets CUDA_VISIBLE_DEVICES to it and local rank i runs on the i-th.
    Any other order is set by ``gpu_order.py``."""
    if all(sorted(node.gpus) == list(range(gpus_per_node)) for node in nodes):
        return None
    return "@".join(f"{node.host}:{','.join(map(str, sorted(node.gpus)))}" for node in nodes)


def needs_gpu_order(nodes: list[NodeRanks]) -> bool:
    """True when some host's local ranks do not run on its GPUs in ascending order."""
    return any(list(node.gpus) != sorted(node.gpus) for node in nodes)


GPU_ORDER = "gpu_order.py"


def gpu_order_py(nodes: list[NodeRanks]) -> str:
    """``gpu_order.py``: started by DeepSpeed's launcher in place of the training
    script, it puts the node's GPUs in the plan's order, then becomes the script.

    launch.py (deepspeed/launcher/launch.py) runs ``python -u SCRIPT
    --local_rank=i ARGS`` per local rank with CUDA_VISIBLE_DEVICES set to the
    node's GPUs in ascending order, and exports the node's index as CROSS_RANK.
    This file, given as SCRIPT with the training script as the first of ARGS,
    re-sets CUDA_VISIBLE_DEVICES to the plan's order for that node and
    ``os.execv``s the same interpreter on the training script, so the script
    sees exactly what launch.py would have given it, and nothing has touched
    CUDA before the variable is set. It refuses to start when the launcher
    gave the node other GPUs than planned (hostfile or --include edited)."""
    table = [f"    {json.dumps(','.join(map(str, node.gpus)))},  # node {node.node_rank}: {node.host}" for node in nodes]
    return "\n".join(
        [
            '"""Written by loom: run the training script on this node\'s GPUs in the plan\'s order.',
            "",
            "DeepSpeed's launcher gives a node's GPUs in ascending order and local rank i",
            "uses the i-th; the plan runs local rank i of node k on GPUS_OF_NODE[k][i].",
            "launch.sh starts this file in place of the training script, which comes first",
            "among the arguments. See loom/planner/output/deepspeed.py, gpu_order_py.",
            '"""',
            "",
            "import os",
            "import sys",
            "",
            "GPUS_OF_NODE = [",
            *table,
            "]",
            "",
            "",
            "def main() -> None:",
            '    node = int(os.environ["CROSS_RANK"])  # set by deepspeed/launcher/launch.py',
            "    planned = GPUS_OF_NODE[node]",
            '    given = os.environ.get("CUDA_VISIBLE_DEVICES", "")',
            '    if sorted(given.split(",")) != sorted(planned.split(",")):',
            '        sys.exit(f"gpu_order.py: the launcher gave node {node} GPUs {given!r}, the plan {planned!r}")',
            '    os.environ["CUDA_VISIBLE_DEVICES"] = planned',
            "    args = sys.argv[1:]",
            '    flags = args[:1] if args[:1] and args[0].startswith("--local_rank") else []',
            "    script, rest = args[len(flags)], args[len(flags) + 1 :]",
            '    os.execv(sys.executable, [sys.executable, "-u", script, *flags, *rest])',
            "",
            "",
            'if __name__ == "__main__":',
            "    main()",
            "",
        ]
    )


def launch_sh(job: Job, layout: Layout, nodes: list[NodeRanks]) -> str:
    """Runs the DeepSpeed runner from the first host: it starts launch.py on
    every host of ``hostfile`` over pdsh, passing ``--node_rank=%n``, which
    pdsh replaces by the host's position in its ``-w`` list, the hostfile's
    order (pdsh: opt.c pushes -w hosts in order, dsh.c numbers threads in that
    order, pipecmd.c substitutes %n)."""
    named = job.cluster.named_hosts
    include = include_filter(nodes, job.cluster.gpus_per_node)
    include_arg = f" --include {shlex.quote(include)}" if include and named else ' --include "$INCLUDE"' if include else ""
    master = shlex.quote(nodes[0].host) if named else '"${HOSTS[0]}"'
    hostfile_path = '"$HERE/hostfile"' if named else '"$HOSTFILE"'
    script = f'"$HERE/{GPU_ORDER}" "$TRAIN_SCRIPT"' if needs_gpu_order(nodes) else '"$TRAIN_SCRIPT"'
    where = ("# Run it on the first host of hostfile." if named else
             "# The cluster names no hosts: run it on the first of the nodes you were given,\n"
             "# listed in LOOM_HOSTS (first first) or else SLURM's allocation; it writes the\n"
             "# hostfile from them. The placement holds per node (which GPU runs which local\n"
             "# rank), not which machine is which.")
    lines = [
        "#!/usr/bin/env bash",
        f"# DeepSpeed training of {job.model.name} written by loom: {layout.label()},",
        f"# {layout.world_size} GPUs on {len(nodes)} node(s) of cluster {job.cluster.name}.",
        where,
        "# TRAIN_SCRIPT is your training script; it must accept --deepspeed_config",
        "# (deepspeed.add_config_arguments) and pass it to deepspeed.initialize.",
        *(f"# {line}" for step in script_steps(job, layout) for line in textwrap.wrap(f"It must also {step}.", 78)),
        *(
            [f"# {GPU_ORDER} starts it with each host's GPUs in the plan's order; the files must sit",
             "# at the same path on every host (a shared file system), like ds_config.json."]
            if needs_gpu_order(nodes) else []
        ),
        "set -euo pipefail",
        "",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        'TRAIN_SCRIPT="${TRAIN_SCRIPT:?set TRAIN_SCRIPT to your training script}"',
        f'MASTER_PORT="${{MASTER_PORT:-{MASTER_PORT}}}"',
        *([] if named else _hosts_of_allocation(nodes, job.cluster.gpus_per_node, include is not None)),
        "",
        f'exec deepspeed --hostfile {hostfile_path} --master_addr {master} --master_port "$MASTER_PORT"{include_arg} \\',
        f'    {script} --deepspeed --deepspeed_config "$HERE/ds_config.json" "$@"',
        "",
    ]
    return "\n".join(lines)


def _hosts_of_allocation(nodes: list[NodeRanks], gpus_per_node: int, include: bool) -> list[str]:
    """Bash that takes the nodes the job was given (LOOM_HOSTS, else SLURM's
    allocation, else this machine for a one-node plan), checks there are as
    many as planned, and writes the hostfile (and the --include list) in
    node-rank order: the plan's node k is the job's node ``given_index`` of k
    (see ``NodeRanks``)."""
    alone = ['elif [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then GIVEN=(localhost)  # a one-node plan: this machine'] if len(nodes) == 1 else []
    lines = [
        'if [[ -n "${LOOM_HOSTS:-}" ]]; then read -r -a GIVEN <<< "$LOOM_HOSTS"',
        *alone,
        'else mapfile -t GIVEN < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?set LOOM_HOSTS to the nodes, node 0 first}"); fi',
        f'[[ "${{#GIVEN[@]}}" -eq {len(nodes)} ]] || {{ echo "launch.sh: the plan runs on {len(nodes)} nodes, got ${{#GIVEN[@]}}: ${{GIVEN[*]}}" >&2; exit 2; }}',
        "# Node rank k runs on the job's node GIVEN_INDEX[k].",
        f"GIVEN_INDEX=({' '.join(str(node.given_index) for node in nodes)})",
        'HOSTS=()',
        'for i in "${GIVEN_INDEX[@]}"; do HOSTS+=("${GIVEN[$i]}"); done',
        'HOSTFILE="$(mktemp "${TMPDIR:-/tmp}/loom-hostfile.XXXXXX")"  # read by the runner on this host only',
        f'printf "%s slots={gpus_per_node}\\n" "${{HOSTS[@]}}" > "$HOSTFILE"',
    ]
    if include:
        lines += [
            f"PLANNED_GPUS=({' '.join(','.join(map(str, sorted(node.gpus))) for node in nodes)})",
            'INCLUDE=""',
            'for k in "${!HOSTS[@]}"; do INCLUDE="${INCLUDE:+$INCLUDE@}${HOSTS[$k]}:${PLANNED_GPUS[$k]}"; done',
        ]
    return lines


def pipeline_snippet(layout: Layout, stages: list[Stage]) -> str:
    """Python for the user's script: a ``PipelineModule`` with loom's split.

    ``PipelineModule`` takes no explicit stage boundaries. Its
    ``partition_method`` is "parameters" (default: balance parameter counts),
    "uniform" (balance the number of layer specs, embedding and head included)
    or "type:REGEX" (balance the number of layers whose class name matches
    REGEX), see deepspeed/runtime/pipe/module.py ``_partition_layers``. Only
    "type:" on the decoder layer class gives every stage the same number of
    decoder layers, with the embedding on the first stage and the head on the last."""
    split = [f"  stage {stage.index}: layers {_layer_range(stage)}" for stage in stages]
    interval = 1 if layout.recompute == "full" else 0
    counts = sorted({stage.num_layers for stage in stages}, reverse=True)
    per_stage = f"{counts[0]} decoder layers on each" if len(counts) == 1 else f"{counts[0]} or {counts[1]} decoder layers on each (the first take the extra)"
    return "\n".join(
        [
            f'"""Pipeline split written by loom: {per_stage} of {layout.pp} stages.',
            "",
            *split,
            "",
            'DeepSpeed\'s PipelineModule takes no explicit stage boundaries; partition_method',
            '"type:REGEX" balances the number of layers whose class name matches REGEX',
            "(deepspeed/runtime/pipe/module.py), which gives exactly this split when",
            "layer_specs are [embedding, decoder layers..., final norm + LM head].",
            "Set DECODER_LAYER_REGEX to match your decoder layer class name.",
            '"""',
            "",
            "from deepspeed.pipe import PipelineModule",
            "",
            f"PIPELINE_STAGES = {layout.pp}",
            'DECODER_LAYER_REGEX = "(DecoderLayer|Block|Layer)$"  # Hugging Face\'s LlamaDecoderLayer, BloomBlock, NemotronHBlock, GPTNeoXLayer',
            f"ACTIVATION_CHECKPOINT_INTERVAL = {interval}  # 1: recompute every layer (full recompute); 0: off",
            "",
            "",
            "def build_pipeline(layer_specs, loss_fn):",
            '    """layer_specs: LayerSpec objects (or modules) in model order."""',
            "    return PipelineModule(",
            "        layers=layer_specs,",
            "        num_stages=PIPELINE_STAGES,",
            "        loss_fn=loss_fn,",
            '        partition_method=f"type:{DECODER_LAYER_REGEX}",',
            "        activation_checkpoint_interval=ACTIVATION_CHECKPOINT_INTERVAL,",
            "    )",
            "",
        ]
    )


def _layer_range(stage: Stage) -> str:
    chunk = stage.chunks[0]
    extras = (" + embedding" if chunk.embedding else "") + (" + head" if chunk.head else "")
    return f"{chunk.first_layer}-{chunk.first_layer + chunk.num_layers - 1}{extras}"


def _experts(count: int) -> str:
    return f"{count} expert" + ("" if count == 1 else "s")


def moe_snippet(job: Job, layout: Layout) -> str:
    """Python for the user's model: DeepSpeed's MoE layer (deepspeed/moe/layer.py)
    with loom's expert parallel size, dropless like the time model, and the
    optimizer's parameter groups that keep expert gradients on their own
    (expert data parallel) reduce."""
    moe = job.model.moe
    return "\n".join(
        [
            f'"""MoE layers written by loom for {job.model.name}: {_experts(moe.num_experts)}, top-{moe.top_k},',
            f"expert parallel size {layout.ep} (so {_experts(moe.num_experts // layout.ep)} per GPU and expert data parallel {layout.expert_dp}).",
            "Replace each decoder layer's MLP with moe_layer(expert), where expert is one",
            f"gated MLP of width {moe.expert_ffn_hidden_size}, and build the optimizer from optimizer_groups(model).",
            '"""',
            "",
            "from deepspeed.moe.layer import MoE",
            "from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer",
            "",
            f"HIDDEN_SIZE = {job.model.hidden_size}",
            f"NUM_EXPERTS = {moe.num_experts}",
            f"EXPERT_PARALLEL_SIZE = {layout.ep}",
            f"TOP_K = {moe.top_k}",
            "",
            "",
            "def moe_layer(expert):",
            "    return MoE(",
            "        hidden_size=HIDDEN_SIZE,",
            "        expert=expert,",
            "        num_experts=NUM_EXPERTS,",
            "        ep_size=EXPERT_PARALLEL_SIZE,",
            "        k=TOP_K,",
            "        drop_tokens=False,  # dropless, as loom's time model assumes",
            *(["        top2_2nd_expert_sampling=False,  # the second expert by its score, as the model routes (not Gumbel-sampled)"]
              if moe.top_k == 2 else []),
            "    )",
            "",
            "",
            "def optimizer_groups(model):",
            '    return split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "parameters"})',
            "",
        ]
    )
