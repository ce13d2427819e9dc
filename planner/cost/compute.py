"""Estimated kernel time of what one GPU computes for one micro batch: a
decoder layer, the embedding, the LM head + loss, the pieces of multi-token
prediction and of a vision tower, at the shapes a TP/CP rank sees
(``shape.py``). Communication is priced in ``time_model``; this module only
counts kernels (see ``efficiency`` for how a kernel's time is found).

These are estimates only: ``layers.py`` puts measured numbers (``--profile``)
in their place where a profile covers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from loom.planner.cost import moe
from loom.planner.cost.efficiency import BYTES, QUANTISED, backward_gemms, flash_attention_time_s, gemm_time_s, memory_time_s
from loom.planner.cost.shape import Shape
from loom.planner.specs.layout import OP_SAC
from loom.planner.specs.model import SUBLAYERS, ModelSpec
from loom.profiles.catalogue import GPU

# Megatron's vocab-parallel cross-entropy upcasts the logits to fp32 and makes
# ~4 passes over them forward (max, subtract, exp, sum) and ~2 backward.
CROSS_ENTROPY_FWD_BYTES_PER_LOGIT = 20
CROSS_ENTROPY_BWD_BYTES_PER_LOGIT = 10


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


# NVFP4BlockScaling applies a 16-point random Hadamard transform to the
# weight-gradient GEMM's inputs before quantising them (Transformer Engine's
# recipe; NVIDIA, "Pretraining LLMs with NVFP4", arXiv 2509.25149, sec. 4):
# one more read and write of the 16-bit tensor [assumed: not fused into the cast].
NVFP4_HADAMARD_BYTES = 2 + 2


def _cast_bytes(gemms: list[tuple[int, int, int]], precision: str) -> float:
    """Transformer Engine casts each GEMM's 16-bit activation input to the
    GEMM's precision (read 2 B, write the row-wise copy plus a column-wise
    one kept for the weight gradient: 1 B each in fp8, NVFP4_BYTES each in
    nvfp4, whose column-wise copy is Hadamard-transformed first) forward, and
    the incoming gradient likewise backward (TE's cast_transpose kernels, one
    fused pass; weights are cast once per step)."""
    per_element = 2 + 2 * BYTES[precision] + (NVFP4_HADAMARD_BYTES if precision == "nvfp4" else 0)
    return sum(per_element * m * k for m, _, k in gemms)


def _unfused_attention(shape: Shape, gpu: GPU, backward: bool) -> PassTime:
    """Megatron's pre-flash attention (and PyTorch's math SDPA): batched
    GEMMs for QK^T and PV with a fused scale-mask-softmax and a dropout over
    the s x s scores in between, 16-bit (fp8 runs its attention in bf16) or
    fp32 in fp32 training."""
    m, s = shape.model, shape.seq_length
    batch = shape.micro_batch_size * m.num_attention_heads // shape.tp
    hd = m.head_dim
    gemms = [(s, s, hd), (s, hd, s)]
    if backward:
        gemms = [g for mnk in gemms for g in backward_gemms(*mnk)]
    precision = shape.precision if shape.act_bytes == 4 else "bf16"
    gemm_s = sum(gemm_time_s(*mnk, gpu, precision, batch=batch) for mnk in gemms)
    scores = batch * s * s
    # fwd: read and write the scores; bwd: y and dy in, dx out. Gemma 2's
    # soft-capping (cap * tanh(x / cap)) is one more such pass each way, and
    # BLOOM's ALiBi adds its biases to the scores forward (read and write).
    passes = 1 + (m.attention_softcap is not None)
    softmax_bytes = passes * (3 if backward else 2) * shape.act_bytes * scores
    alibi_bytes = 2 * shape.act_bytes * scores if m.alibi and not backward else 0
    dropout_bytes = 5 * scores if m.attention_dropout else 0  # read, write, 1-byte mask
    return PassTime(gemm_s=gemm_s, elementwise_s=memory_time_s(softmax_bytes + alibi_bytes + dropout_bytes, gpu))


@cache
def attention_core(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """The attention core (scores, softmax, weighted sum): what selective
    recompute recomputes (Korthikanti et al. 2022, sec. 5). ALiBi (BLOOM) is
    priced as attention without it: FlashAttention-2 adds its per-head slopes
    inside the kernel (flash_attn_func's alibi_slopes)."""
    if not shape.features.flash_attention:
        return _unfused_attention(shape, gpu, backward)
    # FlashAttention's backward does 2.5x the forward's FLOPs (it recomputes
    # QK^T): Dao 2023, FlashAttention-2, sec. 4.
    # Under CP each step of the ring attends to one rank's chunk of keys.
    factor, kv_length = (2.5 if backward else 1.0), shape.seq_length // shape.cp
    full_s = flash_attention_time_s(shape.attention_flops() * factor, gpu, kv_length=kv_length, kernel=shape.features.attention_kernel)
    m = shape.model
    if not m.windowed_layers:
        return PassTime(attention_s=full_s)
    # Sliding-window layers (gpt-oss): each query block streams at most W
    # keys. Every layer is priced at the mean over the model's layers, so the
    # model's total is exact and a stage's is within one layer's difference.
    window_s = flash_attention_time_s(shape.attention_flops(windowed=True) * factor, gpu, kv_length=min(m.sliding_window, kv_length),
                                      kernel=shape.features.attention_kernel)
    share = m.windowed_layers / m.num_layers
    return PassTime(attention_s=(1 - share) * full_s + share * window_s)


def _gemms(shape: Shape, gpu: GPU, gemms: list[tuple[int, int, int]], backward: bool, precision: str | None = None, batch: int = 1) -> float:
    """Time of the forward GEMMs ``gemms`` (m, n, k), or of their backward ones."""
    expanded = [g for mnk in gemms for g in backward_gemms(*mnk)] if backward else gemms
    return sum(gemm_time_s(*mnk, gpu, precision or shape.precision, batch=batch) for mnk in expanded)


def _elementwise(shape: Shape, gpu: GPU, forward_bytes: float, backward: bool, gemms: list[tuple[int, int, int]] = ()) -> float:
    """Memory-bound kernels moving ``forward_bytes`` forward: backward ones
    read the saved input and the incoming gradient and write one gradient,
    about twice the traffic; under fp8 or nvfp4 each GEMM's input is cast too."""
    bytes_ = forward_bytes * (2 if backward else 1)
    if shape.precision in QUANTISED:
        bytes_ += _cast_bytes(list(gemms), shape.precision)
    return memory_time_s(bytes_, gpu)


def norm(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """One LayerNorm or RMSNorm over the residual stream (read + write)."""
    return PassTime(elementwise_s=_elementwise(shape, gpu, 2 * shape.act_bytes * shape.tokens * shape.replicated_width, backward))


def residual_add(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """One bias-dropout-add: read x and the residual, write, plus a 1-byte
    mask with dropout."""
    bytes_ = (3 * shape.act_bytes + (1 if shape.model.dropout else 0)) * shape.tokens * shape.replicated_width
    return PassTime(elementwise_s=_elementwise(shape, gpu, bytes_, backward))


def _rotary_bytes(shape: Shape) -> float:
    """Rotary embedding reads and writes Q and K (none with learned positions or ALiBi)."""
    m = shape.model
    return 2 * shape.act_bytes * shape.tokens * (m.q_size + m.kv_size) // shape.tp if m.rotary else 0


def _qk_norm_bytes(shape: Shape) -> float:
    """The query and key RMSNorms (Qwen3's per head, OLMo-2's across heads)
    read and write Q and K: megatron-core attention.py applies
    q_layernorm and k_layernorm as their own Transformer Engine norm kernels,
    between the QKV GEMM and rotary embedding."""
    m = shape.model
    return 2 * shape.act_bytes * shape.tokens * (m.q_size + m.kv_size) // shape.tp if m.qk_norm else 0


def attention_projections(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """The attention's GEMMs (QKV, or MLA's latents and up-projections, and
    the output projection), the QK norms and rotary embedding; the core is
    attention_core."""
    gemms = shape.attention_gemms()
    return PassTime(gemm_s=_gemms(shape, gpu, gemms, backward),
                    elementwise_s=_elementwise(shape, gpu, _qk_norm_bytes(shape) + _rotary_bytes(shape), backward, gemms))


def mla_up_projections(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """MLA's up-projections from the query and key/value latents, and rotary
    embedding: what the mla_up_proj recompute module re-runs
    (megatron-core multi_latent_attention.py)."""
    m, heads, T = shape.model, shape.model.num_attention_heads // shape.tp, shape.tokens
    mla = m.mla
    gemms = [(T, heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank)]
    if mla.q_lora_rank:
        gemms.append((T, heads * mla.qk_head_dim, mla.q_lora_rank))
    return PassTime(gemm_s=_gemms(shape, gpu, gemms, backward), elementwise_s=_elementwise(shape, gpu, _rotary_bytes(shape), backward, gemms))


def mlp(shape: Shape, gpu: GPU, width: int, backward: bool = False) -> PassTime:
    """A (gated) MLP of ``width`` split over TP: up (and gate) and down
    GEMMs, and the activation (GeLU reads 1 and writes 1 tensor of the
    width; SwiGLU reads 2)."""
    if not width:
        return PassTime()
    gemms = shape.mlp_gemms(width)
    activation = (3 if shape.model.gated_mlp else 2) * shape.act_bytes * shape.tokens * width // shape.tp
    return PassTime(gemm_s=_gemms(shape, gpu, gemms, backward), elementwise_s=_elementwise(shape, gpu, activation, backward, gemms))


def routed_activation(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """The routed experts' activation function on every routed copy: what
    the moe_act recompute module re-runs (megatron-core moe/experts.py)."""
    m = shape.model
    routed = shape.moe_tokens * m.moe.top_k
    bytes_ = (3 if m.gated_mlp else 2) * shape.act_bytes * routed * m.moe.expert_ffn_hidden_size
    return PassTime(elementwise_s=_elementwise(shape, gpu, bytes_, backward))


def routed_experts(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """The router GEMM (16-bit), the routed experts' GEMMs as Transformer
    Engine runs them (moe.expert_gemms_s; in bf16 unless
    Features.quantized_experts) on the busiest rank's rows
    (moe.busiest_rows_factor), their activation, and the dispatcher's local
    permutations (moe.permute_bytes)."""
    m = shape.model
    experts, local = shape.expert_gemms()
    rows = moe.busiest_rows_factor(shape)
    experts = [(max(1, round(balanced * rows)), n, k) for balanced, n, k in experts]
    quantized = shape.features.quantized_experts
    grouped_s = moe.expert_gemms_s(gpu, experts, local, shape.precision if quantized else "bf16", backward)
    router_s = _gemms(shape, gpu, [(shape.moe_tokens, m.moe.num_experts, m.hidden_size)], backward, precision="bf16")
    gemms = [g for g in experts for _ in range(local)] if quantized else []
    elementwise_s = _elementwise(shape, gpu, moe.permute_bytes(shape), backward, gemms)
    return PassTime(gemm_s=grouped_s + router_s, elementwise_s=elementwise_s) + routed_activation(shape, gpu, backward).scaled(rows)


def ssd_gemms(shape: Shape, backward: bool) -> list[tuple[int, int, int, int]]:
    """The batched matrix products (m, n, k, batch) of the Mamba-2 SSD scan
    on one GPU, one pass, as the chunked kernels compute them (mamba_ssm
    ops/triton/ssd_combined.py, which megatron-core's memory-efficient path
    calls through mamba_split_conv1d_scan_combined). Per chunk of Q tokens
    and per head (H, head dim P) or group (G, state N): forward the chunk's
    state B^T x (P, N, Q), C B^T (Q, Q, N) per group, and the output from
    both, (C B^T o L) x (Q, P, Q) and C h (Q, P, N). Backward recomputes C B^T
    and the states, then dstates (N, P, Q), dx (Q, P, Q) + (Q, P, N), dB and
    dC (Q, N, P) each, d(C B^T) and ddA (Q, Q, P) each, and two products back
    through C B^T (Q, N, Q) per group (_mamba_chunk_scan_combined_bwd).
    Megatron-core's context parallelism gives each rank all tokens of
    H / (tp cp) heads (ssm/mamba_context_parallel.py), so a rank's product
    count is the same either way."""
    mamba, Q = shape.model.mamba, shape.model.mamba.chunk_size
    P, N = mamba.head_dim, mamba.state_size
    split = shape.tp * shape.cp
    chunks = shape.micro_batch_size * -(-shape.seq_length // Q)
    heads, groups = chunks * mamba.num_heads // split, chunks * max(1, mamba.num_groups // split)
    if not backward:
        return [(P, N, Q, heads), (Q, Q, N, groups), (Q, P, Q, heads), (Q, P, N, heads)]
    return [(Q, Q, N, groups), (P, N, Q, heads), (N, P, Q, heads), (Q, P, Q, heads), (Q, P, N, heads), (Q, N, P, heads),
            (Q, N, P, heads), (Q, Q, P, heads), (Q, Q, P, heads), (Q, N, Q, groups), (Q, N, Q, groups)]


# The SSD's chunk states per head: chunk_state writes them in fp32, the
# state passing reads them and writes bf16, chunk_scan reads those
# (_mamba_chunk_scan_combined_fwd: states_in_fp32=True, out_dtype C.dtype).
SSD_STATE_BYTES = 4 + 4 + 2 + 2


def mamba_mixer(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """One Mamba-2 mixer (megatron-core MambaMixer._ssm_training): the input
    projection to z, x, B, C, dt and the output projection (split by heads
    over TP like the attention's), the SSD's chunked products (ssd_gemms,
    16-bit: Transformer Engine's fp8 covers the two projections only), and
    its memory-bound passes, forward: the causal conv1d over x, B, C (read,
    write), the chunk kernels reading its output twice and z once and writing
    y and y * silu(z), the chunk states (SSD_STATE_BYTES per state element,
    one state per head per chunk), the [b, s] to [s, b] copy of y and the
    group-wise RMSNorm (read, write)."""
    m, mamba, T = shape.model, shape.model.mamba, shape.tokens
    gemms = [(T, mamba.in_proj_size // shape.tp, m.hidden_size), (T, m.hidden_size, mamba.inner_size // shape.tp)]
    precision = shape.precision if shape.act_bytes == 4 else "bf16"
    scan_s = sum(gemm_time_s(mm, n, k, gpu, precision, batch=batch) for mm, n, k, batch in ssd_gemms(shape, backward))
    conv, inner = mamba.conv_channels / shape.tp, mamba.inner_size / shape.tp
    streamed = shape.act_bytes * T * (2 * conv + 2 * conv + inner + 2 * inner + 2 * inner + 2 * inner)
    states = SSD_STATE_BYTES * T / mamba.chunk_size * mamba.num_heads / shape.tp * mamba.head_dim * mamba.state_size
    return PassTime(gemm_s=_gemms(shape, gpu, gemms, backward) + scan_s, elementwise_s=_elementwise(shape, gpu, streamed + states, backward, gemms))


def sublayer(shape: Shape, gpu: GPU, name: str, backward: bool = False) -> PassTime:
    """One sublayer's kernels (SUBLAYERS), its norm and residual add
    excluded: the attention's projections and core, a dense MLP, an MoE MLP
    (the shared experts, split over TP like a dense MLP, and the routed
    experts) or a Mamba-2 mixer."""
    m = shape.model
    if name == "attention":
        return attention_projections(shape, gpu, backward) + attention_core(shape, gpu, backward)
    if name == "mlp":
        return mlp(shape, gpu, m.ffn_hidden_size, backward)
    if name == "moe":
        return mlp(shape, gpu, m.moe.shared_ffn_hidden_size, backward) + routed_experts(shape, gpu, backward)
    return mamba_mixer(shape, gpu, backward)


def decoder_layer(shape: Shape, gpu: GPU, backward: bool = False, kind: str = "dense") -> PassTime:
    """Kernel time of one decoder layer of ``kind`` (a SUBLAYERS key), one
    micro batch, one pass: its sublayers, their norms (model.norms_in) and
    a residual add each (a parallel block's attention output is added to the
    MLP's, then to the residual: two adds too)."""
    sublayers = SUBLAYERS[kind]
    total = norm(shape, gpu, backward).scaled(shape.model.norms_in(kind)) + residual_add(shape, gpu, backward).scaled(len(sublayers))
    for name in sublayers:
        total = total + sublayer(shape, gpu, name, backward)
    return total


def recomputed_forward(shape: Shape, gpu: GPU, modules: tuple[str, ...], kind: str = "dense") -> PassTime:
    """The forward time selective recompute re-runs in one layer for
    megatron-core's ``modules`` (transformer_config.py recompute_modules):
    core_attn the attention core (Korthikanti et al. 2022, sec. 5); mlp a
    dense layer's MLP with the norm fused into its fc1; moe the whole MoE
    MLP (which covers shared_experts and moe_act); shared_experts the shared
    experts; moe_act the routed activation; layernorm an MoE layer's own
    pre-MLP norm; mla_up_proj MLA's up-projections. A module a layer lacks
    re-runs nothing (a Mamba mixer has none)."""
    m, chosen, sublayers = shape.model, set(modules), SUBLAYERS[kind]
    if OP_SAC in chosen:
        return _op_sac_recompute(shape, gpu, kind == "moe")
    total = PassTime()
    if "attention" in sublayers and "core_attn" in chosen:
        total = total + attention_core(shape, gpu)
    if "attention" in sublayers and "mla_up_proj" in chosen and m.mla is not None:
        total = total + mla_up_projections(shape, gpu)
    if "moe" not in sublayers:
        return total + (mlp(shape, gpu, m.ffn_hidden_size) + norm(shape, gpu) if "mlp" in chosen and "mlp" in sublayers else PassTime())
    if "layernorm" in chosen:
        total = total + norm(shape, gpu)
    if "moe" in chosen:
        return total + routed_experts(shape, gpu) + mlp(shape, gpu, m.moe.shared_ffn_hidden_size)
    if "shared_experts" in chosen:
        total = total + mlp(shape, gpu, m.moe.shared_ffn_hidden_size)
    if "moe_act" in chosen:
        total = total + routed_activation(shape, gpu)
    return total


def _op_sac_recompute(shape: Shape, gpu: GPU, moe: bool) -> PassTime:
    """What torchtitan's per-op checkpointing re-runs of one layer: its
    forward but the attention kernel and the projections whose outputs it
    keeps (activations.op_sac_layer: wq, wv, w1, w2; none of an MoE layer's
    experts)."""
    m, T, t, h = shape.model, shape.tokens, shape.tp, shape.model.hidden_size
    forward = decoder_layer(shape, gpu, kind="moe" if moe else "dense")
    kept = [(T, m.q_size // t, h), (T, m.v_size // t, h)]
    if not moe:
        kept += [(T, m.ffn_hidden_size // t, h), (T, h, m.ffn_hidden_size // t)]
    return PassTime(gemm_s=max(0.0, forward.gemm_s - _gemms(shape, gpu, kept, backward=False)), elementwise_s=forward.elementwise_s)


def embedding(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """Vocab-parallel lookup (write T x h) forward; scatter-add of the
    gradient (read + write) backward. Position embeddings add one more.
    Backward also writes a dense gradient the size of this rank's table
    (PyTorch's embedding_dense_backward), which Megatron's DDP hook then adds
    into the fp32 main_grad (read 2 + 4 B, write 4 B per weight): seen by
    `loom profile layers` as an embedding backward far above its T x h.
    BLOOM's norm after the embedding runs one more norm."""
    m = shape.model
    tensors = 2 if m.learned_position_embeddings else 1
    bytes_ = tensors * shape.act_bytes * shape.tokens * m.hidden_size * (2 if backward else 1)
    if backward:
        bytes_ += (shape.act_bytes + shape.act_bytes + 4 + 4) * m.vocab_size // shape.tp * m.hidden_size
    lookup = PassTime(elementwise_s=memory_time_s(bytes_, gpu))
    return lookup + norm(shape, gpu, backward) if m.embedding_norm else lookup


def head(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """Final norm, the vocab-parallel output GEMM and the cross-entropy loss."""
    m, T = shape.model, shape.tokens
    logits = (T, m.vocab_size // shape.tp, m.hidden_size)
    gemms = backward_gemms(*logits) if backward else [logits]
    # The output layer runs in 16-bit even under fp8 (Transformer Engine keeps
    # the first and last layers out of fp8 by default).
    gemm_s = sum(gemm_time_s(*mnk, gpu, "bf16") for mnk in gemms)
    loss_bytes = (CROSS_ENTROPY_BWD_BYTES_PER_LOGIT if backward else CROSS_ENTROPY_FWD_BYTES_PER_LOGIT) * T * logits[1]
    norm_bytes = 2 * shape.act_bytes * T * shape.replicated_width * (2 if backward else 1)
    # Gemma 2 caps the logits (cap * tanh(x / cap)) before the loss: one more pass over them each way.
    cap_bytes = (3 if backward else 2) * shape.act_bytes * T * logits[1] if m.logit_softcap else 0
    return PassTime(gemm_s=gemm_s, elementwise_s=memory_time_s(loss_bytes + norm_bytes + cap_bytes, gpu))


def mtp_projection(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """Each of DeepSeek-V3's multi-token prediction modules (Megatron's MTP)
    projects [hidden; next token's embedding] 2h -> h before its layer."""
    m = shape.model
    projection = (shape.tokens, m.hidden_size // shape.tp, 2 * m.hidden_size)
    gemms = backward_gemms(*projection) if backward else [projection]
    return PassTime(gemm_s=sum(gemm_time_s(*mnk, gpu, "bf16") for mnk in gemms))


def vision_projector(shape: Shape, gpu: GPU, backward: bool = False) -> PassTime:
    """LLaVA's 2-layer MLP projector from the ViT's width into the language
    model's, on every patch."""
    tower, h = shape.model.vision, shape.model.hidden_size
    patches = shape.vision().tokens
    projector = [(patches, h // shape.tp, tower.encoder.hidden_size), (patches, h, h // shape.tp)]
    gemms = [g for mnk in projector for g in backward_gemms(*mnk)] if backward else projector
    return PassTime(gemm_s=sum(gemm_time_s(*mnk, gpu, "bf16") for mnk in gemms))


def layer_flops_per_token(model: ModelSpec, kind: str, keys: float) -> float:
    """Model FLOPs per token of one decoder layer of ``kind`` (a SUBLAYERS
    key), forward + backward, no recompute, each query scoring ``keys`` keys:
    6 x (the weights a token multiplies) + attention 6 x 2 x keys x (qk + v
    head dims) x heads (Narayanan et al. SC'21 eq. (3), generalised to GQA,
    MLA, gated MLPs and MoE: the experts a token is routed to). A Mamba
    layer's scan counts 3 x 7 x d_inner x state size, as Megatron-LM's
    num_floating_point_operations does for hybrid models (training.py
    mamba_layer_flops)."""
    h, flops = model.hidden_size, 0.0
    for sublayer in SUBLAYERS[kind]:
        if sublayer == "attention":
            flops += 6.0 * model.attention_weights() + 6.0 * keys * model.num_attention_heads * (model.qk_head_dim + model.v_head_dim)
        elif sublayer == "mlp":
            flops += 6.0 * (3 if model.gated_mlp else 2) * h * model.ffn_hidden_size
        elif sublayer == "moe":
            flops += 6.0 * model.moe.active_params(h)
        elif sublayer == "mamba":
            mamba = model.mamba
            flops += 6.0 * h * (mamba.in_proj_size + mamba.inner_size) + 3.0 * 7 * mamba.inner_size * mamba.state_size
    return flops


def model_flops_per_token(model: ModelSpec, seq_length: int, capacity_factor: float | None = None) -> float:
    """Model FLOPs per token, forward + backward, no recompute: every
    layer's layer_flops_per_token with all s keys (half the s x s scores
    are masked, counted anyway) plus the output head — the convention of
    Narayanan et al. SC'21 eq. (3), PaLM's MFU and NeMo's tables up to 24.07
    (the published runs' 'model_flops'). A sliding-window layer counts its
    window of keys, min(s, W), in place of s (the band, its masked half
    counted anyway). An expert ``capacity_factor`` below 1 drops the routed
    copies beyond it: at most that share of the routed experts' FLOPs is done."""
    layers = sum(count * layer_flops_per_token(model, kind, seq_length) for kind, count in model.layer_kinds_in(0, model.num_layers))
    if model.windowed_layers:
        per_key = layer_flops_per_token(model, "dense", 1) - layer_flops_per_token(model, "dense", 0)
        layers -= model.windowed_layers * per_key * (seq_length - min(seq_length, model.sliding_window))
    if capacity_factor is not None and capacity_factor < 1.0:
        routed = 6.0 * model.moe.top_k * model.moe.expert_params(model.hidden_size)
        layers -= (1.0 - capacity_factor) * model.sublayers_in(0, model.num_layers, "moe") * routed
    return layers + 6.0 * model.hidden_size * model.vocab_size


def megatron_flops_per_token(model: ModelSpec, seq_length: int) -> float:
    """Model FLOPs per token as Megatron-LM prints them (``throughput per GPU
    (TFLOP/s/GPU)``, and NVIDIA's tables from 25.09 on): training.py
    num_floating_point_operations since Megatron-LM 8873b55 (2025-03-06)
    counts only the unmasked half of causal attention's scores (s / 2 keys
    per query, every layer: it ignores sliding windows) and each of
    ``mtp_layers`` multi-token prediction modules as one more decoder layer
    of the last layer's kind, its 2h x h projection and norms, and one more
    output head (core_v0.16.1)."""
    h = model.hidden_size
    layers = sum(count * layer_flops_per_token(model, kind, seq_length / 2) for kind, count in model.layer_kinds_in(0, model.num_layers))
    mtp = model.mtp_layers * (layer_flops_per_token(model, model.layer_kind(model.num_layers - 1), seq_length / 2) + 6.0 * (2 * h * h + 3 * h))
    return layers + mtp + (1 + model.mtp_layers) * 6.0 * h * model.vocab_size
