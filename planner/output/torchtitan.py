"""torchtitan launch files: ``job.toml``, the job config torchtitan 0.2.2's
config manager reads (``--job.config_file``; field names from
torchtitan/config/job_config.py, which rejects unknown keys), ``train.sh``
(per-node torchrun of ``torchtitan.train``, output/torchrun.py) and
``slurm.sbatch``.

How loom's layout becomes torchtitan's (torchtitan/distributed/parallel_dims.py):
the mesh ``pp, dp_replicate, dp_shard, cp, tp`` orders ranks as loom's
``rank_groups`` do (tp innermost, the shard index inside the replica), so
global rank r runs what loom priced for rank r. ``dp_shard`` is loom's
``fsdp`` (1 with plain DDP), ``dp_replicate`` the rest of DP. Batches: with a
pipeline, each DP rank's ``local_batch_size`` is one step's micro batches of
``pipeline_parallel_microbatch_size`` (torchtitan's pipeline_parallel.py);
without, ``local_batch_size`` is the micro batch and torchtitan accumulates
``global_batch_size / (local_batch_size x dp)`` of them (train.py). The
stages are loom's split, named module by module
(``module_fqns_per_model_part``): the embedding ``tok_embeddings``, layer i
``layers.i``, the head ``norm`` and ``output``. loom prices fused
elementwise kernels, which torchtitan gets from torch.compile: the config
turns it on.
"""

from __future__ import annotations

import tomli_w

from loom.planner.output import torchrun
from loom.planner.output import optimizer
from loom.planner.output.slurm import nodes_of, slurm_sbatch
from loom.planner.output.torchrun import Program
from loom.planner.specs import torchtitan
from loom.planner.specs.errors import SpecError
from loom.planner.output.trial import TRIAL_LOG_INTERVAL, TRIAL_PROFILE_STEP
from loom.planner.specs.job import FP32_PRECISIONS, Job
from loom.planner.specs.layout import OP_SAC, Layout
from loom.planner.specs.stages import Chunk, Placement, Stage

LOG_FREQ = 10
# As torchtitan's run_train.sh launches it (LOG_RANK=0): only each node's local
# rank 0 writes to the console, its lines prefixed [rank0]: (torchrun's
# --local-ranks-filter, --role, --tee), one step line per logged step and node.
LOG_RANK_FLAGS = ("--local-ranks-filter", "0", "--role", "rank", "--tee", "3")


