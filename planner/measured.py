"""Measured numbers in place of estimates: how a layer profile (``loom profile
layers``) replaces the analytical per-layer time and activation bytes, and a
GEMM profile (``loom profile gemm``) the GPU's GEMM efficiency curve.

A profile holds each layer kind's forward and backward time and its bytes
kept for backward at the shapes it measured. At a measured shape the planner
takes the measured number ("measured"). Elsewhere it takes the estimate at
that shape times measured / estimate at the nearest measured shapes
("interpolated"): the correction is interpolated linearly in log(tokens)
between the profiled shapes with the same parallel structure (TP, sequence
parallelism, EP; else the nearest TP), and held constant beyond them, while
the estimate carries how the cost moves with the shape (context parallelism,
longer sequences). A kind the profile lacks, or a layer the profile does not
describe (another model, GPU, precision, or attention without flash) keeps
the estimate ("estimated").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np

from loom.planner.errors import SpecError
from loom.planner.model import ModelSpec
from loom.profiles.catalogue import GPU, find_gpu
from loom.profiles.layer_profile import GemmDocument, LayerEntry, LayersDocument, ModelDims, read_profile

if TYPE_CHECKING:
    from loom.planner.compute import Shape
    from loom.planner.job import Job

Source = Literal["measured", "interpolated", "estimated"]


@dataclass(frozen=True, eq=False)
class LayerProfile:
    """A loaded ``kind: layers`` profile (identity is equality, so Shapes
    carrying it stay hashable and cacheable)."""

    path: str
    document: LayersDocument

    def describes(self, shape: Shape) -> bool:
        """Whether the profile's layers are this shape's: same model
        dimensions, 16-bit precision as profiled, flash attention."""
        dims = ModelDims.of(shape.model).model_copy(update={"name": self.document.model.name})
        return dims == self.document.model and shape.features.flash_attention


def _quantity(entry: LayerEntry, quantity: str) -> float | None:
    """``forward_s``, ``backward_s`` or ``saved_bytes.<recompute>`` of an entry."""
    if quantity == "forward_s":
        return entry.forward.median_s
    if quantity == "backward_s":
        return entry.backward.median_s
    return entry.saved_bytes.get(quantity.removeprefix("saved_bytes."))


def _matches(entry: LayerEntry, shape: Shape) -> bool:
    return (entry.tp, entry.micro_batch_size, entry.seq_length, entry.sequence_parallel, 1) == (
        shape.tp, shape.micro_batch_size, shape.seq_length, shape.sequence_parallel and shape.tp > 1, shape.cp
    ) and (entry.kind != "moe" or (entry.ep, entry.etp) == (shape.ep, shape.etp))


def _structure_distance(entry: LayerEntry, shape: Shape) -> tuple:
    """How far an entry's parallel structure is from the shape's: TP first."""
    expert = (entry.ep, entry.etp) != (shape.ep, shape.etp) if entry.kind == "moe" else False
    return abs(math.log2(entry.tp / shape.tp)), entry.sequence_parallel != (shape.sequence_parallel and shape.tp > 1), expert


def _entry_shape(entry: LayerEntry, like: Shape) -> Shape:
    return replace(like, tp=entry.tp, cp=1, micro_batch_size=entry.micro_batch_size, seq_length=entry.seq_length,
                   sequence_parallel=entry.sequence_parallel, ep=entry.ep, etp=entry.etp, profile=None)


def _entries(shape: Shape, kind: str, quantity: str, gpu_name: str | None) -> list[LayerEntry]:
    """The profile's entries that can stand for ``kind`` at ``shape``."""
    profile = shape.profile
    if profile is None or not profile.describes(shape):
        return []
    if gpu_name is not None and (gpu_name != profile.document.gpu or shape.precision != profile.document.dtype):
        return []  # times hold for the GPU and precision measured; saved bytes for any
    return [entry for entry in profile.document.entries if entry.kind == kind and _quantity(entry, quantity) is not None]


def source(shape: Shape, kind: str, quantity: str, gpu_name: str | None = None) -> Source:
    entries = _entries(shape, kind, quantity, gpu_name)
    if not entries:
        return "estimated"
    return "measured" if any(_matches(entry, shape) for entry in entries) else "interpolated"


