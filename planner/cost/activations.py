"""Estimated activation bytes: what each piece of the model keeps for
backward per micro batch on one GPU, and the transient buffers of the loss.

Counted after Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models" (sec. 4), generalised tensor by tensor so that GQA,
gated MLPs, models without dropout, flash attention and context parallelism
fall out of the same count: with GPT-3's shapes it reduces to the paper's
sbh(10 + 24/t + 5as/(ht)) without and 34sbh/t with sequence parallelism.

These are estimates only: ``layers.py`` puts measured bytes (``--profile``)
in their place where a profile covers them.
"""

from __future__ import annotations

from loom.planner.cost.shape import ACT_BYTES, Shape

# Megatron's cross-entropy keeps the softmax of the logits in fp32.
LOGIT_SOFTMAX_BYTES = 4


def decoder_layer(shape: Shape, recompute: str, moe: bool = False) -> float:
    """Bytes one decoder layer keeps for backward, per micro batch, per GPU:
    Korthikanti et al.'s count, tensor by tensor (``loom profile layers``
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


def embedding(shape: Shape) -> float:
    """The embedding's dropout mask (its output is the first layer's input)."""
    return (shape.tokens * shape.replicated_width) if shape.model.dropout else 0.0


def head(shape: Shape) -> float:
    """Final norm input and output-layer input, plus the fp32 softmax the loss keeps."""
    m, T = shape.model, shape.tokens
    return 2 * ACT_BYTES * T * shape.replicated_width + LOGIT_SOFTMAX_BYTES * T * m.vocab_size / shape.tp


def head_transient(shape: Shape) -> float:
    """During the loss: the 16-bit logits and their fp32 gradient."""
    return (ACT_BYTES + 4) * shape.tokens * shape.model.vocab_size / shape.tp
