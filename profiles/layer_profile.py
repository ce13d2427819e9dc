"""The compute profile files: what ``loom profile layers`` and ``loom profile
gemm`` write and ``--profile`` reads. No torch here: the planner reads files.

- ``kind: layers``: per layer kind (dense or MoE decoder layer, embedding,
  LM head + loss) and shape, the measured forward and backward time and the
  bytes kept for backward per recompute mode, beside what loom's estimator
  says for the same layer.
- ``kind: gemm``: measured matmul times over a transformer's GEMM shapes, and
  the efficiency curve fitted to them (``gemm_efficiency`` and
  ``k_overhead`` of planner/cost/efficiency.py) for the GPU named in ``gpu``.

Both carry ``schema_version`` 1, the catalogue GPU the numbers stand for, the
device they were taken on, the dtype and the torch version. The pydantic
models are the single definition; ``layers.schema.json`` and
``gemm.schema.json`` beside this module are generated from them (``python -m
loom.profiles.layer_profile``; a test keeps them in sync).

Reading a profile back (``read_profile``) checks what the numbers mean, not
only their types: times are finite and positive with min <= median <= max,
bytes are finite and non-negative, a GEMM's ``tflops`` is its 2mnk over its
median time, no GEMM ran faster than the named GPU's peak allows, the fit's
peak is that GPU's and its ``gemm_efficiency`` lies in (0, 1]. A profile
that breaks any of them is refused (exit 2, naming the file and the field).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal, Optional

import pydantic

from loom.planner.specs.errors import SpecError
from loom.planner.specs.model import ModelSpec
from loom.planner.specs.files import StrictModel, rate, read_json, validate
from loom.profiles.catalogue import GPU, find_gpu

SCHEMA_FILES = {"layers": Path(__file__).with_name("layers.schema.json"), "gemm": Path(__file__).with_name("gemm.schema.json")}

Positive = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
Seconds = Positive
NonNegative = Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, pydantic.Field(gt=0)]
Bytes = Annotated[int, pydantic.Field(ge=0)]
Dtype = Literal["bf16", "fp16"]
Recompute = Literal["none", "selective", "full"]

# How far above the catalogue's dense peak a measured GEMM may run before the
# profile is taken to come from another GPU than it names. Datasheet peaks
# assume a boost clock the GPU may exceed when cool: H100 SXM's 989 TFLOP/s
# is 132 SMs x 4,096 bf16 FLOP/clock at 1.83 GHz, and it boosts to 1.98 GHz
# (+8%); the rest covers timer resolution on the shortest GEMMs.
PEAK_TOLERANCE = 0.10
# How closely a figure the profiler derives must match what it derives from
# when read back: a point's ``tflops`` (2mnk / median time / 1e12) and the
# fit's ``peak_tflops`` (the catalogue's). JSON keeps Python's floats
# exactly; this allows a hand edit to 6 digits.
DERIVED_RELATIVE_TOLERANCE = 1e-6


class Spread(StrictModel):
    median_s: Seconds
    min_s: Seconds
    max_s: Seconds

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> Spread:
        if not self.min_s <= self.median_s <= self.max_s:
            raise ValueError("min_s <= median_s <= max_s")
        return self


class RankDims(StrictModel):
    """The per-rank sizes the layer was built with."""

    tokens: Count = pydantic.Field(description="micro_batch_size x seq_length: the GEMMs' rows")
    local_tokens: Count = pydantic.Field(description="rows of the residual stream (tokens / tp with sequence parallelism)")
    hidden_size: Count
    heads: Count
    query_groups: Count
    head_dim: Count
    ffn_hidden_size: Count = pydantic.Field(description="dense MLP width / tp")
    vocab_size: Count = pydantic.Field(description="vocabulary / tp")
    local_experts: Optional[Count] = pydantic.Field(description="num_experts / ep (MoE models)")
    expert_ffn_hidden_size: Optional[Count] = pydantic.Field(description="expert width / etp (MoE models)")


class LayerEntry(StrictModel):
    kind: Literal["dense", "moe", "embedding", "head"]
    tp: Count
    ep: Count
    etp: Count
    micro_batch_size: Count
    seq_length: Count
    sequence_parallel: bool
    dims: RankDims
    forward: Spread = pydantic.Field(description="one forward pass, no recompute")
    backward: Spread = pydantic.Field(description="one backward pass, no recompute")
    estimated_forward_s: Seconds = pydantic.Field(description="loom's time model for the same pass on the catalogue gpu")
    estimated_backward_s: Seconds
    saved_bytes: dict[Recompute, Bytes] = pydantic.Field(
        description="bytes kept for backward per micro batch, once per storage, weights excluded")
    estimated_saved_bytes: dict[Recompute, NonNegative] = pydantic.Field(description="loom's memory estimator for the same layer")
    peak_bytes: Optional[Bytes] = pydantic.Field(description="CUDA allocator peak over forward + backward; null on CPU")


class ModelDims(StrictModel):
    """What fixes a layer's cost: a profile applies to any model with these
    (the layer count and the name do not matter)."""

    name: str
    hidden_size: Count
    num_attention_heads: Count
    num_query_groups: Count
    head_dim: Count
    ffn_hidden_size: Count
    vocab_size: Count
    gated_mlp: bool
    normalization: str
    learned_position_embeddings: bool
    dropout: Annotated[float, pydantic.Field(ge=0, lt=1, allow_inf_nan=False)]
    qk_norm: bool
    num_experts: Optional[Count] = None
    moe_top_k: Optional[Count] = None
    expert_ffn_hidden_size: Optional[Count] = None
    shared_ffn_hidden_size: Optional[Annotated[int, pydantic.Field(ge=0)]] = None

    @classmethod
    def of(cls, model: ModelSpec) -> ModelDims:
        moe = model.moe
        return cls(
            name=model.name, hidden_size=model.hidden_size, num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups, head_dim=model.head_dim, ffn_hidden_size=model.ffn_hidden_size,
            vocab_size=model.vocab_size, gated_mlp=model.gated_mlp, normalization=model.normalization,
            learned_position_embeddings=model.learned_position_embeddings, dropout=model.dropout, qk_norm=model.qk_norm,
            num_experts=moe and moe.num_experts, moe_top_k=moe and moe.top_k,
            expert_ffn_hidden_size=moe and moe.expert_ffn_hidden_size, shared_ffn_hidden_size=moe and moe.shared_ffn_hidden_size,
        )


class Measured(StrictModel):
    """Where and how the numbers were taken."""

    gpu: str = pydantic.Field(description="catalogue GPU the numbers stand for (the planner applies them to its nodes)")
    device: str = pydantic.Field(description="torch.cuda.get_device_name(), or cpu")
    dtype: Dtype
    torch_version: str
    repeats: Count = pydantic.Field(description="timed runs per measurement")
    warmup: Annotated[int, pydantic.Field(ge=0)] = pydantic.Field(description="untimed runs before them")


class LayersDocument(Measured):
    schema_version: Literal[1]
    kind: Literal["layers"]
    model: ModelDims
    entries: list[LayerEntry] = pydantic.Field(min_length=1)


def _check_entries(document: LayersDocument, source: str) -> None:
    """Each entry's per-rank sizes are the model's split as its own tp, ep,
    etp, micro batch and sequence say (profiles/layers.py rank_dims), and no
    shape is measured twice: a profile cannot claim one model and time
    another. Raises SpecError naming the first entry's field that is off."""
    m, seen = document.model, {}
    for i, entry in enumerate(document.entries):
        t, tokens = entry.tp, entry.micro_batch_size * entry.seq_length
        expected = {
            "tokens": tokens, "local_tokens": tokens // t if entry.sequence_parallel else tokens, "hidden_size": m.hidden_size,
            "heads": m.num_attention_heads // t, "query_groups": m.num_query_groups // t, "head_dim": m.head_dim,
            "ffn_hidden_size": m.ffn_hidden_size // t, "vocab_size": m.vocab_size // t,
            "local_experts": m.num_experts // entry.ep if m.num_experts else None,
            "expert_ffn_hidden_size": m.expert_ffn_hidden_size // entry.etp if m.expert_ffn_hidden_size else None,
        }
        for field, value in expected.items():
            if getattr(entry.dims, field) != value:
                raise SpecError(source, f"entries.{i}.dims.{field}", f"{value}, the model's size split by the entry's own parallel sizes",
                                getattr(entry.dims, field))
        key = (entry.kind, entry.tp, entry.ep, entry.etp, entry.micro_batch_size, entry.seq_length, entry.sequence_parallel)
        if key in seen:
            raise SpecError(source, f"entries.{i}", f"each shape measured once (entries.{seen[key]} has the same kind and shape)")
        seen[key] = i


