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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import pydantic

from loom.planner.specs.errors import SpecError
from loom.planner.specs.model import ModelSpec
from loom.planner.specs.files import StrictModel, read_json, validate

SCHEMA_FILES = {"layers": Path(__file__).with_name("layers.schema.json"), "gemm": Path(__file__).with_name("gemm.schema.json")}

Seconds = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, pydantic.Field(gt=0)]
Dtype = Literal["bf16", "fp16"]
Recompute = Literal["none", "selective", "full"]


class Spread(StrictModel):
    median_s: Seconds
    min_s: Seconds
    max_s: Seconds


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
    saved_bytes: dict[Recompute, Annotated[int, pydantic.Field(ge=0)]] = pydantic.Field(
        description="bytes kept for backward per micro batch, once per storage, weights excluded")
    estimated_saved_bytes: dict[Recompute, float] = pydantic.Field(description="loom's memory estimator for the same layer")
    peak_bytes: Optional[int] = pydantic.Field(description="CUDA allocator peak over forward + backward; null on CPU")


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
    dropout: float
    qk_norm: bool
    num_experts: Optional[Count] = None
    moe_top_k: Optional[Count] = None
    expert_ffn_hidden_size: Optional[Count] = None
    shared_ffn_hidden_size: Optional[int] = None

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


class GemmPoint(StrictModel):
    m: Count
    n: Count
    k: Count
    time: Spread
    tflops: Seconds = pydantic.Field(description="2mnk / median time / 1e12")


class GemmFit(StrictModel):
    """planner/cost/efficiency.py's curve, fitted: rate = peak x gemm_efficiency x
    k / (k + k_overhead) x tile utilisation."""

    peak_tflops: Seconds = pydantic.Field(description="the catalogue GPU's dense peak at this dtype")
    gemm_efficiency: Seconds
    k_overhead: Annotated[float, pydantic.Field(ge=0)]
    rms_log_error: Annotated[float, pydantic.Field(ge=0)] = pydantic.Field(description="of the fitted times, natural log")


class GemmDocument(Measured):
    schema_version: Literal[1]
    kind: Literal["gemm"]
    points: list[GemmPoint] = pydantic.Field(min_length=2)
    fit: GemmFit


Document = LayersDocument | GemmDocument


def document_json(document: Document) -> str:
    return json.dumps(document.model_dump(mode="json"), indent=1) + "\n"


def read_profile(path: Path) -> Document:
    """A layers or gemm profile, validated; errors name the file and field."""
    data = read_json(path, "profile JSON (loom profile layers or loom profile gemm)")
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in SCHEMA_FILES:
        raise SpecError(str(path), "kind", "layers or gemm (a profile from loom profile layers or loom profile gemm)", kind)
    return validate(LayersDocument if kind == "layers" else GemmDocument, data, str(path))


def schema_json(kind: str) -> str:
    document = LayersDocument if kind == "layers" else GemmDocument
    return json.dumps(document.model_json_schema(), indent=1) + "\n"


if __name__ == "__main__":
    for kind, path in SCHEMA_FILES.items():
        path.write_text(schema_json(kind))
