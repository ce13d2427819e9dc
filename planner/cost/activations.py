"""Estimated activation bytes: what each piece of the model keeps for
backward per micro batch on one GPU, and the transient buffers of the loss.

Counted after Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models" (sec. 4), generalised tensor by tensor so that GQA,
gated MLPs, models without dropout, flash attention and context parallelism
fall out of the same count: with GPT-3's shapes it reduces to the paper's
sbh(10 + 24/t + 5as/(ht)) without and 34sbh/t with sequence parallelism.

Under fp8, Transformer Engine saves each GEMM's input in fp8 instead of
16-bit (``gemm_input_bytes``); the rest (norm inputs, Q/K/V and the
attention output, the MLP's fc1 output) stays 16-bit.

These are estimates only: ``layers.py`` puts measured bytes (``--profile``)
in their place where a profile covers them.
"""

from __future__ import annotations

from loom.planner.cost.efficiency import NVFP4_BYTES
from loom.planner.cost.moe import busiest_rows_factor
from loom.planner.cost.shape import Shape
from loom.planner.specs.layout import OP_SAC
from loom.planner.specs.model import SUBLAYERS

# The loss per logit, by implementation (--cross-entropy-fusion-impl):
# Megatron's unfused vocab_parallel_cross_entropy and its native fused one
# save the fp32 softmax for backward (4 B) and briefly hold the 16-bit logits
# or their 16-bit gradient beside it (2 B) (megatron/core/tensor_parallel/
# cross_entropy.py, fusions/fused_cross_entropy.py); Transformer Engine's
# fused loss writes the gradient in place into the 16-bit logits and saves
# those (TE 2.9-2.11 pytorch/triton/cross_entropy.py, the versions
# megatron-core 0.16 pins). PyTorch's cross_entropy on fp32 logits, as
# torchtitan calls it (components/loss.py: ``cross_entropy(pred.flatten(0,
# 1).float(), ...)``), is log_softmax, which saves its fp32 output (4 B), and
# nll_loss, whose backward writes a dense fp32 gradient of that output while
# log_softmax's backward writes another for its input (4 + 4 B; aten
# nll_loss_backward, _log_softmax_backward_data).
LOSS_SAVED_BYTES_PER_LOGIT = {"none": 4, "native": 4, "te": 2, "torch": 4}
LOSS_TRANSIENT_BYTES_PER_LOGIT = {"none": 2, "native": 2, "te": 0, "torch": 8}
# Under tensor parallelism torchtitan runs that loss as DTensor's
# loss_parallel on vocabulary-sharded logits: its backward,
# _nll_loss_and_log_softmax_backward, computes (zeros_like(x) + exp(x)) *
# grad_output, three fp32 tensors the size of the saved log-softmax output x
# alive at once (torch 2.6-2.13 torch/distributed/tensor/parallel/loss.py).
LOSS_PARALLEL_TRANSIENT_BYTES_PER_LOGIT = 12


def gemm_input_bytes(shape: Shape) -> float:
    """Bytes per element of a GEMM input Transformer Engine keeps for
    backward: 16-bit, or under fp8 one fp8 copy (1 B), plus MXFP8's scale per
    32 values, or under nvfp4 one NVFP4 copy (NVFP4_BYTES). After the forward
    GEMM, TE's Linear and LayerNormLinear keep only the column-wise copy the
    weight gradient needs, or with sequence parallelism the row-wise local
    shard they gather again
    (transformer_engine/pytorch/module/linear.py ``inputmat.update_usage``)."""
    if shape.precision == "nvfp4":
        return NVFP4_BYTES
    if shape.precision != "fp8":
        return shape.act_bytes
    return 1 + (1 / 32 if shape.features.fp8_recipe == "mxfp8" else 0)


# What each of megatron-core's --recompute-modules frees of a layer's parts
# (layer_parts): a checkpointed module keeps its input and drops what it
# computes; an output-discarding one drops its output (transformer_config.py
# recompute_modules; transformer_layer.py, moe/moe_layer.py, moe/experts.py,
# multi_latent_attention.py). "mlp" is the dense MLP (its norm is fused into
# fc1), "layernorm" the MoE layer's own pre-MLP norm (the attention's norm is
# fused into the QKV GEMM, which keeps its input itself).
DROPPED_BY_MODULE = {
    "core_attn": ("core_attention",),
    "mlp": ("mlp_input", "mlp"),
    "moe": ("shared_experts", "routed", "routed_activation", "router"),
    "shared_experts": ("shared_experts",),
    "moe_act": ("routed_activation",),
    "layernorm": ("moe_norm_output",),
    "mla_up_proj": ("qkv",),
}


