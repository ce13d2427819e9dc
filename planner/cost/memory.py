"""Memory per GPU, per pipeline stage: what Megatron-Core, Transformer
Engine, PyTorch, CUDA and NCCL hold at the stage's peak, term by term
(``StageMemory.breakdown_bytes``), each term with its source:

- ``weights``, ``fp8_weight_copies``, ``gradients``, ``optimizer_states``:
  the model state (``model_state_bytes``), by the stack's features (gradient
  dtype, fp8 weights) and the optimizer's sharding;
- ``activations``: what the micro batches in flight keep for backward (each
  piece's bytes from ``layers.py``: estimated by ``activations.py`` or
  measured), walked in Megatron's op order;
- ``transient``: the loss's buffers on the last stage, an MoE layer's
  routed-token buffers (moe.py), the layer a full recompute re-runs, or the
  optimizer step's fp32 gradient copy, whichever phase holds the most;
- ``sharding_buffers``: under ZeRO-3 / FSDP, the unsharded layers in
  flight and the gradient reduce buffers; under DeepSpeed ZeRO-1/2, its
  gradient reduce buckets (sharding.py);
- ``pipeline_buffers``: torch.distributed.pipelining's receive buffers and
  the stage outputs it keeps, under torchtitan (``pipelining_bytes``);
- ``cuda_context``, ``cublas_workspaces``, ``nccl_buffers``,
  ``tp_comm_buffers``, ``moe_dispatcher_buffers`` (moe.py) and
  ``allocator_fragmentation``: what the runtime holds
  beyond tensors (``runtime_bytes``).

Capacity is what PyTorch's allocator sees (profiles/gpus.yaml), not the
marketing figure.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from loom.planner.cost import moe, sharding
from loom.planner.cost.activations import dtensor_head_input_bytes, head_transient
from loom.planner.cost.efficiency import NVFP4_BYTES
from loom.planner.cost.memo import Memo
from loom.planner.cost.layers import embedding_activation_bytes, head_activation_bytes, layer_activation_bytes
from loom.planner.cost.shape import Shape
from loom.planner.schedule.simulate import megatron_schedule, stage_order
from loom.planner.specs.job import FP32_PRECISIONS, Features
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import SUBLAYERS, ModelSpec
from loom.planner.specs.stages import Chunk, Stage, stage_signature
from loom.profiles.catalogue import GPU

GiB = 1024**3
MiB = 1024**2
# The CUDA context of a PyTorch process with lazy module loading (the
# default since CUDA 12.2 and PyTorch 1.13): ~300-450 MiB reported
# (pytorch/pytorch#86509: 287 MB bare; #109888: "around 400MB"), plus the
# kernels of the libraries training loads as they run.
CUDA_CONTEXT_BYTES = 512 * MiB
# NCCL's buffers per communicator that runs collectives: ~12 MiB per peer
# and channel (10 MiB receive + 2 MiB send: NCCL src/init.cc computeBuffSizes,
# measured in NVIDIA/nccl#1685), a ring holding two peers per channel.
# NVIDIA/nccl#964 measured 544-688 MB per communicator with every algorithm
# connected at init (NCCL < 2.22); since 2.22 NCCL_RUNTIME_CONNECT connects
# only what a communicator runs, a ring for the large collectives of
# training: we take a quarter of a GiB.
NCCL_COMMUNICATOR_BYTES = 256 * MiB
# PyTorch's caching allocator cannot reuse every freed block: what is
# reserved beyond what is allocated. Reported at 2.3% of allocated
# (vllm-project/compressed-tensors#587: 1.83 of 78 GiB) up to tens of percent
# on churny workloads without expandable segments (meta-pytorch/torchtune#1185);
# charged on the memory allocated and freed every micro batch.
ALLOCATOR_SLACK_FRACTION = 0.05
# Transformer Engine's userbuffers for --tp-comm-overlap: 12 communicators
# (qkv/proj/fc1/fc2 fprop, dgrad, wgrad) each with a buffer of the full
# sequence x hidden (seq x mbs / cp rows, not split over TP): 2 bytes per
# element each in bf16, and in fp8 the 8 all-gather buffers at 1 byte and the
# 4 reduce-scatter buffers at 2 (TE module/base.py initialize_ub,
# common/comm_gemm_overlap/comm_gemm_overlap.cpp; megatron/training/initialize.py
# passes [seq * mbs / cp, hidden]).
TP_COMM_BUFFER_BYTES_PER_ELEMENT = {"bf16": 12 * 2, "fp8": 8 * 1 + 4 * 2}
# Extra cuBLAS workspaces Transformer Engine allocates: 3 for userbuffers'
# streams (_NUM_MAX_UB_STREAMS) and 4 for grouped GEMMs' compute streams
# (common/util/multi_stream.cpp num_compute_streams), besides its own and
# PyTorch's one each (GPU.cublas_workspace_bytes).
UB_CUBLAS_WORKSPACES = 3
GROUPED_GEMM_CUBLAS_WORKSPACES = 4
# Mixed-precision Adam (Rajbhandari et al. 2020, ZeRO, sec. 3.1): fp32 master
# weights and the two moments, sharded by Megatron's distributed optimizer
# (megatron/core/optimizer/distrib_optimizer.py) or ZeRO.
OPTIMIZER_BYTES = 12
WEIGHT_BYTES = 2  # 16-bit weights and gradients
# torchtitan trains fp32 parameters (training.dtype "float32") that FSDP2
# all-gathers in bf16 (mixed_precision_param) and whose gradients it
# reduces and keeps in fp32 (mixed_precision_reduce): the sharded fp32
# parameter is the optimizer's master, so Adam adds only its two moments
# (torchtitan config/job_config.py Training; FSDP2 _fsdp_api.py
# MixedPrecisionPolicy: "FSDP does not require any extra memory to keep a
# high-precision copy").
TORCHTITAN_STATE = dict(weight=4.0, gemm_weight=4.0, fp8_copies=0.0, grad=4.0, optimizer=8.0)
# With training.dtype "bfloat16" every parameter, gradient and Adam moment is
# bf16, with no fp32 copy anywhere (job_config.py Training.dtype).
TORCHTITAN_BF16_STATE = dict(weight=2.0, gemm_weight=2.0, fp8_copies=0.0, grad=2.0, optimizer=4.0)
# Megatron's precision-aware optimizer with bf16 moments: 2 + 2 bytes of
# moments and the fp32 master kept as the 16 bits the bf16 weight lacks
# (optimizer_config.py store_param_remainders, on with Transformer Engine >=
# 2.1) when the model is bf16 without fp8 or with delayed scaling
# (distrib_optimizer.py: ``store_param_remainders and config.bf16``;
# use_precision_aware_optimizer_no_fp8_or_ds_fp8), else the whole fp32 master.
PRECISION_AWARE_BF16_OPTIMIZER_BYTES = 2 + 2 + 2
PRECISION_AWARE_BF16_FP32_MASTER_BYTES = 2 + 2 + 4
# fp32 training: fp32 weights and gradients, and Adam's two fp32 moments with
# no master copy (megatron-core keeps a main parameter only for 16-bit ones:
# optimizer/__init__.py FP32Optimizer, distrib_optimizer.py shards fp32
# parameters as views; FSDP2 skips the cast when param_dtype is the stored
# one) — except DeepSpeed's ZeRO-1 and -2, which clone an fp32 master of each
# rank's partition whatever the dtype (stage_1_and_2.py
# single_partition_of_fp32_groups).
FP32_STATE = dict(weight=4.0, gemm_weight=4.0, fp8_copies=0.0, grad=4.0, gemm_gather=4.0, optimizer=8.0)
DEEPSPEED_ZERO12_FP32_MASTER_BYTES = 4


# --- parameters and optimizer state ----------------------------------------
@dataclass(frozen=True)
class StageParams:
    """Parameters on one GPU of a stage."""

    total: float
    linear: float  # of which Transformer Engine GEMM weights (fp8 under fp8; not the output layer)
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
def _layer_params_per_gpu(model: ModelSpec, t: int, ep: int, etp: int, kind: str) -> StageParams:
    """One decoder layer of ``kind`` (a SUBLAYERS key) on one GPU under TP
    ``t``; its norms replicated. An MoE MLP holds the router (replicated),
    the shared experts (split over TP) and num_experts / ep routed experts,
    each split etp ways. A Mamba mixer is split by heads: its projections,
    conv1d, per-head parameters and gated norm (megatron-core marks them all
    tensor_model_parallel: ssm/mamba_mixer.py)."""
    h, sublayers = model.hidden_size, SUBLAYERS[kind]
    linear, expert = 0.0, 0.0
    other = model.norms_in(kind) * model.norm_params()
    if "attention" in sublayers:
        linear += _attention_params_per_gpu(model, t)
        other += model.qk_norm_params
    if "mlp" in sublayers:
        linear += model.mlp_params() / t
    if "moe" in sublayers:
        expert = model.moe.num_experts // ep * model.moe.expert_params(h) / etp
        linear += (model.moe.up_projections + 1) * h * model.moe.shared_ffn_hidden_size / t + expert
        other += h * model.moe.num_experts
    if "mamba" in sublayers:
        mamba = model.mamba
        projections = h * (mamba.in_proj_size + mamba.inner_size)
        linear += projections / t
        other += (mamba.params(h) - projections) / t
    return StageParams(total=linear + other, linear=linear, expert=expert)


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
    stage = Stage(index=0, chunks=chunks, ranks=range(0))
    layers = [pair for chunk in chunks for pair in model.layer_kinds_in(chunk.first_layer, chunk.num_layers)]
    if stage.head and model.mtp_layers:
        layers.append(("moe" if model.moe is not None else "dense", model.mtp_layers))
    pieces = [(count, _layer_params_per_gpu(model, t, ep, etp, kind)) for kind, count in layers]
    linear = sum(count * piece.linear for count, piece in pieces)
    expert = sum(count * piece.expert for count, piece in pieces)
    other = sum(count * (piece.total - piece.linear) for count, piece in pieces)
    word_embedding = model.vocab_size * model.hidden_size / t
    if stage.embedding:
        other += word_embedding + (model.embedding_params() - model.vocab_size * model.hidden_size)
    if stage.head:
        other += model.norm_params()
        if not model.tied_embeddings or not stage.embedding:
            # The output layer is megatron-core's own ColumnParallelLinear,
            # in 16-bit even under fp8 (GPTModel.output_layer).
            other += word_embedding
        linear += model.mtp_layers * 2 * model.hidden_size**2 / t
    if stage.vision:
        # The encoder is split over TP like the language model (its norms and
        # patch/position embeddings replicated, a small share).
        linear += model.vision.params(model.hidden_size) / t
    return StageParams(total=linear + other, linear=linear, expert=expert)


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each part of the model state on one GPU, before
    the optimizer's sharding."""

    weight: float  # a 16-bit parameter (norms, embeddings, router, output layer)
    gemm_weight: float  # a Transformer Engine GEMM weight as the model keeps it
    fp8_copies: float  # TE's fp8 (or nvfp4) copies of a GEMM weight, kept across micro batches
    grad: float  # the gradient buffer
    gemm_gather: float  # a GEMM weight as the distributed optimizer all-gathers it
    optimizer: float = OPTIMIZER_BYTES

    @classmethod
    def of(cls, framework: str, precision: str, features: Features, gpu: GPU, distributed_optimizer: bool = True, zero_stage: int = 0,
           fsdp: int = 0) -> StateBytes:
        """Megatron keeps its gradient buffer in fp32 (grad_reduce_in_fp32)
        or in the parameters' dtype (megatron/core/distributed/
        distributed_data_parallel.py: ``grad_dtype = torch.float if
        grad_reduce_in_fp32 else param.dtype``); DeepSpeed's 16-bit.

        Under fp8, Transformer Engine quantizes each GEMM weight row-wise and,
        for the backward GEMMs, column-wise: a transpose on Hopper, nothing
        more on Blackwell (one copy serves both layouts), a second copy with
        its own scales (1 byte per 32 values) under MXFP8 (TE tensor/
        float8_tensor.py, mxfp8_tensor.py). Megatron keeps that workspace
        beside the bf16 weight across micro batches (TE linear.py
        get_weight_workspace, cached unless --disable-parameter-transpose-
        cache). With --fp8-param-gather the weight itself is the fp8 tensor
        (1 byte in the DDP buffer, megatron/core/distributed/
        param_and_grad_buffer.py) and only its transpose is extra (TE
        tensor/utils.py post_all_gather_processing); MXFP8 weights keep both
        directions, their bf16 all-gather reusing the gradient buffer
        (--reuse-grad-buf-for-mxfp8-param-ag). The all-gather then moves the
        fp8 bytes, or, for MXFP8, the bf16 values. NVFP4 keeps both directions
        like MXFP8 (TE tensor/nvfp4_tensor.py), beside the bf16 weight. Megatron gathers fp8
        parameters only with the distributed optimizer (validate_args), so
        ``fp8_param_gather`` holds for layouts that have it. fp32 and tf32
        training keep FP32_STATE."""
        if precision in FP32_PRECISIONS:
            master = DEEPSPEED_ZERO12_FP32_MASTER_BYTES if framework == "deepspeed" and zero_stage in (1, 2) else 0
            return cls(**{**FP32_STATE, "optimizer": FP32_STATE["optimizer"] + master})
        param_gather = features.fp8_param_gather and distributed_optimizer
        if framework == "torchtitan":
            # torchao's float8 training casts the bf16 weights on the fly; with
            # enable_fsdp_float8_all_gather (fp8_param_gather) FSDP2 gathers fp8,
            # which torchtitan turns on only over a data-parallel shard degree
            # above 1 (components/quantization/float8.py).
            gather = 1.0 if precision == "fp8" and features.fp8_param_gather and fsdp > 1 else WEIGHT_BYTES
            state = TORCHTITAN_BF16_STATE if features.optimizer_states == "bf16" else TORCHTITAN_STATE
            return cls(**state, gemm_gather=gather)
        state = cls._mixed_precision(framework, precision, features, gpu, param_gather)
        if features.optimizer_states == "bf16":
            remainders = precision in ("bf16", "nvfp4") or (precision == "fp8" and features.fp8_recipe == "delayed")
            return dataclasses.replace(state, optimizer=PRECISION_AWARE_BF16_OPTIMIZER_BYTES if remainders else PRECISION_AWARE_BF16_FP32_MASTER_BYTES)
        return state

    @classmethod
    def _mixed_precision(cls, framework: str, precision: str, features: Features, gpu: GPU, param_gather: bool) -> StateBytes:
        """Megatron's and DeepSpeed's 16-bit weights beside fp32 optimizer state (of)."""
        grad = 4 if framework == "megatron" and features.grad_reduce_in_fp32 else WEIGHT_BYTES
        if precision == "nvfp4":
            # TE's NVFP4Tensor keeps a row-wise and a column-wise copy, each with its scales (NVFP4_BYTES an element).
            return cls(weight=WEIGHT_BYTES, gemm_weight=WEIGHT_BYTES, fp8_copies=2 * NVFP4_BYTES, grad=grad, gemm_gather=WEIGHT_BYTES)
        if precision != "fp8":
            return cls(weight=WEIGHT_BYTES, gemm_weight=WEIGHT_BYTES, fp8_copies=0.0, grad=grad, gemm_gather=WEIGHT_BYTES)
        if features.fp8_recipe == "mxfp8":
            both_directions = 2 * (1 + 1 / 32)
            gemm_weight = 0.0 if param_gather else WEIGHT_BYTES
            return cls(weight=WEIGHT_BYTES, gemm_weight=gemm_weight, fp8_copies=both_directions, grad=grad, gemm_gather=WEIGHT_BYTES)
        transpose = 0.0 if gpu.fp8_gemm_any_layout else 1.0
        if param_gather:
            return cls(weight=WEIGHT_BYTES, gemm_weight=1.0, fp8_copies=transpose, grad=grad, gemm_gather=1.0)
        return cls(weight=WEIGHT_BYTES, gemm_weight=WEIGHT_BYTES, fp8_copies=1.0 + transpose, grad=grad, gemm_gather=WEIGHT_BYTES)

    def gathered_bytes(self, params: StageParams) -> float:
        """What the distributed optimizer all-gathers of ``params`` after the step."""
        return (params.total - params.linear) * self.weight + params.linear * self.gemm_gather


