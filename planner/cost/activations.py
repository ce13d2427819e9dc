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

from loom.planner.cost.shape import ACT_BYTES, Shape

# The loss per logit, by implementation (--cross-entropy-fusion-impl):
# Megatron's unfused vocab_parallel_cross_entropy and its native fused one
# save the fp32 softmax for backward (4 B) and briefly hold the 16-bit logits
# or their 16-bit gradient beside it (2 B) (megatron/core/tensor_parallel/
# cross_entropy.py, fusions/fused_cross_entropy.py); Transformer Engine's
# fused loss writes the gradient in place into the 16-bit logits and saves
# those (TE 2.9-2.11 pytorch/triton/cross_entropy.py, the versions
# megatron-core 0.16 pins).
LOSS_SAVED_BYTES_PER_LOGIT = {"none": 4, "native": 4, "te": 2}
LOSS_TRANSIENT_BYTES_PER_LOGIT = {"none": 2, "native": 2, "te": 0}


def gemm_input_bytes(shape: Shape) -> float:
    """Bytes per element of a GEMM input Transformer Engine keeps for
    backward: 16-bit, or under fp8 one fp8 copy (1 B), plus MXFP8's scale per
    32 values. After the forward GEMM, TE's Linear and LayerNormLinear keep
    only the column-wise copy the weight gradient needs, or with sequence
    parallelism the row-wise local shard they gather again
    (transformer_engine/pytorch/module/linear.py ``inputmat.update_usage``)."""
    if shape.precision != "fp8":
        return ACT_BYTES
    return 1 + (1 / 32 if shape.features.fp8_recipe == "mxfp8" else 0)


def decoder_layer(shape: Shape, recompute: str, moe: bool = False) -> float:
    """Bytes one decoder layer keeps for backward, per micro batch, per GPU:
    Korthikanti et al.'s count, tensor by tensor (``loom profile layers``
    measures the same tensors in a PyTorch layer; its test checks the two agree)."""
    m, t, T, e = shape.model, shape.tp, shape.tokens, ACT_BYTES
    q, kv, v = m.q_size, m.kv_size, m.v_size
    if recompute == "full":
        # Only each layer's input is checkpointed (scattered over TP with SP).
        return e * T * shape.replicated_width
    g = gemm_input_bytes(shape)
    masks = 2 if m.dropout else 0  # 1-byte dropout masks after attention and MLP
    # Norm inputs (16-bit) and outputs, the QKV and MLP GEMMs' inputs (fp8
    # under fp8; an MoE layer's norm is its own TENorm feeding the router,
    # 16-bit), plus the masks: on every TP rank, or split t ways with
    # sequence parallelism.
    mlp_input = e if moe else g
    replicated = (2 * e + g + mlp_input + masks) * T * shape.replicated_width
    # Q, K, V and the attention output, split over TP. The output projection
    # saves that same 16-bit tensor (megatron-core sets TE's
    # save_original_input for it), except under delayed fp8 scaling, which
    # cannot, so it keeps an fp8 copy too. MLA also keeps its query and
    # key/value latents, replicated.
    split = e * (q + kv + v + m.attention_output_size) * T / t
    if shape.precision == "fp8" and shape.features.fp8_recipe == "delayed":
        split += g * m.attention_output_size * T / t
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
    """The MLP's up-projection outputs (16-bit, the activation function's
    input: SwiGLU keeps gate and up) and the activation's output (the down
    projection's input), split over TP. An MoE layer keeps the same for its
    shared experts (whose up projection also keeps its own copy of the input
    under fp8), and for every routed copy of a token its permuted input and
    its expert's outputs, plus the router's fp32 logits and probabilities
    (megatron-core's MoE layer and alltoall dispatcher)."""
    m, T, e, g = shape.model, shape.tokens, ACT_BYTES, gemm_input_bytes(shape)
    per_width = (2 if m.gated_mlp else 1) * e + g
    if not moe:
        return per_width * m.ffn_hidden_size * T / shape.tp
    routed = shape.moe_tokens * m.moe.top_k * shape.etp
    experts = routed * (g * m.hidden_size + per_width * m.moe.expert_ffn_hidden_size / shape.etp)
    router = 2 * 4 * shape.moe_tokens * m.moe.num_experts
    shared = per_width * m.moe.shared_ffn_hidden_size * T / shape.tp
    if m.moe.shared_ffn_hidden_size and g != e:
        shared += g * T * shape.replicated_width
    return shared + experts + router


def embedding(shape: Shape) -> float:
    """The embedding's dropout mask (its output is the first layer's input)."""
    return (shape.tokens * shape.replicated_width) if shape.model.dropout else 0.0


def head(shape: Shape) -> float:
    """Final norm input and output-layer input (the output layer is 16-bit
    even under fp8), plus what the loss saves per logit."""
    m, T = shape.model, shape.tokens
    saved = LOSS_SAVED_BYTES_PER_LOGIT[shape.features.cross_entropy_fusion]
    return 2 * ACT_BYTES * T * shape.replicated_width + saved * T * m.vocab_size / shape.tp


def head_transient(shape: Shape) -> float:
    """What the loss holds beside its saved tensor while it runs."""
    return LOSS_TRANSIENT_BYTES_PER_LOGIT[shape.features.cross_entropy_fusion] * shape.tokens * shape.model.vocab_size / shape.tp