def layer_parts(shape: Shape, kind: str = "dense") -> dict[str, float]:
    """What one decoder layer of ``kind`` (a SUBLAYERS key) keeps for
    backward, per micro batch, per GPU, part by part: Korthikanti et al.'s
    count, tensor by tensor (``loom profile layers`` measures the same
    tensors in a PyTorch layer; its test checks the two agree). Replicated
    parts are split over TP only with sequence parallelism."""
    m, T, w = shape.model, shape.tokens, shape.replicated_width
    sublayers = SUBLAYERS[kind]
    parts: dict[str, float] = {
        # 1 byte each, after each sublayer (after the sum of a parallel block's two)
        "dropout_masks": ((1 if m.parallel_attention else len(sublayers)) if m.dropout else 0) * T * w,
        # Gemma 2/3's norms after the attention and the MLP keep their inputs (the sublayers' outputs), 16-bit.
        "post_norm_inputs": 0 if m.parallel_attention else (m.norms_in(kind) - len(sublayers)) * shape.act_bytes * T * w,
    }
    if "attention" in sublayers:
        parts.update(_attention_parts(shape))
    if "mlp" in sublayers or "moe" in sublayers:
        parts.update(_mlp_parts(shape, moe="moe" in sublayers))
    if m.post_norms_only:
        # OLMo-2: the QKV and up GEMMs read the residual stream itself (kept
        # as their inputs), and each sublayer's norm keeps that sublayer's output.
        parts.pop("input")
        parts.pop("mlp_norm_input")
        parts["post_norm_inputs"] = len(sublayers) * shape.act_bytes * T * w
    if m.parallel_attention:
        # The MLP reads the layer's input (kept once, as "input"), and with
        # one shared norm (Falcon-7B) the attention's normalised input too.
        parts.pop("mlp_norm_input")
        if m.norms_per_layer == 1:
            parts.pop("mlp_input")
    if "mamba" in sublayers:
        parts.update(_mamba_parts(shape))
    return parts


def _attention_parts(shape: Shape) -> dict[str, float]:
    """The attention sublayer's saved tensors."""
    m, t, T, e, w = shape.model, shape.tp, shape.tokens, shape.act_bytes, shape.replicated_width
    q, kv, v, out = m.q_size, m.kv_size, m.v_size, m.attention_output_size
    g = gemm_input_bytes(shape)
    parts = {
        # The layer's input (the attention norm's), 16-bit.
        "input": e * T * w,
        # The attention norm's output, the QKV GEMM's input (fp8 under fp8).
        "qkv_input": g * T * w,
        # Q, K, V, split over TP. Rotary embedding writes new Q and K, but V
        # stays a view into the fused QKV GEMM's output (torch.split in
        # megatron-core's get_query_key_value_tensors) and keeps all of it
        # alive: Q and K are held twice (measured by `loom profile layers`).
        "qkv": e * (q + kv + v + (q + kv) * (m.rotary and m.mla is None)) * T / t,
        # The attention output. The output projection saves that same 16-bit
        # tensor (megatron-core sets TE's save_original_input for it), except
        # under delayed fp8 scaling, which cannot, so it keeps an fp8 copy too.
        "attention_output": (e + g * (shape.precision == "fp8" and shape.features.fp8_recipe == "delayed")) * out * T / t,
        "core_attention": _core_attention_bytes(shape),
        # torchtitan of 2024-12 repeated K and V to every query head before
        # attention, which saves the repeated copies (Features.repeat_kv).
        "repeated_kv": e * (q - kv + m.num_attention_heads * m.v_head_dim - v) * T / t if shape.features.repeat_kv else 0.0,
    }
    if m.mla:  # the query and key/value latents, replicated over TP
        parts["mla_latents"] = e * T * ((m.mla.q_lora_rank or 0) + m.mla.kv_lora_rank + m.mla.qk_rope_head_dim)
    return parts