def model_state_bytes(params: StageParams, layout: Layout, state: StateBytes) -> dict[str, float]:
    """Weights, fp8 weight copies, gradients and optimizer state for
    ``params`` on one GPU.

    Megatron's distributed optimizer shards the optimizer state over DP (x CP),
    the experts' over expert data parallel; ZeRO-1 does the same, ZeRO-2 also
    shards gradients, ZeRO-3 / FSDP also weights, over the shard group
    (layout.param_shards; the experts over expert data parallel)."""
    shards = layout.optimizer_shards

    def expert_split(split: int) -> int:
        return layout.expert_shards if split > 1 else 1

    dense = params.total - params.expert
    dense_gemm = params.linear - params.expert
    weights = ((dense - dense_gemm) * state.weight + dense_gemm * state.gemm_weight) / layout.param_shards
    copies = dense_gemm * state.fp8_copies / layout.param_shards
    expert_weights = params.expert / expert_split(layout.param_shards)
    return {
        "weights": weights + expert_weights * state.gemm_weight,
        "fp8_weight_copies": copies + expert_weights * state.fp8_copies,
        "gradients": (dense / layout.grad_shards + params.expert / expert_split(layout.grad_shards)) * state.grad,
        "optimizer_states": (dense / shards + params.expert / expert_split(shards)) * state.optimizer,
    }


