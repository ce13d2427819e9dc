"""Memory per GPU, per pipeline stage: weights, gradients and optimizer state,
the activations of the micro batches in flight (each piece's bytes from
``layers.py``: estimated by ``activations.py`` or measured), transient
buffers and fixed framework overhead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from loom.planner.cost.activations import head_transient
from loom.planner.cost.layers import embedding_activation_bytes, head_activation_bytes, layer_activation_bytes
from loom.planner.cost.shape import Shape
from loom.planner.schedule.simulate import megatron_schedule, stage_order
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import ModelSpec
from loom.planner.specs.stages import Chunk, Stage

GiB = 1024**3
# CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's first
# blocks: what a PyTorch process holds on a GPU before the model is built.
CUDA_CONTEXT_BYTES = int(1.0 * GiB)
# NCCL's per-communicator buffers (channels x peers x 4 MiB by default, NCCL_BUFFSIZE).
NCCL_COMMUNICATOR_BYTES = int(0.25 * GiB)
# The caching allocator cannot reuse every freed block: fragmentation costs a
# few percent of the memory that is allocated and freed every micro batch.
ALLOCATOR_SLACK_FRACTION = 0.05
# Bytes per parameter in mixed-precision Adam (Rajbhandari et al. 2020, ZeRO, sec. 3.1):
WEIGHT_BYTES = 2  # 16-bit weights
OPTIMIZER_BYTES = 12  # fp32 master weights + Adam m and v
# Megatron accumulates and reduces gradients in an fp32 "main_grad" buffer
# (Megatron-LM docs, distributed optimizer table: 18 bytes/param without, 6 + 12/d
# with the distributed optimizer); DeepSpeed keeps 16-bit gradients (16 bytes/param).
GRAD_BYTES = {"megatron": 4, "deepspeed": 2}
# Transformer Engine keeps an fp8 copy (and transpose) of each GEMM weight.
FP8_WEIGHT_CACHE_BYTES = 2
# ZeRO-3 holds up to this many gathered parameters at once (DeepSpeed's
# stage3_max_live_parameters default), in 16-bit.
ZERO3_LIVE_PARAMS = 1_000_000_000


# --- parameters and optimizer state ----------------------------------------
@dataclass(frozen=True)
class StageParams:
    """Parameters on one GPU of a stage."""

    total: float
    linear: float  # of which in GEMM weights (Transformer Engine caches them in fp8)
    expert: float  # of which routed experts: sharded and reduced over expert data parallel


def _attention_params_per_gpu(model: ModelSpec, tp: int) -> float:
    """TP splits the attention by heads; MLA's down-projections into its
    latents (and their norms) are replicated on every TP rank."""
    mla = model.mla
    if mla is None:
        return model.attention_params() / tp
    replicated = model.hidden_size * ((mla.q_lora_rank or 0) + mla.kv_lora_rank + mla.qk_rope_head_dim) + (mla.q_lora_rank or 0) + mla.kv_lora_rank
    return replicated + (model.attention_params() - replicated) / tp


@functools.cache
def _layer_params_per_gpu(model: ModelSpec, t: int, ep: int, etp: int, moe: bool) -> StageParams:
    """One decoder layer on one GPU under TP ``t``. An MoE layer holds the
    router (replicated), the shared experts (split over TP) and
    num_experts / ep routed experts, each split etp ways."""
    h = model.hidden_size
    linear = _attention_params_per_gpu(model, t)
    other = 2 * model.norm_params() + 2 * model.head_dim * model.qk_norm
    if not moe:
        return StageParams(total=linear + model.mlp_params() / t + other, linear=linear + model.mlp_params() / t, expert=0.0)
    experts = model.moe.num_experts // ep * model.moe.expert_params(h) / etp
    linear += 3 * h * model.moe.shared_ffn_hidden_size / t + experts
    return StageParams(total=linear + other + h * model.moe.num_experts, linear=linear, expert=experts)


def stage_params(model: ModelSpec, layout: Layout, stage: Stage) -> StageParams:
    """Parameters on one GPU of this stage (they depend on its chunks and the
    TP and expert degrees only, so layouts share the count)."""
    return _chunks_params(model, layout.tp, layout.ep, layout.etp, stage.chunks)


@functools.cache
def _chunks_params(model: ModelSpec, t: int, ep: int, etp: int, chunks: tuple[Chunk, ...]) -> StageParams:
    """Parameters on one GPU of the stage running ``chunks``.

    TP splits the linear layers and the vocabulary; norms and position
    embeddings are replicated. With tied embeddings and pp > 1 the last stage
    keeps its own copy of the word embeddings for the output layer (Megatron),
    and runs the multi-token prediction modules (each a 2h -> h projection and
    one more layer)."""
    stage = Stage(index=0, chunks=chunks, ranks=())
    moe_layers = sum(model.moe_layers_in(chunk.first_layer, chunk.num_layers) for chunk in chunks)
    layers = [(stage.num_layers - moe_layers, False), (moe_layers, True)]
    if stage.head and model.mtp_layers:
        layers.append((model.mtp_layers, model.moe is not None))
    pieces = [(count, _layer_params_per_gpu(model, t, ep, etp, moe)) for count, moe in layers if count]
    linear = sum(count * piece.linear for count, piece in pieces)
    expert = sum(count * piece.expert for count, piece in pieces)
    other = sum(count * (piece.total - piece.linear) for count, piece in pieces)
    word_embedding = model.vocab_size * model.hidden_size / t
    if stage.embedding:
        other += word_embedding + (model.embedding_params() - model.vocab_size * model.hidden_size)
    if stage.head:
        other += model.norm_params()
        if not model.tied_embeddings or not stage.embedding:
            linear += word_embedding
        linear += model.mtp_layers * 2 * model.hidden_size**2 / t
    if stage.vision:
        # The encoder is split over TP like the language model (its norms and
        # patch/position embeddings replicated, a small share).
        linear += model.vision.params(model.hidden_size) / t
    return StageParams(total=linear + other, linear=linear, expert=expert)


def model_state_bytes(params: StageParams, layout: Layout, framework: str) -> dict[str, float]:
    """Weights, gradients and optimizer state for ``params`` on one GPU.

    Megatron's distributed optimizer shards the optimizer state over DP (x CP),
    the experts' over expert data parallel; ZeRO-1 does the same, ZeRO-2 also
    shards gradients, ZeRO-3 also weights."""
    shards = layout.optimizer_shards
    expert_shards = layout.expert_dp if shards > 1 else 1
    dense = params.total - params.expert
    grads = dense * GRAD_BYTES[framework]
    weights = dense * WEIGHT_BYTES
    if layout.zero_stage >= 2:
        grads /= shards
    if layout.zero_stage >= 3:
        weights /= shards
    return {
        "weights": weights + params.expert * WEIGHT_BYTES,
        "gradients": grads + params.expert * GRAD_BYTES[framework],
        "optimizer_states": dense * OPTIMIZER_BYTES / shards + params.expert * OPTIMIZER_BYTES / expert_shards,
    }


# --- activations in flight ------------------------------------------------
def in_flight_chunks(layout: Layout, stage_index: int) -> int:
    """Model-chunk micro batches whose activations stage ``stage_index`` holds
    at its peak. 1F1B: pp - s (Narayanan et al. SC'21 sec. 2.2). Interleaved:
    Megatron's warm-up of (pp - s - 1) * 2 + (vpp - 1) * pp chunks plus the one
    in steady state (megatron/core/pipeline_parallel/schedules.py)."""
    total = layout.num_microbatches * layout.vpp
    if layout.pp == 1:
        return 1
    if layout.vpp == 1:
        return min(layout.pp - stage_index, total)
    warmup = (layout.pp - stage_index - 1) * 2 + (layout.vpp - 1) * layout.pp
    return min(warmup + 1, total)


# --- the whole stage --------------------------------------------------------
@dataclass(frozen=True)
class StageMemory:
    stage: int
    breakdown_bytes: dict[str, float]

    @property
    def peak_bytes(self) -> float:
        return sum(self.breakdown_bytes.values())


def process_groups(layout: Layout) -> int:
    """NCCL communicators a rank holds (tp, cp, dp, pp, embedding, model-parallel ...)."""
    degrees = [layout.tp, layout.cp, layout.dp, layout.pp, layout.dp * layout.cp]
    return sum(1 for d in degrees if d > 1) + 1


def chunk_activation_bytes(shape: Shape, layout: Layout, chunk: Chunk) -> float:
    """What one micro batch through ``chunk`` keeps until its backward."""
    activations = _chunk_layers_activation_bytes(shape, layout.recompute, chunk)
    if chunk.embedding:
        activations += embedding_activation_bytes(shape)
    if chunk.head:
        activations += head_activation_bytes(shape)
    if chunk.vision:
        vision = shape.vision()
        activations += vision.model.num_layers * layer_activation_bytes(vision, layout.recompute)
    return activations


def _chunk_layers_activation_bytes(shape: Shape, recompute: str, chunk: Chunk) -> float:
    """The decoder layers of ``chunk``, dense and MoE."""
    moe_layers = shape.model.moe_layers_in(chunk.first_layer, chunk.num_layers)
    dense = (chunk.num_layers - moe_layers) * layer_activation_bytes(shape, recompute)
    return dense + (moe_layers and moe_layers * layer_activation_bytes(shape, recompute, moe=True))


def held_activation_bytes(layout: Layout, stage_index: int, chunk_bytes: tuple[float, ...]) -> float:
    """The most bytes stage ``stage_index`` holds at once when its local
    chunk v keeps ``chunk_bytes[v]`` per micro batch from its forward to its
    backward, under the schedule Megatron-Core runs.

    Equal chunks: ``in_flight_chunks`` times one chunk. Otherwise the
    stage's op order (schedule/simulate.stage_order, Megatron's) is walked:
    a forward adds its chunk's bytes, a backward frees them. Which chunks
    are in flight repeats every pp * vpp steady-state steps and the cool-down
    only frees, so 3 * pp micro batches (warm-up < (vpp + 1) * pp chunk
    passes, plus one period) reach the peak of any longer step."""
    if len(set(chunk_bytes)) == 1:
        return in_flight_chunks(layout, stage_index) * chunk_bytes[0]
    microbatches = min(layout.num_microbatches, 3 * layout.pp)
    held = peak = 0.0
    for kind, _, local in stage_order(megatron_schedule(layout.vpp), layout.pp, layout.vpp, microbatches, stage_index):
        held += chunk_bytes[local] if kind == "F" else -chunk_bytes[local]
        peak = max(peak, held)
    return peak


def stage_memory(shape: Shape, layout: Layout, stage: Stage, framework: str) -> StageMemory:
    """Peak memory of one GPU of ``stage`` under Megatron's pipeline schedule."""
    model = shape.model
    params = stage_params(model, layout, stage)
    state = model_state_bytes(params, layout, framework)
    if shape.precision == "fp8":
        state["weights"] += params.linear * (FP8_WEIGHT_CACHE_BYTES - WEIGHT_BYTES / 2) / (
            layout.optimizer_shards if layout.zero_stage >= 3 else 1
        )

    chunks = in_flight_chunks(layout, stage.index)
    # Micro batches (not chunks) in flight on this stage: the embedding and
    # head chunks are one of vpp, so they hold 1/vpp of the chunk count.
    microbatches = max(1, -(-chunks // layout.vpp))
    layers = tuple(_chunk_layers_activation_bytes(shape, layout.recompute, chunk) for chunk in stage.chunks)
    activations = held_activation_bytes(layout, stage.index, layers)
    if stage.embedding:
        activations += microbatches * embedding_activation_bytes(shape)
    if stage.head:
        activations += head_activation_bytes(shape)
    if stage.vision:
        vision = shape.vision()
        activations += microbatches * vision.model.num_layers * layer_activation_bytes(vision, layout.recompute)

    transient = head_transient(shape) if stage.head else 0.0
    if layout.recompute == "full":
        # Backward re-runs one layer's forward and holds all its activations.
        transient = max(transient, layer_activation_bytes(shape, recompute="none", moe=shape.model.moe is not None))
    if layout.zero_stage >= 3:
        transient += min(ZERO3_LIVE_PARAMS, params.total * layout.optimizer_shards) * WEIGHT_BYTES
    framework_bytes = CUDA_CONTEXT_BYTES + NCCL_COMMUNICATOR_BYTES * process_groups(layout)
    framework_bytes += ALLOCATOR_SLACK_FRACTION * (activations + transient)
    return StageMemory(
        stage=stage.index,
        breakdown_bytes={**state, "activations": activations, "transient": transient, "framework": framework_bytes},
    )
