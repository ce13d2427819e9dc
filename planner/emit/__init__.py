"""Launch files for a planned layout, and writing them without half-written files.

``launch_files`` returns relative file name -> text for the job's framework:
Megatron-LM (``train.sh``, ``slurm.sbatch``) or DeepSpeed (``ds_config.json``,
``hostfile``, ``launch.sh`` and, with a pipeline, ``pipeline_snippet.py``).
Output is deterministic: the same inputs give byte-identical files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from loom.planner.emit.deepspeed import deepspeed_files
from loom.planner.emit.megatron import train_sh
from loom.planner.emit.slurm import nodes_of, slurm_sbatch
from loom.planner.job import Job
from loom.planner.layout import Layout
from loom.planner.stages import Placement, Stage

EXECUTABLE_SUFFIXES = (".sh", ".sbatch")


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
            "slurm.sbatch": slurm_sbatch(f"loom-{job.model.name}", nodes_of(placement), job.cluster.gpus_per_node),
        }
    if job.framework == "deepspeed":
        return deepspeed_files(job, layout, stages, placement)
    raise ValueError(f"unknown framework {job.framework!r}: expected megatron or deepspeed")


def write_atomically(out_dir: Path, files: dict[str, str]) -> None:
    """Write ``files`` under ``out_dir`` so that no file is ever half-written.

    Everything is first written (and fsynced) into a temporary directory next
    to ``out_dir`` (same file system), then each file is moved into place with
    ``os.replace``, an atomic rename. Shell scripts get mode 755, others 644."""
    out_dir = Path(out_dir)
    for name in files:
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"launch file name {name!r} must be relative and stay inside the output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name, text in files.items():
            _write_synced(staging / name, text, 0o755 if name.endswith(EXECUTABLE_SUFFIXES) else 0o644)
        for name in files:
            target = out_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_synced(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(text.encode("utf-8"))  # bytes: no platform newline translation
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)