def optimizer_partition(params: StageParams, layout: Layout) -> float:
    """Parameters of this rank's optimizer shard: the dense ones over the
    optimizer's shards, the experts over expert data parallel."""
    shards = layout.optimizer_shards
    return (params.total - params.expert) / shards + params.expert / (layout.expert_shards if shards > 1 else 1)


def optimizer_step_bytes(params: StageParams, layout: Layout, state: StateBytes, framework: str) -> float:
    """During the step the optimizer makes an fp32 copy of a 16-bit gradient
    shard: Megatron's distributed optimizer (distrib_optimizer.py
    _copy_model_grads_to_main_grads: ``shard_model_grad.float()``; a view
    when the buffer is fp32 already), held until the next zero_grad; and
    DeepSpeed's ZeRO, per parameter group (stage_1_and_2.py step:
    ``single_grad_partition ... .to(fp32)``) or per sub group of at most
    ``sub_group_size`` elements under ZeRO-3 (stage3.py
    _prepare_fp32_grad_for_sub_group). None when the gradients are fp32 or
    the optimizer runs on the host."""
    if state.grad >= 4 or layout.optimizer_offload or (framework != "deepspeed" and (layout.zero_stage or layout.fsdp)):
        return 0.0
    partition = optimizer_partition(params, layout)
    if framework == "deepspeed" and layout.zero_stage >= 3:
        partition = min(partition, sharding.ZERO3_SUB_GROUP_PARAMS)
    return 4 * partition


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


