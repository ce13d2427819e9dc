"""Memory per GPU, per pipeline stage: weights, gradients and optimizer state,
the activations of the micro batches in flight, transient buffers and fixed
framework overhead.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models" (sec. 4), generalised tensor by tensor so that
GQA, gated MLPs, models without dropout, flash attention and context
parallelism fall out of the same count: with GPT-3's shapes it reduces to the
paper's sbh(10 + 24/t + 5as/(ht)) without and 34sbh/t with sequence parallelism.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from loom.planner.compute import ACT_BYTES, Shape
from loom.planner.layout import Layout
from loom.planner.measured import calibrated
from loom.planner.model import ModelSpec
from loom.planner.stages import Chunk, Stage

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
# Megatron's cross-entropy keeps the softmax of the logits in fp32.
LOGIT_SOFTMAX_BYTES = 4


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


# --- activations ------------------------------------------------------------
@functools.cache
def layer_activation_bytes(shape: Shape, recompute: str, moe: bool = False) -> float:
    """Bytes one decoder layer keeps for backward, per micro batch, per GPU:
    measured (``--profile``) or estimated."""
    kind = "moe" if moe else "dense"
    return calibrated(shape, kind, f"saved_bytes.{recompute}", lambda s: _layer_activation_estimate(s, recompute, moe))


def _layer_activation_estimate(shape: Shape, recompute: str, moe: bool) -> float:
    """Korthikanti et al.'s count, tensor by tensor (``loom profile layers``
    measures the same tensors in a PyTorch layer; its test checks the two agree)."""
    m, t, T, e = shape.model, shape.tp, shape.tokens, ACT_BYTES
    q, kv, v = m.q_size, m.kv_size, m.v_size
    if recompute == "full":
        # Only each layer's input is checkpointed (scattered over TP with SP).
        return e * T * shape.replicated_width
    masks = 2 if m.dropout else 0  # 1-byte dropout masks after attention and MLP
    # Norm inputs and outputs (the QKV and MLP inputs) plus the masks: on every
    # TP rank, or split t ways with sequence parallelism.
    replicated = (4 * e + masks) * T * shape.replicated_width
    # Q, K, V and the projection's input, split over TP; MLA also keeps its
    # query and key/value latents, replicated.
    split = e * (q + kv + v + m.attention_output_size) * T / t
    if not m.learned_position_embeddings and m.mla is None:
        # Rotary embedding writes new Q and K, but V stays a view into the
        # fused QKV GEMM's output (torch.split in megatron-core's
        # get_query_key_value_tensors) and keeps all of it alive: Q and K
        # are held twice (measured by `loom profile layers`).
        split += e * (q + kv) * T / t
    if m.mla:
        replicated += e * T * ((m.mla.q_lora_rank or 0) + m.mla.kv_lora_rank + m.mla.qk_rope_head_dim)
    split += _mlp_activation_bytes(shape, moe)
    heads_per_rank = m.num_attention_heads / t
    scores = shape.micro_batch_size * heads_per_rank * (shape.seq_length / shape.cp) * shape.seq_length
    if recompute == "selective":
        attention = 0.0  # the core attention is recomputed from Q, K, V (Korthikanti sec. 5)
    elif shape.features.flash_attention:
        # Flash attention keeps only the fp32 log-sum-exp per query row.
        attention = 4 * shape.micro_batch_size * heads_per_rank * shape.seq_length / shape.cp
    else:
        attention = (e + (1 + e if m.dropout else 0)) * scores  # softmax, dropout mask and output
    return replicated + split + attention


def _mlp_activation_bytes(shape: Shape, moe: bool) -> float:
    """The MLP's up-projection outputs and activation output, split over TP
    (SwiGLU keeps gate, up and their product). An MoE layer keeps the same for
    its shared experts, and for every routed copy of a token its permuted
    input and its expert's outputs, plus the router's fp32 logits and
    probabilities (megatron-core's MoE layer and alltoall dispatcher)."""
    m, T, e = shape.model, shape.tokens, ACT_BYTES
    per_width = (3 if m.gated_mlp else 2) * e
    if not moe:
        return per_width * m.ffn_hidden_size * T / shape.tp
    routed = shape.moe_tokens * m.moe.top_k * shape.etp
    experts = routed * (e * m.hidden_size + per_width * m.moe.expert_ffn_hidden_size / shape.etp)
    router = 2 * 4 * shape.moe_tokens * m.moe.num_experts
    return per_width * m.moe.shared_ffn_hidden_size * T / shape.tp + experts + router


def embedding_activation_bytes(shape: Shape) -> float:
    return calibrated(shape, "embedding", "saved_bytes.none", _embedding_activation_estimate)


def _embedding_activation_estimate(shape: Shape) -> float:
    """The embedding's dropout mask (its output is the first layer's input)."""
    return (shape.tokens * shape.replicated_width) if shape.model.dropout else 0.0


def head_activation_bytes(shape: Shape) -> float:
    return calibrated(shape, "head", "saved_bytes.none", _head_activation_estimate)


def _head_activation_estimate(shape: Shape) -> float:
    """Final norm input and output-layer input, plus the fp32 softmax the loss keeps."""
    m, T = shape.model, shape.tokens
    return 2 * ACT_BYTES * T * shape.replicated_width + LOGIT_SOFTMAX_BYTES * T * m.vocab_size / shape.tp


def head_transient_bytes(shape: Shape) -> float:
    """During the loss: the 16-bit logits and their fp32 gradient."""
    return (ACT_BYTES + 4) * shape.tokens * shape.model.vocab_size / shape.tp


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


def stage_memory(shape: Shape, layout: Layout, stage: Stage, framework: str, in_flight: int | None = None) -> StageMemory:
    """Peak memory of one GPU of ``stage`` under the pipeline schedule, with
    ``in_flight`` chunk-micro-batches held at the peak (default: Megatron's
    schedule's count; the simulator reports the same)."""
    model = shape.model
    params = stage_params(model, layout, stage)
    state = model_state_bytes(params, layout, framework)
    if shape.precision == "fp8":
        state["weights"] += params.linear * (FP8_WEIGHT_CACHE_BYTES - WEIGHT_BYTES / 2) / (
            layout.optimizer_shards if layout.zero_stage >= 3 else 1
        )

    chunks = in_flight_chunks(layout, stage.index) if in_flight is None else in_flight
    # Micro batches (not chunks) in flight on this stage: the embedding and
    # head chunks are one of vpp, so they hold 1/vpp of the chunk count.
    microbatches = max(1, -(-chunks // layout.vpp))
    activations = chunks * max(_chunk_layers_activation_bytes(shape, layout.recompute, chunk) for chunk in stage.chunks)
    if stage.embedding:
        activations += microbatches * embedding_activation_bytes(shape)
    if stage.head:
        activations += head_activation_bytes(shape)
    if stage.vision:
        vision = shape.vision()
        activations += microbatches * vision.model.num_layers * layer_activation_bytes(vision, layout.recompute)

    transient = head_transient_bytes(shape) if stage.head else 0.0
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