def gemm_tflops(m: int, n: int, k: int, seconds: float) -> float:
    """TFLOP/s of an (m x k) @ (k x n) GEMM that took ``seconds``: 2mnk / seconds / 1e12."""
    return 2.0 * m * n * k / seconds / 1e12


class GemmPoint(StrictModel):
    m: Count
    n: Count
    k: Count
    time: Spread
    tflops: Positive = pydantic.Field(description="2mnk / median time / 1e12")

    @property
    def achieved_tflops(self) -> float:
        """What the median time says the GEMM ran at, TFLOP/s."""
        return gemm_tflops(self.m, self.n, self.k, self.time.median_s)

    @pydantic.model_validator(mode="after")
    def _rate_matches_time(self) -> GemmPoint:
        if not math.isclose(self.tflops, self.achieved_tflops, rel_tol=DERIVED_RELATIVE_TOLERANCE):
            raise ValueError(f"tflops = 2mnk / time.median_s / 1e12 = {self.achieved_tflops:.6g}")
        return self


class GemmFit(StrictModel):
    """planner/cost/efficiency.py's curve, fitted: rate = peak x gemm_efficiency x
    k / (k + k_overhead) x tile utilisation."""

    peak_tflops: Positive = pydantic.Field(description="the catalogue GPU's dense peak at this dtype")
    gemm_efficiency: rate(1.0) = pydantic.Field(description="fraction of peak a long-K, well-tiled GEMM sustains: in (0, 1]")
    k_overhead: NonNegative
    rms_log_error: NonNegative = pydantic.Field(description="of the fitted times, natural log")