def communicators(layout: Layout, model: ModelSpec) -> int:
    """NCCL communicators a rank runs collectives on in a step: TP, CP, the
    gradient reduce over DP x CP, pipeline send/recv, the tied embeddings'
    sync, MoE's token all-to-all, expert TP and the experts' reduce, and the
    default group Megatron's start-up runs barriers on
    (megatron/core/parallel_state.py initialize_model_parallel)."""
    groups = [layout.tp, layout.cp, layout.dp * layout.cp, layout.pp, layout.ep, layout.etp]
    if model.tied_embeddings and layout.pp > 1:
        groups.append(2)
    if model.moe is not None:
        groups.append(layout.expert_dp)
    return sum(1 for size in groups if size > 1) + 1


def runtime_bytes(shape: Shape, layout: Layout, gpu: GPU, framework: str, allocated_per_microbatch: float) -> dict[str, float]:
    """What the runtime holds beyond the model's tensors: the CUDA context,
    cuBLAS workspaces (PyTorch's and Transformer Engine's, more with
    userbuffers and grouped GEMMs), NCCL's buffers, TE's userbuffers for
    --tp-comm-overlap, and the caching allocator's fragmentation on the
    ``allocated_per_microbatch`` bytes allocated and freed every micro batch;
    and what a calibration measured beyond all that on real runs
    (``GPU.memory_overhead_bytes``, loom calibrate), where the GPU has one."""
    megatron = framework == "megatron"
    userbuffers = megatron and shape.features.tp_comm_overlap and layout.sequence_parallel and layout.tp > 1
    workspaces = 1 + megatron * (1 + UB_CUBLAS_WORKSPACES * userbuffers + GROUPED_GEMM_CUBLAS_WORKSPACES * (shape.model.moe is not None))
    tp_comm = 0.0
    if userbuffers:
        per_element = TP_COMM_BUFFER_BYTES_PER_ELEMENT["fp8" if shape.precision == "fp8" else "bf16"]
        tp_comm = per_element * shape.micro_batch_size * shape.seq_length / shape.cp * shape.model.hidden_size
    measured = {"measured_overhead": gpu.memory_overhead_bytes} if gpu.memory_overhead_bytes else {}
    return {
        "cuda_context": CUDA_CONTEXT_BYTES,
        "cublas_workspaces": workspaces * gpu.cublas_workspace_bytes,
        "nccl_buffers": NCCL_COMMUNICATOR_BYTES * communicators(layout, shape.model),
        "tp_comm_buffers": tp_comm,
        "moe_dispatcher_buffers": moe.dispatcher_buffer_bytes(shape),
        "allocator_fragmentation": ALLOCATOR_SLACK_FRACTION * allocated_per_microbatch,
        **measured,
    }