def torchtitan_files(job: Job, layout: Layout, stages: list[Stage], placement: Placement) -> dict[str, str]:
    """``job.toml``, ``train.sh`` and ``slurm.sbatch`` for this plan.

    Raises ValueError for a layout torchtitan cannot run as planned."""
    check_layout(job, layout, stages, placement)
    nodes = nodes_of(placement, job.cluster)
    program = Program(
        title=f"torchtitan pre-training of {job.model.name}",
        notes=["# Config: job.toml beside this script (TORCHTITAN_CONFIG overrides). Set its",
               "# [model] hf_assets_path (the tokenizer: torchtitan's scripts/download_hf_assets.py)",
               "# and [training] dataset, or pass --model.hf_assets_path ... after the script."],
        setup=['TORCHTITAN_CONFIG="${TORCHTITAN_CONFIG:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/job.toml}"',
               "# As torchtitan's run_train.sh runs it.",
               'export PYTORCH_ALLOC_CONF="expandable_segments:True"', "", *torchrun.tf32_environment(job.precision)],
        target='-m torchtitan.train --job.config_file "$TORCHTITAN_CONFIG"',
        torchrun_flags=LOG_RANK_FLAGS,
    )
    return {
        "job.toml": job_toml(job, layout, stages),
        "train.sh": torchrun.train_sh(program, job.cluster.name, layout.label(), layout.world_size, nodes, job.cluster.named_hosts),
        "slurm.sbatch": slurm_sbatch(f"loom-{job.model.name}", nodes, job.cluster.gpus_per_node, job.cluster.named_hosts,
                                      job.cluster.slowest.domain_gpus // job.cluster.gpus_per_node),
    }


def check_layout(job: Job, layout: Layout, stages: list[Stage], placement: Placement) -> None:
    """What torchtitan would reject, or run differently, checked before writing."""
    if job.features.attention_kernel != "cudnn":
        # 0.2.2 puts cuDNN attention first (models/attention.py): a job priced
        # with another kernel (the torchtitan-2412 stack) would run differently.
        raise SpecError(*job.blame("stack"), "one whose attention kernel torchtitan 0.2.2 runs (cudnn: the torchtitan stack) to write "
                        "its files", job.stack)
    problems = []
    if torchtitan.flavor_of(job.model) is None:
        problems.append(f"{job.model.name} is not a model torchtitan registers")
    if layout.tp * layout.pp * layout.cp * layout.ep > 1 and not layout.fsdp:
        problems.append("DDP with TP, PP, CP or EP (torchtitan's DDP is 1-D only)")
    if layout.selective_modules not in ((), (OP_SAC,)) or layout.recompute_num_layers:
        problems.append("partial recompute other than per-op checkpointing (torchtitan checkpoints every block, per op, or none)")
    if layout.zero_stage or layout.distributed_optimizer or layout.etp > 1:
        problems.append("ZeRO stages, Megatron's distributed optimizer and expert TP are not torchtitan's")
    if len(stages) != layout.pp or any(len(stage.chunks) != layout.vpp for stage in stages):
        problems.append(f"the stages are not PP{layout.pp} x {layout.vpp} chunks")
    if len(placement.gpus) != layout.world_size:
        problems.append(f"placement has {len(placement.gpus)} ranks for world size {layout.world_size}")
    if problems:
        raise ValueError(f"torchtitan cannot run layout {layout.label()} as planned: " + "; ".join(problems))


def job_toml(job: Job, layout: Layout, stages: list[Stage]) -> str:
    """The job config as TOML, with a header saying what wrote it."""
    header = f"# torchtitan 0.2.2 job config written by loom: {layout.label()} on {layout.world_size} GPUs ({job.model.name}).\n"
    return header + tomli_w.dumps(job_config(job, layout, stages))


def job_config(job: Job, layout: Layout, stages: list[Stage]) -> dict:
    """The sections of torchtitan's JobConfig this plan sets."""
    flavor = torchtitan.flavor_of(job.model)
    config = {
        "job": {"description": f"loom plan {layout.label()}"},
        "metrics": {"log_freq": TRIAL_LOG_INTERVAL if job.trial else LOG_FREQ},
        "model": {"name": flavor.name, "flavor": flavor.flavor, **_converters(job)},
        **_optimizer(job),
        "training": _training(job, layout),
        "parallelism": _parallelism(job, layout, stages),
        "activation_checkpoint": {"mode": layout.recompute, **({"selective_ac_option": OP_SAC} if layout.recompute == "selective" else {})},
        "compile": {"enable": True, "components": ["model", "loss"]},
    }
    if job.precision == "fp8":
        config["quantize"] = _quantize(job, layout)
    if job.trial:
        config["profiling"] = {"enable_profiling": True, "profile_freq": TRIAL_PROFILE_STEP}
    return config


def _optimizer(job: Job) -> dict:
    """The shared optimiser settings (output/optimizer.py) as torchtitan's
    Optimizer and LRScheduler sections take them (gradient clipping is
    training.max_norm)."""
    schedule = optimizer.schedule_of(job.model, job.train_iters)
    return {
        "optimizer": {"name": "AdamW", "lr": schedule.peak_lr, "beta1": optimizer.ADAM_BETAS[0], "beta2": optimizer.ADAM_BETAS[1],
                      "eps": optimizer.ADAM_EPS, "weight_decay": optimizer.WEIGHT_DECAY,
                      "implementation": "fused" if job.features.fused_optimizer else "foreach"},
        "lr_scheduler": {"warmup_steps": schedule.warmup_steps, "decay_type": "cosine", "min_lr_factor": optimizer.MIN_LR_FRACTION},
    }


def _training(job: Job, layout: Layout) -> dict:
    local = layout.micro_batch_size * (layout.num_microbatches if layout.pp > 1 else 1)
    return {
        "local_batch_size": local,
        "global_batch_size": layout.global_batch_size,
        "seq_len": job.seq_length,
        "steps": job.train_iters,
        "max_norm": optimizer.CLIP_GRAD,
        "dtype": "bfloat16" if job.features.optimizer_states == "bf16" else "float32",
        "mixed_precision_param": "float32" if job.precision in FP32_PRECISIONS else "bfloat16",
        "mixed_precision_reduce": "float32",
        "enable_cpu_offload": layout.optimizer_offload,
    }


def _parallelism(job: Job, layout: Layout, stages: list[Stage]) -> dict:
    shard = layout.fsdp or 1
    parallelism = {
        "data_parallel_replicate_degree": layout.dp // shard,
        "data_parallel_shard_degree": shard,
        "fsdp_reshard_after_forward": "always" if layout.reshard_after_forward else "never",
        "tensor_parallel_degree": layout.tp,
        "enable_async_tensor_parallel": job.features.tp_comm_overlap and layout.tp > 1,
        "context_parallel_degree": layout.cp,
        "pipeline_parallel_degree": layout.pp,
        "expert_parallel_degree": layout.ep,
    }
    if layout.pp > 1:
        parallelism.update(
            pipeline_parallel_schedule="Interleaved1F1B" if layout.vpp > 1 else "1F1B",
            pipeline_parallel_microbatch_size=layout.micro_batch_size,
            module_fqns_per_model_part=[_module_names(chunk) for chunk in _chunks_in_layer_order(stages)],
        )
    if job.model.moe is not None:
        parallelism["expert_parallel_comm_backend"] = "deepep" if job.features.moe_token_dispatcher == "deepep" else "standard"
    return parallelism


def _chunks_in_layer_order(stages: list[Stage]) -> list[Chunk]:
    """Model parts in torchtitan's stage order: virtual stage v * pp + s is
    chunk v of stage s (its looped schedules, as Megatron's)."""
    return [stage.chunks[v] for v in range(len(stages[0].chunks)) for stage in stages]


def _module_names(chunk: Chunk) -> list[str]:
    names = ["tok_embeddings"] if chunk.embedding else []
    names += [f"layers.{layer}" for layer in range(chunk.first_layer, chunk.first_layer + chunk.num_layers)]
    return names + (["norm", "output"] if chunk.head else [])


def _converters(job: Job) -> dict:
    """torchao's float8 (tensorwise) or MX training on the linear layers
    (torchtitan/components/quantization registry names)."""
    if job.precision != "fp8":
        return {}
    return {"converters": ["quantize.linear.mx" if job.features.fp8_recipe == "mxfp8" else "quantize.linear.float8"]}


def _quantize(job: Job, layout: Layout) -> dict:
    """The output layer stays in bf16 (as torchtitan's llama3 configs
    filter it); fp8 parameter gathers are FSDP2's float8 all-gather, which
    torchtitan turns on only over a shard degree above 1 (so written, and
    priced, only there)."""
    if job.features.fp8_recipe == "mxfp8":
        return {"linear": {"mx": {"filter_fqns": ["output"]}}}
    gather = job.features.fp8_param_gather and layout.fsdp > 1
    return {"linear": {"float8": {"enable_fsdp_float8_all_gather": gather, "precompute_float8_dynamic_scale_for_fsdp": gather,
                                  "filter_fqns": ["output"]}}}
