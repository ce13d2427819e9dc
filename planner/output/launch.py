"""Launch files for a planned layout.

``launch_files`` returns relative file name -> text for the job's framework:
Megatron-LM (``train.sh``, ``slurm.sbatch``), DeepSpeed (``ds_config.json``,
``hostfile``, ``launch.sh`` and, with a pipeline, ``pipeline_snippet.py``) or
torchtitan (``job.toml``, ``train.sh``, ``slurm.sbatch``).
Output is deterministic: the same inputs give byte-identical files.
"""

from __future__ import annotations

from loom.planner.output.deepspeed import deepspeed_files, script_steps
from loom.planner.output.megatron import train_sh
from loom.planner.output.slurm import nodes_of, slurm_sbatch
from loom.planner.output.torchtitan import torchtitan_files
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.stages import Placement, Stage


def launch_files(job: Job, layout: Layout, stages: list[Stage], placement: Placement) -> dict[str, str]:
    """The launch files that realise ``layout``, ``stages`` and ``placement``.

    Raises ValueError when the framework cannot run the layout as planned.
    Vision-language models get none yet: Megatron trains them through
    examples/multimodal with its own arguments, which loom does not write."""
    if job.model.vision is not None:
        return {}
    if job.framework == "megatron":
        return {
            "train.sh": train_sh(job, layout, stages, placement),
            "slurm.sbatch": slurm_sbatch(f"loom-{job.model.name}", nodes_of(placement, job.cluster), job.cluster.gpus_per_node, job.cluster.named_hosts,
                                      job.cluster.slowest.domain_gpus // job.cluster.gpus_per_node),
        }
    if job.framework == "deepspeed":
        return deepspeed_files(job, layout, stages, placement)
    if job.framework == "torchtitan":
        return torchtitan_files(job, layout, stages, placement)
    raise ValueError(f"unknown framework {job.framework!r}: expected megatron, deepspeed or torchtitan")


def training_script_steps(job: Job, layout: Layout) -> list[str]:
    """What the user's own training script must do for the plan to hold
    (DeepSpeed runs the user's script; Megatron-LM's train.sh needs nothing)."""
    return script_steps(job, layout) if job.framework == "deepspeed" else []