def chunk_activation_bytes(shape: Shape, layout: Layout, chunk: Chunk) -> float:
    """What one micro batch through ``chunk`` keeps until its backward."""
    activations = _chunk_layers_activation_bytes(shape, layout, chunk)
    if chunk.embedding:
        activations += embedding_activation_bytes(shape)
    if chunk.head:
        activations += head_activation_bytes(shape)
    if chunk.vision:
        vision = shape.vision()
        activations += vision.model.num_layers * layer_activation_bytes(vision, layout.recompute)
    return activations


def _chunk_layers_activation_bytes(shape: Shape, layout: Layout, chunk: Chunk) -> float:
    """The decoder layers of ``chunk``, of every kind. Under full recompute
    its first ``layout.fully_recomputed`` layers keep only their inputs
    (megatron-core's transformer_block.py _checkpointed_forward: uniform
    checkpoints every layer, block the first N of the chunk) and the rest
    everything; under selective every layer keeps what its modules do not
    re-run."""
    full = layout.fully_recomputed(chunk.num_layers)
    rest = "none" if layout.recompute == "full" else layout.recompute
    modules = layout.selective_modules
    total = 0.0
    for first, count, recompute in ((chunk.first_layer, full, "full"), (chunk.first_layer + full, chunk.num_layers - full, rest)):
        for kind, layers in shape.model.layer_kinds_in(first, count):
            total += layers * layer_activation_bytes(shape, recompute, kind, modules)
    return total