def _mamba_parts(shape: Shape) -> dict[str, float]:
    """A Mamba-2 sublayer's saved tensors on the memory-efficient path
    megatron-core trains with (use_mamba_mem_eff_path): the in-projection's
    input (its norm's input, 16-bit) and its norm-fused GEMM input (fp8
    under fp8, as TE's LayerNormColumnParallelLinear keeps it); the whole
    in-projection output z, x, B, C, dt and the gated scan output y, which
    mamba_split_conv1d_scan_combined saves (it recomputes the conv1d and the
    chunk states in backward: mamba_ssm ops/triton/ssd_combined.py); the
    [s, b] copy of y the group-wise RMSNorm saves with its fp32 rstd per
    group; and the norm's output, the out-projection's input (fp8 under fp8)."""
    mamba, t, T, e, w = shape.model.mamba, shape.tp, shape.tokens, shape.act_bytes, shape.replicated_width
    g = gemm_input_bytes(shape)
    return {
        "input": e * T * w,
        "in_proj_input": g * T * w,
        "mamba_projections": e * T * mamba.in_proj_size / t,
        "mamba_scan_output": 2 * e * T * mamba.inner_size / t + 4 * T * mamba.num_groups / t,
        "out_proj_input": g * T * mamba.inner_size / t,
    }


def _core_attention_bytes(shape: Shape) -> float:
    """Flash attention keeps only the fp32 log-sum-exp per query row; the
    unfused kernels keep the softmax, its dropout mask and its output (and
    a soft-capped score's tanh)."""
    m = shape.model
    heads_per_rank = m.num_attention_heads / shape.tp
    if shape.features.flash_attention:
        return 4 * shape.micro_batch_size * heads_per_rank * shape.seq_length / shape.cp
    scores = shape.micro_batch_size * heads_per_rank * (shape.seq_length / shape.cp) * shape.seq_length
    capped = shape.act_bytes if m.attention_softcap else 0  # Gemma 2's soft-cap keeps its tanh for backward
    return (shape.act_bytes + capped + (1 + shape.act_bytes if m.attention_dropout else 0)) * scores


def _mlp_parts(shape: Shape, moe: bool) -> dict[str, float]:
    """The MLP sublayer's input (its norm's, the residual after attention,
    16-bit) and that norm's output: the dense MLP's fc1 input (fp8 under
    fp8), or an MoE layer's own TENorm output feeding the router (16-bit).
    The MLP's up-projection outputs (16-bit, the activation function's
    input: SwiGLU keeps gate and up) and the activation's output (the down
    projection's input), split over TP. An MoE layer keeps the same for its
    shared experts (whose up projection also keeps its own copy of the input
    under fp8), and for every routed copy of a token its permuted input, its
    expert's up-projection output and activation, plus the router's fp32
    logits and probabilities (megatron-core's MoE layer and alltoall
    dispatcher); the busiest rank's routed rows (moe.busiest_rows_factor).
    Routed inputs are 16-bit where the experts are (Features.quantized_experts)."""
    m, T, e, g = shape.model, shape.tokens, shape.act_bytes, gemm_input_bytes(shape)
    up = (2 if m.gated_mlp else 1) * e
    norm = {"mlp_norm_input": e * T * shape.replicated_width}
    if not moe:
        return {**norm, "mlp_input": g * T * shape.replicated_width, "mlp": (up + g) * m.ffn_hidden_size * T / shape.tp}
    routed = shape.moe_tokens * m.moe.top_k * shape.etp * busiest_rows_factor(shape)
    expert_width = m.moe.expert_ffn_hidden_size / shape.etp
    expert_input = g if shape.features.quantized_experts else e
    shared = (up + g) * m.moe.shared_ffn_hidden_size * T / shape.tp
    if m.moe.shared_ffn_hidden_size and g != e:
        shared += g * T * shape.replicated_width
    return {
        **norm,
        "moe_norm_output": e * T * shape.replicated_width,
        "shared_experts": shared,
        "routed": routed * (expert_input * m.hidden_size + up * expert_width),
        "routed_activation": routed * expert_input * expert_width,
        "router": 2 * 4 * shape.moe_tokens * m.moe.num_experts,
    }


