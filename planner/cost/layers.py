"""What the time and memory models read for each piece of the model, per
micro batch on one GPU: a decoder layer (dense or MoE), the embedding, the
LM head + loss, multi-token prediction and a vision tower. Each is loom's
estimate (``compute.py`` for time, ``activations.py`` for bytes kept for
backward), or, where the job's ``--profile`` covers the piece, the measured
figure (``measured.py``). This is the one place where measurements meet
estimates.

``shape_of(job, layout)`` gives the shape every cost is a function of, with
the job's layers profile resolved (once per job) onto it.
"""

from __future__ import annotations

from functools import cache

from loom.planner.cost import activations, compute, host
from loom.planner.cost.compute import PassTime
from loom.planner.cost.measured import Estimates, MeasuredLayers, Source, resolve
from loom.planner.cost.shape import Shape
from loom.planner.specs.job import Features, Job, LayerProfile
from loom.planner.specs.layout import DEFAULT_RECOMPUTE_MODULES, Layout
from loom.planner.specs.model import ModelSpec
from loom.profiles.catalogue import GPU

RECOMPUTE = ("none", "selective", "full")


def shape_of(job: Job, layout: Layout) -> Shape:
    """One micro batch of ``layout`` for ``job``, with its measured layers."""
    measured = None
    if job.layer_profile is not None:
        gpu = next(node.gpu for node in job.cluster.nodes if node.gpu.name == job.layer_profile.document.gpu)
        measured = _resolved(job.layer_profile, job.model, job.precision, job.features, gpu)
    return Shape.of(job.model, layout, job.seq_length, job.precision, job.features, measured)


@cache
def _resolved(profile: LayerProfile, model: ModelSpec, precision: str, features: Features, gpu: GPU) -> MeasuredLayers | None:
    like = Shape(model, tp=1, cp=1, micro_batch_size=1, sequence_parallel=False, seq_length=1, precision=precision, features=features)
    return resolve(profile, like, _estimates(gpu))


def _estimates(gpu: GPU) -> Estimates:
    """Every quantity a layers profile measures, as loom estimates it."""
    times = {
        "dense": lambda s, backward: compute.decoder_layer(s, gpu, backward),
        "moe": lambda s, backward: compute.decoder_layer(s, gpu, backward, kind="moe"),
        "embedding": lambda s, backward: compute.embedding(s, gpu, backward),
        "head": lambda s, backward: compute.head(s, gpu, backward),
    }
    found: Estimates = {}
    for kind, time in times.items():
        found[(kind, "forward_s")] = lambda s, time=time: time(s, False).total_s
        found[(kind, "backward_s")] = lambda s, time=time: time(s, True).total_s
    for recompute in RECOMPUTE:
        found[("dense", f"saved_bytes.{recompute}")] = lambda s, r=recompute: activations.decoder_layer(s, r)
        found[("moe", f"saved_bytes.{recompute}")] = lambda s, r=recompute: activations.decoder_layer(s, r, kind="moe")
    found[("embedding", "saved_bytes.none")] = activations.embedding
    found[("head", "saved_bytes.none")] = activations.head
    return found


# --- time ---------------------------------------------------------------------
# The pieces a layers profile measures (profiles/layers.py KINDS): transformer
# layers, not a hybrid model's one-sublayer layers, which stay estimated.
MEASURABLE = ("dense", "moe", "embedding", "head")


def _timed(shape: Shape, gpu: GPU, kind: str, backward: bool, estimated: PassTime) -> PassTime:
    """The estimate's split by kernel kind, scaled to the measured (or
    interpolated) total when the profile covers ``kind``."""
    if shape.measured is None or not estimated.total_s or kind not in MEASURABLE:
        return estimated
    total_s = shape.measured.value(kind, "backward_s" if backward else "forward_s", shape, estimated.total_s, gpu.name)
    return estimated.scaled(total_s / estimated.total_s)