def held_activation_bytes(layout: Layout, stage_index: int, chunk_bytes: tuple[float, ...]) -> float:
    """The most bytes stage ``stage_index`` holds at once when its local
    chunk v keeps ``chunk_bytes[v]`` per micro batch from its forward to its
    backward, under the schedule Megatron-Core runs.

    Equal chunks: ``in_flight_chunks`` times one chunk. Otherwise the most
    of what the stage's op order can hold (``_held_counts``) under these
    chunk sizes."""
    if len(set(chunk_bytes)) == 1:
        return in_flight_chunks(layout, stage_index) * chunk_bytes[0]
    microbatches = min(layout.num_microbatches, 3 * layout.pp)
    counts = _held_counts(megatron_schedule(layout.vpp), layout.pp, layout.vpp, microbatches, stage_index)
    return max(sum(count * size for count, size in zip(held, chunk_bytes)) for held in counts)


@functools.lru_cache(maxsize=4096)
def _held_counts(schedule: str, pp: int, vpp: int, microbatches: int, stage_index: int) -> tuple[tuple[int, ...], ...]:
    """Micro batches in flight per local chunk after each forward of the
    stage's op order (schedule/simulate.stage_order, Megatron's), those no
    other one covers: the held bytes peak at one of them for any
    non-negative chunk sizes. Which chunks are in flight repeats every
    pp * vpp steady-state steps and the cool-down only frees, so 3 * pp
    micro batches (warm-up < (vpp + 1) * pp chunk passes, plus one period)
    reach the peak of any longer step. Cached: the search prices many
    layouts with the same schedule shape."""
    held, seen = [0] * vpp, set()
    for kind, _, local in stage_order(schedule, pp, vpp, microbatches, stage_index):
        held[local] += 1 if kind == "F" else -1
        if kind == "F":
            seen.add(tuple(held))
    return tuple(sorted(v for v in seen if not any(w != v and all(a >= b for a, b in zip(w, v)) for w in seen)))


@dataclass(frozen=True)
class _StageState:
    """What one GPU of a stage holds for its model, whatever its micro
    batches: the model-state terms on the device (their sum ``bytes``), the
    sharded data parallel buffers, and the optimizer step's gradient copy."""

    terms: dict[str, float]
    bytes: float
    sharding_buffers: float
    optimizer_step: float


# A stage's model state reads its layers (stage_signature), the shape of its
# weights (Shape.weights_shape: the model, precision, features, TP and
# expert degrees), the framework, the GPU, and of the rest of the layout
# only its degrees and how the state is sharded or offloaded (its pipeline
# depth for torchtitan's buffers): not the micro batch, sequence
# parallelism or recomputation.
_STAGE_STATES: Memo[_StageState] = Memo()


def _stage_state(shape: Shape, layout: Layout, stage: Stage, framework: str, gpu: GPU) -> _StageState:
    """What one GPU of ``stage`` holds for its model (_StageState)."""
    key = (shape.weights_shape, framework, gpu, stage_signature(shape.model, stage), layout.cp, layout.dp, layout.pp,
           layout.distributed_optimizer, layout.zero_stage, layout.fsdp, layout.reshard_after_forward, layout.optimizer_offload)
    return _STAGE_STATES.get(key, lambda: _priced_stage_state(shape, layout, stage, framework, gpu))


def _priced_stage_state(shape: Shape, layout: Layout, stage: Stage, framework: str, gpu: GPU) -> _StageState:
    params = stage_params(shape.model, layout, stage)
    state_bytes = StateBytes.of(framework, shape.precision, shape.features, gpu, layout.distributed_optimizer, layout.zero_stage, layout.fsdp)
    state = model_state_bytes(params, layout, state_bytes)
    if layout.optimizer_offload:
        # On the host (offload.py): the optimizer state, and under
        # torchtitan's CPUOffloadPolicy the sharded weights and gradients too.
        host = ("optimizer_states", "weights", "gradients") if framework == "torchtitan" else ("optimizer_states",)
        state = {term: 0.0 if term in host else value for term, value in state.items()}
    buffers = 0.0
    if layout.fsdp:
        buffers = sharding.buffer_bytes(framework, layout, sharding_units(shape.model, framework, layout, params, stage, state_bytes), WEIGHT_BYTES)
    elif framework == "deepspeed" and layout.zero_stage in (1, 2):
        buffers = sharding.zero_bucket_bytes(shape.features.overlap_grad_reduce, shape.act_bytes)
    return _StageState(state, sum(state.values()), buffers, optimizer_step_bytes(params, layout, state_bytes, framework))


