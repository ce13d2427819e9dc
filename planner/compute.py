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

from loom.planner.efficiency import flash_attention_time_s, gemm_time_s, memory_time_s
from loom.planner.job import Features
from loom.planner.layout import Layout
from loom.planner.model import ModelSpec
from loom.profiles.catalogue import GPU

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

    @classmethod
    def of(cls, model: ModelSpec, layout: Layout, seq_length: int, precision: str, features: Features) -> Shape:
        return cls(model, layout.tp, layout.cp, layout.micro_batch_size, layout.sequence_parallel, seq_length, precision, features)

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

    def linear_gemms(self) -> list[tuple[int, int, int]]:
        """(m, n, k) of the forward GEMMs of one decoder layer on one TP rank."""
        m, t = self.model, self.tp
        h, q, kv, f = m.hidden_size, m.q_size, m.kv_size, m.ffn_hidden_size
        up = (2 if m.gated_mlp else 1) * f
        return [(self.tokens, (q + 2 * kv) // t, h), (self.tokens, h, q // t), (self.tokens, up // t, h), (self.tokens, h, f // t)]

    def attention_flops(self) -> float:
        """Forward FLOPs of QK^T and attention x V on one rank. Causal flash
        attention skips the masked half; the unfused kernels compute it all."""
        flops = 4.0 * self.micro_batch_size * (self.seq_length / self.cp) * self.seq_length * self.model.q_size / self.tp
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


def _backward_gemms(m: int, n: int, k: int) -> list[tuple[int, int, int]]:
    """Y = X W with X (m x k): dX = dY W^T is (m, k, n); dW = X^T dY is (k, n, m)."""
    return [(m, k, n), (k, n, m)]


def _layer_elementwise_bytes(shape: Shape) -> float:
    """Forward bytes of the memory-bound kernels of one decoder layer: two
    norms (read + write), two bias-dropout-adds (read x and residual, write,
    plus a 1-byte mask with dropout), the activation (GeLU reads 1 and writes
    1 tensor of ffn width; SwiGLU reads 2), and rotary embedding on Q and K."""
    m, t, T, e = shape.model, shape.tp, shape.tokens, ACT_BYTES
    width = shape.replicated_width
    norms = 2 * (2 * e * T * width)
    residuals = 2 * ((3 * e + (1 if m.dropout else 0)) * T * width)
    activation = (3 if m.gated_mlp else 2) * e * T * m.ffn_hidden_size // t
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
        gemms = [g for mnk in gemms for g in _backward_gemms(*mnk)]
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


@cache
def decoder_layer(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """Kernel time of one decoder layer, one micro batch, one pass."""
    gemms = shape.linear_gemms()
    if backward:
        gemms = [g for mnk in gemms for g in _backward_gemms(*mnk)]
    gemm_s = sum(gemm_time_s(*mnk, gpu, shape.precision) for mnk in gemms)
    # Backward elementwise kernels read the saved input and the incoming
    # gradient and write one gradient: about twice the forward's traffic.
    elementwise_bytes = _layer_elementwise_bytes(shape) * (2 if backward else 1)
    if shape.precision == "fp8":
        elementwise_bytes += _fp8_cast_bytes(shape.linear_gemms())
    elementwise = memory_time_s(elementwise_bytes, gpu)
    return PassTime(gemm_s=gemm_s, elementwise_s=elementwise) + attention_core(shape, gpu, backward)


@cache
def embedding(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """Vocab-parallel lookup (write T x h) forward; scatter-add of the
    gradient (read + write) backward. Position embeddings add one more."""
    tensors = 2 if shape.model.learned_position_embeddings else 1
    bytes_ = tensors * ACT_BYTES * shape.tokens * shape.model.hidden_size * (2 if backward else 1)
    return PassTime(elementwise_s=memory_time_s(bytes_, gpu))


@cache
def head(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """Final norm, the vocab-parallel output GEMM and the cross-entropy loss."""
    m, T = shape.model, shape.tokens
    logits = (T, m.vocab_size // shape.tp, m.hidden_size)
    gemms = _backward_gemms(*logits) if backward else [logits]
    # The output layer runs in 16-bit even under fp8 (Transformer Engine keeps
    # the first and last layers out of fp8 by default).
    gemm_s = sum(gemm_time_s(*mnk, gpu, "bf16") for mnk in gemms)
    loss_bytes = (CROSS_ENTROPY_BWD_BYTES_PER_LOGIT if backward else CROSS_ENTROPY_FWD_BYTES_PER_LOGIT) * T * logits[1]
    norm_bytes = 2 * ACT_BYTES * T * shape.replicated_width * (2 if backward else 1)
    return PassTime(gemm_s=gemm_s, elementwise_s=memory_time_s(loss_bytes + norm_bytes, gpu))


@cache
def vision_tower(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """The ViT's layers on the patches, then the 2-layer MLP projector into
    the language model's width (LLaVA)."""
    vision = shape.vision()
    tower, h = shape.model.vision, shape.model.hidden_size
    patches = vision.tokens
    projector = [(patches, h // shape.tp, tower.encoder.hidden_size), (patches, h, h // shape.tp)]
    gemms = [g for mnk in projector for g in _backward_gemms(*mnk)] if backward else projector
    gemm_s = sum(gemm_time_s(*mnk, gpu, "bf16") for mnk in gemms)
    return decoder_layer(vision, gpu, backward).scaled(tower.encoder.num_layers) + PassTime(gemm_s=gemm_s)


def model_flops_per_token(model: ModelSpec, seq_length: int) -> float:
    """Model FLOPs per token, forward + backward, no recompute: 6 x (the
    weights a token multiplies) + attention 12 x s x h per layer — the
    convention of Narayanan et al. SC'21 eq. (3) and PaLM's MFU, generalised to
    GQA, gated MLPs and untied heads (the published runs' 'model_flops')."""
    h, q, kv, f = model.hidden_size, model.q_size, model.kv_size, model.ffn_hidden_size
    per_layer = 2 * (h * (q + 2 * kv) + q * h + (3 if model.gated_mlp else 2) * h * f) + 4 * seq_length * q
    return 3.0 * (model.num_layers * per_layer + 2 * h * model.vocab_size)
