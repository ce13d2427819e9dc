"""What one GPU computes for one micro batch: the forward and backward time
of a decoder layer, of the embedding and of the LM head + loss, at the shapes
a TP/CP rank sees. Communication is priced in ``time_model``; this module
only counts kernels (see ``efficiency`` for how a kernel's time is found).

Shapes follow Megatron-LM's GPT layer (Shoeybi et al. 2019; Narayanan et al.
SC'21 sec. 3): column-parallel QKV and MLP-up GEMMs, row-parallel projection
and MLP-down GEMMs, each split ``tp`` ways; with context parallelism each rank
holds ``seq / cp`` tokens and attends to all keys (ring attention, Liu et al.
2023; Megatron-Core's CP).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Callable

from loom.planner.efficiency import flash_attention_time_s, gemm_time_s, memory_time_s
from loom.planner.job import Features
from loom.planner.layout import Layout
from loom.planner.measured import LayerProfile, calibrated
from loom.planner.model import ModelSpec
from loom.profiles.catalogue import GPU

if TYPE_CHECKING:
    from loom.planner.job import Job

ACT_BYTES = 2  # activations are 16-bit in every supported precision
# Megatron's vocab-parallel cross-entropy upcasts the logits to fp32 and makes
# ~4 passes over them forward (max, subtract, exp, sum) and ~2 backward.
CROSS_ENTROPY_FWD_BYTES_PER_LOGIT = 20
CROSS_ENTROPY_BWD_BYTES_PER_LOGIT = 10


@dataclass(frozen=True)
class Shape:
    """Everything that fixes the per-GPU tensor shapes of one micro batch (and
    nothing else, so that kernel times can be cached across layouts that share
    them)."""

    model: ModelSpec
    tp: int
    cp: int
    micro_batch_size: int
    sequence_parallel: bool
    seq_length: int
    precision: str
    features: Features
    ep: int = 1
    etp: int = 1
    profile: LayerProfile | None = None  # measured layers (--profile), in place of estimates

    @classmethod
    def of(cls, model: ModelSpec, layout: Layout, seq_length: int, precision: str, features: Features, profile: LayerProfile | None = None) -> Shape:
        return cls(model, layout.tp, layout.cp, layout.micro_batch_size, layout.sequence_parallel, seq_length, precision, features, layout.ep, layout.etp, profile)

    @classmethod
    def for_job(cls, job: Job, layout: Layout) -> Shape:
        return cls.of(job.model, layout, job.seq_length, job.precision, job.features, job.layer_profile)

    @property
    def tokens(self) -> int:
        """Tokens per micro batch on one CP rank (the GEMMs' M dimension)."""
        return self.micro_batch_size * self.seq_length // self.cp

    @property
    def replicated_width(self) -> int:
        """Hidden width per GPU outside the TP-split region: norms, residuals
        and dropout run on all of h, unless sequence parallelism splits them."""
        h = self.model.hidden_size
        return h // self.tp if self.sequence_parallel else h

    def attention_gemms(self) -> list[tuple[int, int, int]]:
        """(m, n, k) of the attention's forward GEMMs on one TP rank: QKV and
        the output projection, split by heads. MLA's down-projections into
        the query and key/value latents are replicated on every TP rank
        (megatron-core's MLA), its up-projections split by heads."""
        m, t, T, h = self.model, self.tp, self.tokens, self.model.hidden_size
        output = (T, h, m.attention_output_size // t)
        if m.mla is None:
            return [(T, (m.q_size + m.kv_size + m.v_size) // t, h), output]
        mla, heads = m.mla, m.num_attention_heads // t
        query = [(T, mla.q_lora_rank, h), (T, heads * mla.qk_head_dim, mla.q_lora_rank)] if mla.q_lora_rank else [(T, heads * mla.qk_head_dim, h)]
        key_value = [(T, mla.kv_lora_rank + mla.qk_rope_head_dim, h), (T, heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank)]
        return [*query, *key_value, output]

    def mlp_gemms(self, width: int) -> list[tuple[int, int, int]]:
        """A (gated) MLP of ``width`` split over TP: up (and gate), then down."""
        up = (2 if self.model.gated_mlp else 1) * width
        return [(self.tokens, up // self.tp, self.model.hidden_size), (self.tokens, self.model.hidden_size, width // self.tp)]

    def linear_gemms(self) -> list[tuple[int, int, int]]:
        """(m, n, k) of the forward GEMMs of one dense decoder layer on one TP rank."""
        return self.attention_gemms() + self.mlp_gemms(self.model.ffn_hidden_size)

    @property
    def moe_tokens(self) -> int:
        """Tokens one GPU routes in an MoE layer: its sequence-parallel share
        (Megatron requires sequence parallelism for MoE with TP)."""
        return self.tokens // self.tp

    def expert_gemms(self) -> tuple[list[tuple[int, int, int]], int]:
        """The routed experts' forward GEMMs on one GPU and how many experts
        it holds: with balanced routing every GPU receives its own token
        count x top_k assignments, gathered over ETP, spread over its
        num_experts / ep experts, each split etp ways (grouped GEMM)."""
        moe, h = self.model.moe, self.model.hidden_size
        local_experts = moe.num_experts // self.ep
        rows = max(1, self.moe_tokens * moe.top_k * self.etp // local_experts)
        width = moe.expert_ffn_hidden_size // self.etp
        return [(rows, 2 * width, h), (rows, h, width)], local_experts

    def attention_flops(self) -> float:
        """Forward FLOPs of QK^T and attention x V on one rank. Causal flash
        attention skips the masked half; the unfused kernels compute it all."""
        m = self.model
        heads = m.num_attention_heads / self.tp
        flops = 2.0 * self.micro_batch_size * (self.seq_length / self.cp) * self.seq_length * heads * (m.qk_head_dim + m.v_head_dim)
        return flops / 2 if self.features.flash_attention and self.model.causal else flops

    def vision(self) -> Shape:
        """The vision encoder's shapes: one sequence of patches per sample, TP
        as in the language model, no context parallelism."""
        tower = self.model.vision
        return Shape(tower.encoder, self.tp, 1, self.micro_batch_size, self.sequence_parallel, tower.image_tokens, self.precision, self.features)


@dataclass(frozen=True)
class PassTime:
    """One pass (forward or backward) of one piece, split by kernel kind."""

    gemm_s: float = 0.0
    attention_s: float = 0.0
    elementwise_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.gemm_s + self.attention_s + self.elementwise_s

    def __add__(self, other: PassTime) -> PassTime:
        return PassTime(self.gemm_s + other.gemm_s, self.attention_s + other.attention_s, self.elementwise_s + other.elementwise_s)

    def scaled(self, factor: float) -> PassTime:
        return PassTime(self.gemm_s * factor, self.attention_s * factor, self.elementwise_s * factor)


def _fp8_cast_bytes(gemms: list[tuple[int, int, int]]) -> float:
    """Transformer Engine casts each GEMM's 16-bit activation input to fp8
    (read 2 B, write 1 B, plus a 1 B transposed copy kept for the weight
    gradient) forward, and the incoming gradient likewise backward
    (TE's cast_transpose kernels; weights are cast once per step)."""
    return sum(4 * m * k for m, _, k in gemms)


def backward_gemms(m: int, n: int, k: int) -> list[tuple[int, int, int]]:
    """Y = X W with X (m x k): dX = dY W^T is (m, k, n); dW = X^T dY is (k, n, m)."""
    return [(m, k, n), (k, n, m)]


def _layer_elementwise_bytes(shape: Shape, moe: bool = False) -> float:
    """Forward bytes of the memory-bound kernels of one decoder layer: two
    norms (read + write), two bias-dropout-adds (read x and residual, write,
    plus a 1-byte mask with dropout), the activation (GeLU reads 1 and writes
    1 tensor of ffn width; SwiGLU reads 2), and rotary embedding on Q and K.
    An MoE layer's activation runs on the shared and the routed experts, and
    the token dispatcher permutes each routed copy in and out (read + write)."""
    m, t, T, e = shape.model, shape.tp, shape.tokens, ACT_BYTES
    width = shape.replicated_width
    norms = 2 * (2 * e * T * width)
    residuals = 2 * ((3 * e + (1 if m.dropout else 0)) * T * width)
    per_activation = (3 if m.gated_mlp else 2) * e
    if moe:
        routed = shape.moe_tokens * m.moe.top_k
        activation = per_activation * (T * m.moe.shared_ffn_hidden_size // t + routed * m.moe.expert_ffn_hidden_size)
        activation += 2 * (2 * e * routed * m.hidden_size)
    else:
        activation = per_activation * T * m.ffn_hidden_size // t
    rotary = 0 if m.learned_position_embeddings else 2 * e * T * (m.q_size + m.kv_size) // t
    return norms + residuals + activation + rotary


def _unfused_attention(shape: Shape, gpu: GPU, backward: bool) -> PassTime:
    """Megatron's pre-flash attention: batched GEMMs for QK^T and PV with a
    fused scale-mask-softmax and a dropout over the s x s scores in between."""
    m, s = shape.model, shape.seq_length
    batch = shape.micro_batch_size * m.num_attention_heads // shape.tp
    hd = m.head_dim
    gemms = [(s, s, hd), (s, hd, s)]
    if backward:
        gemms = [g for mnk in gemms for g in backward_gemms(*mnk)]
    gemm_s = sum(gemm_time_s(*mnk, gpu, "bf16", batch=batch) for mnk in gemms)
    scores = batch * s * s
    softmax_bytes = (6 if backward else 4) * scores  # fwd: read+write 16-bit; bwd: y, dy in, dx out
    dropout_bytes = 5 * scores if m.dropout else 0  # read, write, 1-byte mask
    return PassTime(gemm_s=gemm_s, elementwise_s=memory_time_s(softmax_bytes + dropout_bytes, gpu))


@cache
def attention_core(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """The attention core (scores, softmax, weighted sum): what selective
    recompute recomputes (Korthikanti et al. 2022, sec. 5)."""
    if not shape.features.flash_attention:
        return _unfused_attention(shape, gpu, backward)
    # FlashAttention's backward does 2.5x the forward's FLOPs (it recomputes
    # QK^T): Dao 2023, FlashAttention-2, sec. 4.
    # Under CP each step of the ring attends to one rank's chunk of keys.
    flops = shape.attention_flops() * (2.5 if backward else 1.0)
    return PassTime(attention_s=flash_attention_time_s(flops, gpu, kv_length=shape.seq_length // shape.cp))


def _measured(shape: Shape, gpu: GPU, kind: str, backward: bool, estimate: Callable[[Shape], PassTime]) -> PassTime:
    """The estimate's split by kernel kind, scaled to the measured (or
    interpolated) total when a layer profile covers ``kind`` (planner/measured.py)."""
    estimated = estimate(shape)
    if shape.profile is None or not estimated.total_s:
        return estimated
    total_s = calibrated(shape, kind, "backward_s" if backward else "forward_s", lambda s: estimate(s).total_s, gpu.name)
    return estimated.scaled(total_s / estimated.total_s)


@cache
def decoder_layer(shape: Shape, gpu: GPU, backward: bool = False, moe: bool = False) -> PassTime:
    """One decoder layer, one micro batch, one pass: measured, or estimated
    by ``_decoder_layer_estimate``."""
    return _measured(shape, gpu, "moe" if moe else "dense", backward, lambda s: _decoder_layer_estimate(s, gpu, backward, moe))


def _decoder_layer_estimate(shape: Shape, gpu: GPU, backward: bool, moe: bool) -> PassTime:
    """Kernel time of one decoder layer, one micro batch, one pass. In an MoE
    layer the MLP is the router, the shared experts (split over TP like a
    dense MLP) and the routed experts' grouped GEMMs, which the busiest GPU
    runs ``moe_load_imbalance`` times longer than an evenly loaded one."""
    m = shape.model
    gemms = shape.attention_gemms()
    mlp_width = m.moe.shared_ffn_hidden_size if moe else m.ffn_hidden_size
    if mlp_width:
        gemms += shape.mlp_gemms(mlp_width)
    expanded = [g for mnk in gemms for g in backward_gemms(*mnk)] if backward else gemms
    gemm_s = sum(gemm_time_s(*mnk, gpu, shape.precision) for mnk in expanded)
    if moe:
        experts, local = shape.expert_gemms()
        experts = [g for mnk in experts for g in backward_gemms(*mnk)] if backward else experts
        grouped_s = sum(gemm_time_s(*mnk, gpu, shape.precision, batch=local) for mnk in experts)
        router = (shape.moe_tokens, m.moe.num_experts, m.hidden_size)
        router_s = sum(gemm_time_s(*mnk, gpu, "bf16") for mnk in (backward_gemms(*router) if backward else [router]))
        gemm_s += grouped_s * shape.features.moe_load_imbalance + router_s
    # Backward elementwise kernels read the saved input and the incoming
    # gradient and write one gradient: about twice the forward's traffic.
    elementwise_bytes = _layer_elementwise_bytes(shape, moe) * (2 if backward else 1)
    if shape.precision == "fp8":
        elementwise_bytes += _fp8_cast_bytes(gemms + (shape.expert_gemms()[0] if moe else []))
    elementwise = memory_time_s(elementwise_bytes, gpu)
    return PassTime(gemm_s=gemm_s, elementwise_s=elementwise) + attention_core(shape, gpu, backward)


@cache
def embedding(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    return _measured(shape, gpu, "embedding", backward, lambda s: _embedding_estimate(s, gpu, backward))


def _embedding_estimate(shape: Shape, gpu: GPU, backward: bool) -> PassTime:
    """Vocab-parallel lookup (write T x h) forward; scatter-add of the
    gradient (read + write) backward. Position embeddings add one more.
    Backward also writes a dense gradient the size of this rank's table
    (PyTorch's embedding_dense_backward), which Megatron's DDP hook then adds
    into the fp32 main_grad (read 2 + 4 B, write 4 B per weight): seen by
    `loom profile layers` as an embedding backward far above its T x h."""
    m = shape.model
    tensors = 2 if m.learned_position_embeddings else 1
    bytes_ = tensors * ACT_BYTES * shape.tokens * m.hidden_size * (2 if backward else 1)
    if backward:
        bytes_ += (ACT_BYTES + ACT_BYTES + 4 + 4) * m.vocab_size // shape.tp * m.hidden_size
    return PassTime(elementwise_s=memory_time_s(bytes_, gpu))


@cache
def head(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    return _measured(shape, gpu, "head", backward, lambda s: _head_estimate(s, gpu, backward))


def _head_estimate(shape: Shape, gpu: GPU, backward: bool) -> PassTime:
    """Final norm, the vocab-parallel output GEMM and the cross-entropy loss."""
    m, T = shape.model, shape.tokens
    logits = (T, m.vocab_size // shape.tp, m.hidden_size)
    gemms = backward_gemms(*logits) if backward else [logits]
    # The output layer runs in 16-bit even under fp8 (Transformer Engine keeps
    # the first and last layers out of fp8 by default).
    gemm_s = sum(gemm_time_s(*mnk, gpu, "bf16") for mnk in gemms)
    loss_bytes = (CROSS_ENTROPY_BWD_BYTES_PER_LOGIT if backward else CROSS_ENTROPY_FWD_BYTES_PER_LOGIT) * T * logits[1]
    norm_bytes = 2 * ACT_BYTES * T * shape.replicated_width * (2 if backward else 1)
    return PassTime(gemm_s=gemm_s, elementwise_s=memory_time_s(loss_bytes + norm_bytes, gpu))


@cache
def mtp(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """DeepSeek-V3's multi-token prediction modules (Megatron's MTP): each
    projects [hidden; next token's embedding] 2h -> h, runs one more layer
    (MoE when the model is) and the shared output layer and loss again."""
    m = shape.model
    projection = (shape.tokens, m.hidden_size // shape.tp, 2 * m.hidden_size)
    gemms = backward_gemms(*projection) if backward else [projection]
    one = PassTime(gemm_s=sum(gemm_time_s(*mnk, gpu, "bf16") for mnk in gemms))
    one = one + decoder_layer(shape, gpu, backward, moe=m.moe is not None) + head(shape, gpu, backward)
    return one.scaled(m.mtp_layers)


@cache
def vision_tower(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """The ViT's layers on the patches, then the 2-layer MLP projector into
    the language model's width (LLaVA)."""
    vision = shape.vision()
    tower, h = shape.model.vision, shape.model.hidden_size
    patches = vision.tokens
    projector = [(patches, h // shape.tp, tower.encoder.hidden_size), (patches, h, h // shape.tp)]
    gemms = [g for mnk in projector for g in backward_gemms(*mnk)] if backward else projector
    gemm_s = sum(gemm_time_s(*mnk, gpu, "bf16") for mnk in gemms)
    return decoder_layer(vision, gpu, backward).scaled(tower.encoder.num_layers) + PassTime(gemm_s=gemm_s)


def model_flops_per_token(model: ModelSpec, seq_length: int) -> float:
    """Model FLOPs per token, forward + backward, no recompute: 6 x (the
    weights a token multiplies) + attention 6 x 2s x (qk + v head dims) x
    heads per layer (half the s x s scores are masked, counted anyway) —
    the convention of Narayanan et al. SC'21 eq. (3) and PaLM's MFU,
    generalised to GQA, MLA, gated MLPs, MoE (the experts a token is routed
    to) and untied heads (the published runs' 'model_flops')."""
    h = model.hidden_size
    attention = model.attention_weights()
    dense_mlp = (3 if model.gated_mlp else 2) * h * model.ffn_hidden_size
    moe_layers = model.num_moe_layers
    mlp = (model.num_layers - moe_layers) * dense_mlp + (moe_layers and moe_layers * model.moe.active_params(h))
    scores = 2 * seq_length * model.num_attention_heads * (model.qk_head_dim + model.v_head_dim)
    return 6.0 * (model.num_layers * attention + mlp + h * model.vocab_size) + 3.0 * model.num_layers * scores