def stage_state_bytes(shape: Shape, layout: Layout, stage: Stage, framework: str, gpu: GPU) -> float:
    """The model-state part of ``stage_memory`` (weights, fp8 copies,
    gradients, optimizer state on the device): a lower bound on its peak
    that costs a fraction of it, since every other term is non-negative."""
    return _stage_state(shape, layout, stage, framework, gpu).bytes


def stage_memory(shape: Shape, layout: Layout, stage: Stage, framework: str, gpu: GPU) -> StageMemory:
    """Peak memory of one GPU (of type ``gpu``) of ``stage`` under Megatron's
    pipeline schedule, term by term (module docstring)."""
    state, activations, transient, pipeline, runtime = _stage_terms(shape, layout, stage, framework, gpu)
    return StageMemory(stage=stage.index, breakdown_bytes={**state.terms, "sharding_buffers": state.sharding_buffers, "activations": activations,
                                                           "transient": transient, "pipeline_buffers": pipeline, **runtime})


def stage_peak_bytes(shape: Shape, layout: Layout, stage: Stage, framework: str, gpu: GPU) -> float:
    """``stage_memory(...).peak_bytes`` without its breakdown (the search
    asks it of every layout), summed in the same order to the same bits."""
    state, activations, transient, pipeline, runtime = _stage_terms(shape, layout, stage, framework, gpu)
    return sum((*state.terms.values(), state.sharding_buffers, activations, transient, pipeline, *runtime.values()))


def _stage_terms(shape: Shape, layout: Layout, stage: Stage, framework: str, gpu: GPU) -> tuple[_StageState, float, float, float, dict[str, float]]:
    state = _stage_state(shape, layout, stage, framework, gpu)
    activations, transient = _stage_activations(shape, layout, stage, framework)
    pipeline = pipelining_bytes(shape, layout, stage) if framework == "torchtitan" else 0.0
    # The optimizer step holds no activations: its gradient copy binds only
    # when it is larger than everything the backward held.
    transient = max(transient, state.optimizer_step - activations)
    return state, activations, transient, pipeline, runtime_bytes(shape, layout, gpu, framework, activations + transient)


# What a stage holds for its micro batches in flight reads the shape, the
# recompute settings, the stage's chunks and index, the schedule's pp, vpp
# and micro batch count, and the framework: not DP, the optimizer or sharding.
_STAGE_ACTIVATIONS: Memo[tuple[float, float]] = Memo()


def _stage_activations(shape: Shape, layout: Layout, stage: Stage, framework: str) -> tuple[float, float]:
    """The activations ``stage`` holds at its peak and the transient bytes
    its passes add on top (the head's logits, an MoE layer's forward, a
    recomputed layer), before the optimizer step's."""
    key = (shape, framework, layout.recompute, layout.recompute_num_layers, layout.selective_modules, stage.chunks, stage.index,
           layout.pp, layout.vpp, layout.num_microbatches)
    return _STAGE_ACTIVATIONS.get(key, lambda: _priced_stage_activations(shape, layout, stage, framework))


