"""A layers profile (``loom profile layers``, ``--profile``) resolved once for
a job into corrections of the estimates: ``MeasuredLayers``.

A profile holds each layer kind's forward and backward time and its bytes
kept for backward at the shapes it measured. Resolving it evaluates loom's
own estimate at each of those shapes (with the job's model, precision and
features) and keeps measured / estimate per entry and quantity. Then, for
any shape the planner prices:

- at a measured shape the measured number stands ("measured");
- elsewhere the estimate at that shape is multiplied by the ratio of the
  nearest measured shapes ("interpolated"): interpolated linearly in
  log(tokens) between the entries with the same parallel structure (TP,
  sequence parallelism, EP; else the nearest TP) and held constant beyond
  them, while the estimate carries how the cost moves with the shape
  (context parallelism, longer sequences);
- a kind the profile lacks keeps the estimate ("estimated").

Times hold only on the GPU and precision measured; saved bytes on any GPU. A
profile does not describe attention without flash (it measured SDPA): then
nothing is resolved. ``layers.py`` is where the corrections meet the estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Literal

import numpy as np

from loom.planner.cost.shape import Shape
from loom.planner.specs.job import LayerProfile
from loom.profiles.layer_profile import LayerEntry

Source = Literal["measured", "interpolated", "estimated"]
TIMES = ("forward_s", "backward_s")


@dataclass(frozen=True)
class Point:
    """One profiled shape of one layer kind: its measured value of one
    quantity and that value over loom's estimate at the same shape."""

    entry: LayerEntry
    measured: float
    ratio: float | None  # None where the estimate is 0 (nothing to scale)


@dataclass(frozen=True, eq=False)
class MeasuredLayers:
    """A profile resolved for one job (identity is equality, so Shapes that
    carry it stay hashable and their costs cacheable). ``points`` maps
    (layer kind, quantity) to the profiled shapes that measured it;
    quantities are ``forward_s``, ``backward_s`` and ``saved_bytes.<recompute>``."""

    path: str
    gpu: str  # the catalogue GPU the times were measured on
    points: dict[tuple[str, str], tuple[Point, ...]]

    def _points(self, kind: str, quantity: str, gpu_name: str | None) -> tuple[Point, ...]:
        if gpu_name is not None and gpu_name != self.gpu:
            return ()  # times hold on the GPU measured
        return self.points.get((kind, quantity), ())

    def source(self, kind: str, quantity: str, shape: Shape, gpu_name: str | None = None) -> Source:
        points = self._points(kind, quantity, gpu_name)
        if not points:
            return "estimated"
        return "measured" if any(_matches(point.entry, shape) for point in points) else "interpolated"

    def value(self, kind: str, quantity: str, shape: Shape, estimate: float, gpu_name: str | None = None) -> float:
        """``quantity`` of one ``kind`` layer at ``shape`` whose estimate is
        ``estimate``: measured, interpolated or estimated (module docstring).
        ``gpu_name`` is given for times."""
        points = self._points(kind, quantity, gpu_name)
        if not points:
            return estimate
        for point in points:
            if _matches(point.entry, shape):
                return point.measured
        nearest = min(_structure_distance(point.entry, shape) for point in points)
        ratios: dict[float, list[float]] = {}
        for point in points:
            if point.ratio is not None and _structure_distance(point.entry, shape) == nearest:
                ratios.setdefault(math.log(point.entry.dims.tokens), []).append(point.ratio)
        if not ratios:
            return estimate
        xs = sorted(ratios)
        ys = [float(np.mean(ratios[x])) for x in xs]
        tokens = shape.micro_batch_size * shape.seq_length
        return estimate * float(np.interp(math.log(tokens), xs, ys))


# (layer kind, quantity) -> loom's estimate of it at a shape (layers.py).
Estimates = dict[tuple[str, str], Callable[[Shape], float]]


def resolve(profile: LayerProfile, like: Shape, estimates: Estimates) -> MeasuredLayers | None:
    """``profile`` resolved for shapes like ``like`` (the job's model,
    precision and features): per entry and quantity, the measured value and
    its ratio to ``estimates`` at the entry's shape. Times are kept only when
    the job's precision is the one profiled; nothing when the job's attention
    is not flash attention, which the profile did not measure."""
    document = profile.document
    if not like.features.flash_attention:
        return None
    points: dict[tuple[str, str], list[Point]] = {}
    for entry in document.entries:
        entry_shape = _entry_shape(entry, like)
        for quantity in _quantities(entry, keep_times=like.precision == document.dtype):
            if (entry.kind, quantity) not in estimates:
                continue  # e.g. the embedding's bytes under recompute: the planner reads its "none" figure
            measured = _quantity(entry, quantity)
            estimated = estimates[(entry.kind, quantity)](entry_shape)
            points.setdefault((entry.kind, quantity), []).append(Point(entry, measured, measured / estimated if estimated > 0 else None))
    return MeasuredLayers(profile.path, document.gpu, {key: tuple(value) for key, value in points.items()})


def _quantities(entry: LayerEntry, keep_times: bool) -> list[str]:
    saved = [f"saved_bytes.{recompute}" for recompute in entry.saved_bytes]
    return [*(TIMES if keep_times else ()), *saved]


def _quantity(entry: LayerEntry, quantity: str) -> float:
    """``forward_s``, ``backward_s`` or ``saved_bytes.<recompute>`` of an entry."""
    if quantity == "forward_s":
        return entry.forward.median_s
    if quantity == "backward_s":
        return entry.backward.median_s
    return entry.saved_bytes[quantity.removeprefix("saved_bytes.")]


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
                   sequence_parallel=entry.sequence_parallel, ep=entry.ep, etp=entry.etp, measured=None)