@cache
def decoder_layer(shape: Shape, gpu: GPU, backward: bool = False, kind: str = "dense") -> PassTime:
    """One decoder layer of ``kind`` (a SUBLAYERS key), one micro batch, one pass."""
    return _timed(shape, gpu, kind, backward, compute.decoder_layer(shape, gpu, backward, kind))


def layer_host_s(shape: Shape, gpu: GPU, kind: str = "dense", backward: bool = False) -> float:
    """Host time to issue one decoder layer's kernels (host.py), or none
    where the layer's time is measured: a measured time already includes any
    wait for the host."""
    quantity = "backward_s" if backward else "forward_s"
    if shape.measured is not None and kind in MEASURABLE and shape.measured.source(kind, quantity, shape, gpu.name) != "estimated":
        return 0.0
    return host.layer_host_s(shape, gpu, kind, backward)


@cache
def embedding(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    return _timed(shape, gpu, "embedding", backward, compute.embedding(shape, gpu, backward))


@cache
def head(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    return _timed(shape, gpu, "head", backward, compute.head(shape, gpu, backward))


@cache
def mtp(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """DeepSeek-V3's multi-token prediction modules: each its 2h -> h
    projection, one more layer (MoE when the model is) and the shared output
    layer and loss again."""
    one = compute.mtp_projection(shape, gpu, backward)
    one = one + decoder_layer(shape, gpu, backward, "moe" if shape.model.moe is not None else "dense") + head(shape, gpu, backward)
    return one.scaled(shape.model.mtp_layers)


@cache
def vision_tower(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """The ViT's layers on the patches, then the projector into the
    language model's width (LLaVA)."""
    encoder = shape.vision()
    return decoder_layer(encoder, gpu, backward).scaled(encoder.model.num_layers) + compute.vision_projector(shape, gpu, backward)


# --- bytes kept for backward ----------------------------------------------------
def _saved(shape: Shape, kind: str, recompute: str, estimated: float) -> float:
    if shape.measured is None or kind not in MEASURABLE:
        return estimated
    return shape.measured.value(kind, f"saved_bytes.{recompute}", shape, estimated)


@cache
def layer_activation_bytes(shape: Shape, recompute: str, kind: str = "dense", modules: tuple[str, ...] = DEFAULT_RECOMPUTE_MODULES) -> float:
    """Bytes one decoder layer of ``kind`` keeps for backward, per micro
    batch, per GPU, under ``recompute`` (and, for selective, the ``modules``
    it re-runs). A layers profile measured selective recompute of the
    attention core only: other module sets keep the estimate."""
    estimate = activations.decoder_layer(shape, recompute, kind, modules)
    if recompute == "selective" and modules != DEFAULT_RECOMPUTE_MODULES:
        return estimate
    return _saved(shape, kind, recompute, estimate)


def embedding_activation_bytes(shape: Shape) -> float:
    return _saved(shape, "embedding", "none", activations.embedding(shape))


def head_activation_bytes(shape: Shape) -> float:
    return _saved(shape, "head", "none", activations.head(shape))


def sources(shape: Shape, gpu: GPU, recompute: str) -> dict[str, Source]:
    """Which of a plan's per-layer figures are measured, interpolated or
    estimated (plan.json's ``sources``)."""
    model, measured = shape.model, shape.measured
    kinds = [*model.layer_kinds, "embedding", "head"]
    found: dict[str, Source] = {}
    for kind in kinds:
        if measured is None or kind not in MEASURABLE:
            found[f"{kind}_time"] = found[f"{kind}_activations"] = "estimated"
            continue
        passes = {measured.source(kind, quantity, shape, gpu.name) for quantity in ("forward_s", "backward_s")}
        found[f"{kind}_time"] = next(level for level in ("estimated", "interpolated", "measured") if level in passes)
        found[f"{kind}_activations"] = measured.source(kind, f"saved_bytes.{recompute}" if kind in ("dense", "moe") else "saved_bytes.none", shape)
    found["gemm_efficiency"] = "measured" if gpu.gemm_profile else "estimated"
    if gpu.calibration:  # every kernel rate scaled to what real runs measured (loom calibrate)
        found["kernel_rates"] = "measured"
    return found