def _priced_stage_activations(shape: Shape, layout: Layout, stage: Stage, framework: str) -> tuple[float, float]:
    chunks = in_flight_chunks(layout, stage.index)
    # Micro batches (not chunks) in flight on this stage: the embedding and
    # head chunks are one of vpp, so they hold 1/vpp of the chunk count.
    microbatches = max(1, -(-chunks // layout.vpp))
    layers = tuple(_chunk_layers_activation_bytes(shape, layout, chunk) for chunk in stage.chunks)
    activations = held_activation_bytes(layout, stage.index, layers)
    if stage.embedding:
        activations += microbatches * embedding_activation_bytes(shape)
    if stage.head:
        activations += head_activation_bytes(shape) + (dtensor_head_input_bytes(shape) if framework == "torchtitan" else 0.0)
    if stage.vision:
        vision = shape.vision()
        activations += microbatches * vision.model.num_layers * layer_activation_bytes(vision, layout.recompute)

    transient = head_transient(shape) if stage.head else 0.0
    if any(shape.model.moe_layers_in(chunk.first_layer, chunk.num_layers) for chunk in stage.chunks):
        transient = max(transient, moe.forward_transient_bytes(shape))
    if layout.recompute == "full":
        # Backward re-runs one layer's forward and holds all its activations.
        transient = max(transient, max(layer_activation_bytes(shape, "none", kind) for kind in shape.model.layer_kinds))
    elif layout.recompute == "selective":
        # Backward re-runs one layer's recomputed modules and holds what they
        # save until that layer's backward is through (megatron-core's
        # CheckpointWithoutOutput; torch.utils.checkpoint under torchtitan).
        modules = layout.selective_modules
        transient = max(transient, max(layer_activation_bytes(shape, "none", kind) - layer_activation_bytes(shape, "selective", kind, modules)
                                       for kind in shape.model.layer_kinds))
    return activations, transient


def pipelining_bytes(shape: Shape, layout: Layout, stage: Stage) -> float:
    """What torch.distributed.pipelining (torchtitan's pipeline) keeps on
    one GPU of ``stage`` beyond the layers' saved activations, in bytes
    (torch 2.6-2.13 distributed/pipelining/stage.py):

    - a receive buffer per micro batch for each local stage's input (all
      but the model's first) and one for its input's gradient (all but the
      last), allocated once (_prepare_forward_infra,
      _prepare_backward_infra) and kept; the inputs of the micro batches in
      flight are already counted as their first layer's saved input;
    - each micro batch's output (the last stage's: its logits), kept from
      its forward to its backward (fwd_cache), or until the next step under
      ``Features.pipeline_keeps_outputs`` (output_chunks).

    A stage boundary is [micro batch, seq / cp, hidden] in 16-bit, split
    over TP under sequence parallelism; in-flight micro batches are shared
    evenly over the local stages (in_flight_chunks)."""
    if layout.pp == 1:
        return 0.0
    m, chunks = layout.num_microbatches, len(stage.chunks)
    boundary = shape.act_bytes * shape.tokens * shape.model.hidden_size / (shape.tp if shape.sequence_parallel else 1)
    logits = shape.act_bytes * shape.tokens * shape.model.vocab_size / shape.tp
    in_flight = in_flight_chunks(layout, stage.index) / chunks
    outputs_held = m if shape.features.pipeline_keeps_outputs else in_flight
    receiving = sum(not chunk.embedding for chunk in stage.chunks)
    receiving_gradients = sum(not chunk.head for chunk in stage.chunks)
    outputs = sum(outputs_held * (logits if chunk.head else boundary) for chunk in stage.chunks)
    return boundary * (receiving * (m - in_flight) + receiving_gradients * m) + outputs


def sharding_units(model: ModelSpec, framework: str, layout: Layout, params: StageParams, stage: Stage, state: StateBytes) -> sharding.Units:
    """The stage's FSDP units (sharding.py) for this GPU's ``params``: whole
    layers, or under DeepSpeed each layer's weight matrices one by one."""
    count = sharding.units_of(stage.num_layers, stage.embedding, stage.head)
    # Every weight is gathered in 16-bit (FSDP2's param_dtype, Megatron's
    # compute weights), GEMM weights in fp8 under fp8 parameter gathers.
    gather = ((params.total - params.linear) * WEIGHT_BYTES + params.linear * state.gemm_gather) / params.total if params.total else WEIGHT_BYTES
    # torchtitan reduces in fp32 (mixed_precision_reduce) whatever its
    # weights' dtype, and its host copies move the shards as stored.
    reduce = 4.0 if framework == "torchtitan" else state.grad
    host_copy = state.weight * params.total / count / layout.param_shards if layout.optimizer_offload and framework == "torchtitan" else 0.0
    # The embedding's and the output layer's vocabulary-parallel weights are
    # units of their own (torchtitan's fully_shard on tok_embeddings and on
    # [norm, output]); the largest a stage has bounds its buffers.
    vocabulary = model.vocab_size * model.hidden_size / layout.tp if stage.embedding or stage.head else 0.0
    layer = max((_layer_params_per_gpu(model, layout.tp, layout.ep, layout.etp, kind).total
                 for kind in model.layer_kinds if stage.num_layers), default=0.0)
    return sharding.Units(count=count, params=params.total / count, expert_params=params.expert / count,
                          gather_bytes=gather, reduce_bytes=reduce,
                          pieces=sharding.deepspeed_pieces(model) if framework == "deepspeed" else (1.0,), host_copy_bytes=host_copy,
                          largest=max(vocabulary, layer))