class GemmDocument(Measured):
    schema_version: Literal[1]
    kind: Literal["gemm"]
    points: list[GemmPoint] = pydantic.Field(min_length=2)
    fit: GemmFit


Document = LayersDocument | GemmDocument


def document_json(document: Document) -> str:
    return json.dumps(document.model_dump(mode="json"), indent=1) + "\n"


def read_profile(path: Path) -> Document:
    """A layers or gemm profile, validated (the module docstring lists what
    is checked beyond types).

    Raises SpecError naming ``path`` and the first wrong field: malformed
    JSON, an unknown kind or schema_version, a GPU not in the catalogue or
    without the profile's dtype, impossible numbers."""
    data = read_json(path, "profile JSON (loom profile layers or loom profile gemm)")
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in SCHEMA_FILES:
        raise SpecError(str(path), "kind", "layers or gemm (a profile from loom profile layers or loom profile gemm)", kind)
    document = validate(LayersDocument if kind == "layers" else GemmDocument, data, str(path))
    gpu = find_gpu(document.gpu, str(path), "gpu")
    if not gpu.supports(document.dtype):
        raise SpecError(str(path), "dtype", f"a precision {gpu.name} supports", document.dtype)
    if isinstance(document, GemmDocument):
        _check_gemm_rates(document, gpu, str(path))
    else:
        _check_entries(document, str(path))
        _check_layer_rates(document, gpu, str(path))
    return document


def _check_layer_rates(document: LayersDocument, gpu: GPU, source: str) -> None:
    """No layer ran faster than ``gpu``'s peak allows. loom's estimate of
    the same pass (estimated_*_s) runs each kernel at a fraction of peak
    (gemm_efficiency, attention_efficiency); at full peak none could take
    less than the smallest of those fractions of it (PEAK_TOLERANCE spared):
    a time below was measured on another GPU, or made up."""
    lowest = min(filter(None, (gpu.gemm_efficiency.get(document.dtype), gpu.attention_efficiency, gpu.flash2_attention_efficiency)))
    for i, entry in enumerate(document.entries):
        for pass_, estimated_s in (("forward", entry.estimated_forward_s), ("backward", entry.estimated_backward_s)):
            floor_s = estimated_s * lowest / (1 + PEAK_TOLERANCE)
            if getattr(entry, pass_).median_s < floor_s:
                raise SpecError(source, f"entries.{i}.{pass_}.median_s", f"a time the {gpu.name} can reach: at least {floor_s:.3g} s, its "
                                f"peak rates on loom's estimate of {estimated_s:.3g} s; was it measured on another GPU?",
                                getattr(entry, pass_).median_s)


def first_above_peak(points: list[GemmPoint], peak_tflops: float) -> int | None:
    """The index of the first point that ran faster than ``peak_tflops`` (TFLOP/s)
    x (1 + PEAK_TOLERANCE), or None: such a point was not measured on a GPU
    with that peak."""
    return next((i for i, point in enumerate(points) if point.achieved_tflops > peak_tflops * (1 + PEAK_TOLERANCE)), None)


def _check_gemm_rates(document: GemmDocument, gpu: GPU, source: str) -> None:
    """The fit's peak is ``gpu``'s at the profile's dtype, and no point beat it."""
    peak_tflops = gpu.peak_flops(document.dtype) / 1e12
    if not math.isclose(document.fit.peak_tflops, peak_tflops, rel_tol=DERIVED_RELATIVE_TOLERANCE):
        raise SpecError(source, "fit.peak_tflops", f"{peak_tflops:g}, {gpu.name}'s {document.dtype} dense peak in loom's catalogue "
                        "(gemm_efficiency is a fraction of it; re-run loom profile gemm)", document.fit.peak_tflops)
    index = first_above_peak(document.points, peak_tflops)
    if index is not None:
        point = document.points[index]
        raise SpecError(source, f"points.{index}.time.median_s", f"a time the {gpu.name} can reach: {point.m}x{point.n}x{point.k} in "
                        f"{point.time.median_s:.3g} s is {point.achieved_tflops:.4g} TFLOP/s, above its {document.dtype} peak of "
                        f"{peak_tflops:g} (+{PEAK_TOLERANCE:.0%}); was it measured on another GPU?", point.time.median_s)


def schema_json(kind: str) -> str:
    document = LayersDocument if kind == "layers" else GemmDocument
    return json.dumps(document.model_json_schema(), indent=1) + "\n"


if __name__ == "__main__":
    for kind, path in SCHEMA_FILES.items():
        path.write_text(schema_json(kind))