def op_sac_layer(shape: Shape, moe: bool = False) -> float:
    """Bytes one decoder layer keeps under torchtitan's per-op selective
    checkpointing (selective_ac_option "op"; torchtitan 0.2.2
    distributed/activation_checkpoint.py _apply_op_sac with
    models/llama3/infra/parallelize.py _op_sac_save_list, as at 9dec370):
    the block's input; the attention kernel's output and log-sum-exp; and the
    output of every odd aten.mm of the block in forward order — wq (1st), wv
    (3rd), w1 (5th) and w2 (7th, the partial sum before TP's reduce-scatter,
    whose output is kept too). wk, wo and w3 are recomputed with the norms,
    rotary embedding and activation. torchao's float8 linears call aten.mm
    on its Float8Tensor subclass, and the policy's dispatch mode sees that
    call before the subclass turns it into _scaled_mm (modes dispatch ahead
    of subclasses: torch/utils/_python_dispatch.py), so float8 keeps the
    same (16-bit) outputs. An MoE layer's experts run grouped GEMMs, which
    the list lacks: recomputed."""
    m, t, T, e, w = shape.model, shape.tp, shape.tokens, shape.act_bytes, shape.replicated_width
    kept = e * T * w + _core_attention_bytes(shape) + e * m.attention_output_size * T / t
    kept += e * (m.q_size + m.v_size) * T / t
    if not moe:
        kept += e * m.ffn_hidden_size * T / t + e * m.hidden_size * T * (1 + (1 / t if t > 1 else 0))
    return kept


def decoder_layer(shape: Shape, recompute: str, kind: str = "dense", modules: tuple[str, ...] = ("core_attn",)) -> float:
    """Bytes one decoder layer of ``kind`` keeps for backward under
    ``recompute``: all its parts; under full recompute only its input
    (checkpointed, 16-bit, scattered over TP with SP); under selective recompute its parts less what
    ``modules`` drop (Korthikanti et al. sec. 5: core_attn recomputes the
    attention core from Q, K, V), or with torchtitan's "op" what its per-op
    policy keeps (op_sac_layer)."""
    if recompute == "selective" and modules == (OP_SAC,):
        return op_sac_layer(shape, kind == "moe")
    if recompute == "full":
        return shape.act_bytes * shape.tokens * shape.replicated_width
    parts = layer_parts(shape, kind)
    if recompute == "selective":
        for dropped in {part for module in modules for part in DROPPED_BY_MODULE[module]}:
            parts.pop(dropped, None)
    return sum(parts.values())


def embedding(shape: Shape) -> float:
    """The embedding's dropout mask (its output is the first layer's input),
    and the input BLOOM's norm after the embedding keeps (16-bit)."""
    mask = (shape.tokens * shape.replicated_width) if shape.model.dropout else 0.0
    return mask + shape.act_bytes * shape.tokens * shape.replicated_width * shape.model.embedding_norm


def head(shape: Shape) -> float:
    """Final norm input and output-layer input (the output layer is 16-bit
    even under fp8), plus what the loss saves per logit (and a logit
    soft-cap's tanh, Gemma 2)."""
    m, T = shape.model, shape.tokens
    saved = LOSS_SAVED_BYTES_PER_LOGIT[shape.features.cross_entropy_fusion] + shape.act_bytes * (m.logit_softcap is not None)
    return 2 * shape.act_bytes * T * shape.replicated_width + saved * T * m.vocab_size / shape.tp


def head_transient(shape: Shape) -> float:
    """What the loss holds beside its saved tensor while it runs (PyTorch's
    loss under TP: loss_parallel's)."""
    loss = shape.features.cross_entropy_fusion
    per_logit = LOSS_PARALLEL_TRANSIENT_BYTES_PER_LOGIT if loss == "torch" and shape.tp > 1 else LOSS_TRANSIENT_BYTES_PER_LOGIT[loss]
    return per_logit * shape.tokens * shape.model.vocab_size / shape.tp


def dtensor_head_input_bytes(shape: Shape) -> float:
    """What torchtitan's output layer keeps beyond Megatron's under sequence
    parallelism: its input all-gathered over TP. ColwiseParallel with
    input_layouts Shard(1) redistributes the final norm's output to whole
    sequences before the Linear, which saves that for its weight gradient
    (torchtitan models/llama3/infra/parallelize.py apply_tp; torch
    distributed/tensor/parallel/style.py); Megatron's ColumnParallelLinear
    saves its local shard and gathers it again in backward."""
    if not shape.sequence_parallel:
        return 0.0
    return shape.act_bytes * shape.tokens * shape.model.hidden_size * (1 - 1 / shape.tp)