def calibrated(shape: Shape, kind: str, quantity: str, estimate: Callable[[Shape], float], gpu_name: str | None = None) -> float:
    """``quantity`` of one ``kind`` layer at ``shape``: measured, interpolated
    or estimated (see the module's docstring). ``gpu_name`` is given for
    times, which hold only on the GPU measured."""
    entries = _entries(shape, kind, quantity, gpu_name)
    if not entries:
        return estimate(shape)
    for entry in entries:
        if _matches(entry, shape):
            return _quantity(entry, quantity)
    nearest = min(_structure_distance(entry, shape) for entry in entries)
    ratios: dict[float, list[float]] = {}
    for entry in entries:
        if _structure_distance(entry, shape) == nearest:
            entry_estimate = estimate(_entry_shape(entry, shape))
            if entry_estimate > 0:
                ratios.setdefault(math.log(entry.dims.tokens), []).append(_quantity(entry, quantity) / entry_estimate)
    if not ratios:
        return estimate(shape)
    xs = sorted(ratios)
    ys = [float(np.mean(ratios[x])) for x in xs]
    tokens = shape.micro_batch_size * shape.seq_length
    return estimate(shape) * float(np.interp(math.log(tokens), xs, ys))


def with_profiles(job: Job, paths: list[Path]) -> Job:
    """``job`` with its profiles applied: a gemm profile recalibrates the GEMM
    curve of the cluster's GPUs of its type; a layers profile (one at most,
    of the job's model) rides on the job for the time and memory models."""
    layer_profile, cluster = None, job.cluster
    for path in paths:
        document = read_profile(path)
        gpu = find_gpu(document.gpu, str(path), "gpu")
        types = sorted({node.gpu.name for node in cluster.nodes})
        if gpu.name not in types:
            raise SpecError(str(path), "gpu", f"a GPU type of cluster {cluster.name} ({', '.join(types)})", document.gpu)
        if isinstance(document, GemmDocument):
            fit = document.fit
            calibrated_gpu = replace(gpu, gemm_efficiency={**gpu.gemm_efficiency, document.dtype: fit.gemm_efficiency},
                                     gemm_k_overhead=fit.k_overhead, gemm_profile=str(path))
            cluster = replace(cluster, nodes=tuple(replace(node, gpu=calibrated_gpu) if node.gpu.name == gpu.name else node for node in cluster.nodes))
            continue
        if layer_profile is not None:
            raise SpecError(str(path), "kind", f"one layers profile per job ({layer_profile.path} is one already)", "layers")
        _check_model(document, job.model, str(path))
        layer_profile = LayerProfile(str(path), document)
    return replace(job, cluster=cluster, layer_profile=layer_profile, profiles=tuple(str(path) for path in paths))


def _check_model(document: LayersDocument, model: ModelSpec, source: str) -> None:
    """A layers profile must be of a model with the job's layer dimensions."""
    wanted = ModelDims.of(model).model_dump()
    for field, got in document.model.model_dump().items():
        if field != "name" and got != wanted[field]:
            raise SpecError(source, f"model.{field}", f"{wanted[field]} ({model.name}'s; profile that model's layers)", got)


def sources(shape: Shape, gpu: GPU, recompute: str) -> dict[str, Source]:
    """Which of a plan's per-layer figures are measured, interpolated or
    estimated (plan.json's ``sources``)."""
    model = shape.model
    kinds = (["dense"] if model.num_layers > model.num_moe_layers else []) + (["moe"] if model.moe else []) + ["embedding", "head"]
    found: dict[str, Source] = {}
    for kind in kinds:
        passes = {source(shape, kind, quantity, gpu.name) for quantity in ("forward_s", "backward_s")}
        found[f"{kind}_time"] = next(level for level in ("estimated", "interpolated", "measured") if level in passes)
        found[f"{kind}_activations"] = source(shape, kind, f"saved_bytes.{recompute}" if kind in ("dense", "moe") else "saved_bytes.none")
    found["gemm_efficiency"] = "measured" if gpu.gemm_profile else "estimated"
    return found
