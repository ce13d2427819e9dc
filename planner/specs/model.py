"""The model spec: a decoder-only transformer, read from a Hugging Face
style ``config.json`` (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Phi-3,
InternLM2, StarCoder2, Nemotron-4, GPT-2, GPT-NeoX; Gemma 1/2/3, BLOOM and
Falcon, which Megatron-LM's pretrain_gpt.py cannot build; the mixture-of-experts Mixtral,
Qwen1.5/2-MoE, Qwen3-MoE, DeepSeek-V2/V3 with their latent attention and
gpt-oss with its sliding-window layers and attention sinks; the hybrid
Mamba-2 / attention Nemotron-H, Nano 2 and Nemotron 3, whose layers are of
several kinds: SUBLAYERS),
and optionally a vision tower feeding it (LLaVA: a CLIP ViT and
an MLP projector).

Only what the memory and time models need is kept; names follow Megatron's
arguments so the emitters can write them out directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path

from loom.planner.specs.errors import SpecError
from loom.planner.specs.files import read_json
from loom.planner.specs.hf_config import LIMITS, MIN_VOCAB, ConfigReader
from loom.profiles.catalogue import model_config_path, model_names

# Families whose MLP is gated (SwiGLU) and which use RMSNorm, RoPE, no biases
# (Qwen2 and Qwen2-MoE: biases on Q, K and V). Phi-3 and InternLM2 fuse Q, K,
# V (qkv_proj, wqkv) and gate/up (gate_up_proj, w1/w3) in their checkpoints;
# the shapes are Llama's.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "phi3", "internlm2", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2",
              "deepseek_v3", "olmo2"}
# OLMo-2 (OLMo Team 2024, "2 OLMo 2 Furious", arXiv 2501.00656, sec. 3;
# transformers' Olmo2Config): Llama's shapes with each sublayer's norm moved
# after it (before the residual add) and a QK norm over all heads at once.
OLMO2 = {"olmo2"}
# RMSNorm on each head's query and key (Qwen3 q_norm/k_norm over head_dim: megatron-core's --qk-layernorm).
QK_NORM_FAMILIES = {"qwen3", "qwen3_moe"}
QKV_BIAS_FAMILIES = {"qwen2", "qwen2_moe"}
# StarCoder2 (Lozhkov et al. 2024): LayerNorm, biases on every linear layer
# (use_bias), a plain GeLU MLP (c_fc, c_proj), RoPE, GQA.
STARCODER2 = {"starcoder2"}
# Families whose ``sliding_window`` (when set) windows every layer
# (transformers' Starcoder2Attention, Phi3Attention, MistralAttention and
# MixtralAttention pass it to each layer; Mistral 7B v0.1's is 4096).
WINDOW_EVERY_LAYER = {"starcoder2", "phi3", "mistral", "mixtral"}
MISTRAL_WINDOW = 4096  # MistralConfig's sliding_window default
# Phi-3-128k and Phi-3.5's rope_scaling types (LongRoPE, formerly "su"):
# priced as RoPE (its factors only rescale the rotation frequencies).
LONGROPE = ("longrope", "su")
# Families (issue #16's, and gpt-oss, whose configs carry YaRN) whose
# rope_scaling loom checks: none, or "dynamic" NTK scaling, which changes
# nothing within max_position_embeddings (transformers' dynamic rope update)
# and so nothing in pre-training.
ROPE_CHECKED = {"qwen3", "phi3", "internlm2", "starcoder2", "qwen2_moe", "nemotron", "falcon", "olmo2", "gpt_oss"}
# YaRN terms megatron-core's multi-head latent attention fixes
# (MLATransformerConfig's original_max_position_embeddings, beta_fast,
# beta_slow; no Megatron-LM core_v0.16.1 flag sets them); DeepSeek-V2 and V3
# were extended from 4K with these.
MLA_YARN_FIXED = {"original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}
# Llama 3.1's frequency scaling as megatron-core applies it (RotaryEmbedding
# _apply_scaling, --use-rope-scaling): only the factor is an argument; the
# rest are fixed at these.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The activation of Llama-like families' gated MLP (transformers' ACT2FN
# names for SiLU): megatron-core's --swiglu.
SWIGLU_ACTIVATIONS = ("silu", "swish")
# gpt-oss (OpenAI 2025, model card sec. 2): RMSNorm, RoPE, GQA, biases on the
# attention, router and experts, a clamped gated MLP, attention sinks, and
# sliding-window attention on the layers ``layer_types`` names.
GPT_OSS = {"gpt_oss"}
# Nemotron-4 (Parmar et al. 2024, "Nemotron-4 15B Technical Report", sec. 2;
# transformers' NemotronConfig): LayerNorm with zero-centred gamma
# (NemotronLayerNorm1P: weight + 1), a plain MLP with squared ReLU ("relu2"),
# no biases, partial RoPE (partial_rotary_factor), untied embeddings.
NEMOTRON = {"nemotron"}
# Gemma (Gemma Team 2024, arXiv 2403.08295, sec. 2; transformers' GemmaConfig,
# Gemma2Config, Gemma3TextConfig): RMSNorm scaled by (1 + gamma), GeGLU
# (a gated MLP with tanh-approximated GeLU), head_dim 256, tied embeddings
# scaled by sqrt(hidden) on input, MQA/GQA. Gemma 2 (arXiv 2408.00118) adds a
# norm after each sublayer (four per layer), logit soft-capping and a
# sliding window on every other layer; Gemma 3 (arXiv 2503.19786) QK norm and
# five sliding layers to one global.
GEMMA = {"gemma", "gemma2", "gemma3_text"}
GEMMA_WINDOW = 4096  # Gemma2Config's and Gemma3TextConfig's default sliding_window
GEMMA_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # the GeLU variants of Gemma's GeGLU
GELU_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python", "gelu_accurate")  # transformers' ACT2FN GeLUs
# The plain-MLP families' activation field and its config-class default
# (GPT2Config activation_function, GPTNeoXConfig and Starcoder2Config hidden_act).
GELU_MLP_ACTIVATION = {"gpt2": ("activation_function", "gelu_new"), "gpt_neox": ("hidden_act", "gelu"),
                       "starcoder2": ("hidden_act", "gelu_pytorch_tanh")}
# BLOOM (BigScience 2022, arXiv 2211.05100, sec. 3.2; transformers' BloomConfig):
# ALiBi instead of position embeddings, a LayerNorm right after the word
# embedding, a 4h GeLU MLP, LayerNorm and biases everywhere, tied embeddings.
BLOOM = {"bloom"}
# Why Megatron-LM's pretrain_gpt.py cannot build a family loom prices (so a
# Megatron plan of it is refused; DeepSpeed runs the user's own model code).
# (Megatron-Bridge builds Gemma on megatron-core with its own layer specs and
# embedding; loom writes pretrain_gpt.py launch files only.)
MEGATRON_CANNOT_BUILD = {
    "gemma": "Gemma from its arguments: its input embedding scaled by sqrt(hidden) (GPTModel does not scale it) and its "
             "tanh-GeLU GLU (the arguments have --swiglu, --squared-relu and --quick-geglu only)",
    "gemma2": "Gemma 2 from its arguments: the scaled embedding, the tanh-GeLU GLU, logit soft-capping and the norm after "
              "each sublayer (the standard layer spec has input and pre-MLP norms only)",
    "gemma3_text": "Gemma 3 from its arguments: the scaled embedding, the tanh-GeLU GLU and the norm after each sublayer "
                   "(the standard layer spec has input and pre-MLP norms only)",
    "bloom": "BLOOM's ALiBi attention biases and its LayerNorm after the word embedding (megatron-core's --position-embedding-type "
             "has learned_absolute, rope, mrope, relative and none; GPTModel has no embedding norm)",
    "olmo2": "OLMo-2's norms after each sublayer's output, before the residual add (post_attention_layernorm, "
             "post_feedforward_layernorm; no input norm), which megatron-core's transformer layer (input_layernorm, "
             "pre_mlp_layernorm) cannot place, and its QK norm across all heads (q_norm over heads x head_dim; "
             "--qk-layernorm normalises each head on its own)",
    "gpt_neox": "GPT-NeoX's parallel attention and MLP (use_parallel_residual: both on the layer's input, added into one "
                "residual: megatron-core's TransformerLayer runs the MLP after the attention)",
    "falcon": "Falcon's parallel attention and MLP (both on the layer's input, added into one residual: megatron-core's "
              "TransformerLayer runs the MLP after the attention) or Falcon-RW's ALiBi",
}
# Families with latent attention (DeepSeek-V2, Liu et al. 2024, sec. 2.1).
MLA_FAMILIES = {"deepseek_v2", "deepseek_v3"}
# Families Megatron-LM's pretrain_gpt.py cannot build as published, and why:
# loom would price one model and launch another.
UNBUILDABLE = {
    "olmoe": "a family Megatron-LM can build: OLMoE's QK norm normalises all heads' queries (and keys) together "
             "(q_norm over hidden_size), megatron-core's --qk-layernorm each head on its own",
    "phimoe": "a family Megatron-LM can build: Phi-3.5-MoE has biases on Q, K, V and the attention output and on the "
              "LM head but none in its experts; Megatron has --add-qkv-bias or biases on every linear layer, and no LM-head bias",
}
# BLOOM's pre-training sequence, standing in for the position limit its config lacks (ALiBi has none).
BLOOM_POSITIONS = 2048
# Families with a plain GeLU MLP, LayerNorm and biases everywhere.
GPT_LIKE = {"gpt2", "gpt_neox"}
# Falcon (Almazrouei et al. 2023, arXiv 2311.16867; transformers'
# FalconConfig and FalconDecoderLayer): attention and a 4h GeLU MLP side by
# side on the layer's input (parallel_attn), one shared LayerNorm (Falcon-7B)
# or one each (new_decoder_architecture, num_ln_in_parallel_attn: 40B,
# 180B), multi-query attention (7B) or num_kv_heads groups, RoPE, no biases,
# tied embeddings; Falcon-RW: sequential layers with ALiBi.
FALCON = {"falcon"}
FALCON_POSITIONS = 2048  # FalconConfig's default max_position_embeddings, which Falcon-7B's and 40B's configs leave out
# Architectures outside loom's scope, by what they are (transformers' model_type).
OUT_OF_SCOPE = {
    "an encoder-decoder model": {"t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "whisper", "longt5", "switch_transformers"},
    "an encoder-only model": {"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "distilbert", "albert", "modernbert"},
    "a vision-only model": {"vit", "clip_vision_model", "siglip_vision_model", "dinov2", "convnext", "swin", "resnet"},
    "a pure state-space or recurrent model (Mamba-2 hybrids with attention read as nemotron_h)": {"mamba", "mamba2", "rwkv",
                                                                                                    "falcon_mamba"},
    "a hybrid state-space model of another family (loom reads Nemotron-H's, nemotron_h)": {"jamba", "zamba", "zamba2", "bamba",
                                                                                             "granitemoehybrid", "falcon_h1"},
}
# Vision-language models: a vision encoder, a projector, a language model.
VISION_LANGUAGE = {"llava"}
# Hybrid Mamba-2 / attention models (Nemotron-H, NVIDIA 2025, arXiv
# 2504.03624; Nemotron Nano 2 and Nemotron 3; transformers' NemotronHConfig):
# one sublayer per layer as ``hybrid_override_pattern`` lays them out, each
# behind its own RMSNorm; attention without position embeddings, a
# squared-ReLU MLP, no biases, untied embeddings.
HYBRID = {"nemotron_h"}

# The sublayers of each kind of layer, each behind its own pre-norm and
# residual add. A transformer layer has an attention and an MLP sublayer;
# a hybrid model's layers are one sublayer each, in the order megatron-core's
# hybrid pattern gives (ssm/mamba_hybrid_layer_allocation.py Symbols: M
# Mamba, * attention, - MLP, E MoE; mamba_block.py builds a MambaLayer,
# TransformerLayer with attention only, MLPLayer or MoE layer for each).
SUBLAYERS = {"dense": ("attention", "mlp"), "moe": ("attention", "moe"), "mamba": ("mamba",), "attention": ("attention",),
             "mlp": ("mlp",), "moe_mlp": ("moe",)}
HYBRID_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe_mlp"}


@dataclass(frozen=True)
class MoE:
    """Mixture-of-experts MLPs: a router sends each token to ``top_k`` of
    ``num_experts`` gated MLPs (Shazeer et al. 2017; Mixtral, Jiang et al.
    2024); shared experts see every token and the first layers may keep a
    dense MLP (DeepSeekMoE, Dai et al. 2024; DeepSeek-V3)."""

    num_experts: int
    top_k: int
    expert_ffn_hidden_size: int
    shared_ffn_hidden_size: int = 0  # all shared experts together
    first_dense_layers: int = 0
    bias: bool = False  # biases on the router and in every expert (gpt-oss)
    # Qwen2-MoE: sigmoid(x . w) scales the shared expert's output, one weight
    # vector of hidden size (megatron-core's moe_shared_expert_gate).
    shared_gate: bool = False
    # Softmax over all experts before the top-k, the k weights not renormalised
    # (Hugging Face's norm_topk_prob false; megatron-core's moe_router_pre_softmax).
    pre_softmax: bool = False
    # Gated experts (SwiGLU: gate and up projections), or plain ones (up
    # only: Nemotron 3's squared-ReLU experts).
    gated: bool = True
    # Nemotron 3's router (transformers' NemotronHTopkRouter; Megatron-Bridge's
    # Nemotron3NanoProvider): sigmoid scores with a learned per-expert bias on
    # the top-k choice, the chosen weights scaled by topk_scaling_factor.
    # Launch flags only: the router's kernels are priced alike.
    sigmoid_router: bool = False
    topk_scaling_factor: float | None = None
    # DeepSeek's group-limited routing: experts in ``router_groups`` groups,
    # each token's top-k drawn from its best ``router_group_topk`` groups
    # (n_group, topk_group; --moe-router-num-groups, --moe-router-group-topk).
    router_groups: int = 1
    router_group_topk: int = 1
    # The load-balancing loss the model trained with (launch flags only: its
    # kernels are priced alike): its coefficient (Switch Transformer's
    # auxiliary loss, Fedus et al. 2021; transformers' router_aux_loss_coef,
    # DeepSeek's aux_loss_alpha), per sequence where DeepSeek's seq_aux says
    # so (megatron-core's seq_aux_loss); None: none given (Megatron's default, none).
    aux_loss_coeff: float | None = None
    seq_aux_loss: bool = False

    def most_imbalance(self, ep: int) -> float:
        """The largest busiest/mean load ratio routing can reach at expert
        parallel size ``ep``: a token's top_k copies go to distinct experts,
        so a rank holding num_experts / ep of them receives at most
        min(top_k, that) copies of each token, against top_k / ep on average
        (num_experts / top_k at most, at any EP)."""
        return ep * min(self.top_k, max(1, self.num_experts // ep)) / self.top_k

    @property
    def up_projections(self) -> int:
        """How many hidden -> width projections an expert has (gate and up, or up)."""
        return 2 if self.gated else 1

    def expert_params(self, hidden: int) -> int:
        """One routed expert (gate, up and down projections, and their biases)."""
        f, up = self.expert_ffn_hidden_size, self.up_projections
        return (up + 1) * hidden * f + (up * f + hidden) * self.bias

    def router_params(self, hidden: int) -> int:
        return (hidden + self.bias) * self.num_experts

    def layer_params(self, hidden: int) -> int:
        """Router, routed and shared experts of one MoE layer."""
        return self.router_params(hidden) + self.num_experts * self.expert_params(hidden) + self.shared_params(hidden)

    def shared_params(self, hidden: int) -> int:
        """The shared experts (gate, up, down) and their output gate."""
        return (self.up_projections + 1) * hidden * self.shared_ffn_hidden_size + hidden * self.shared_gate

    def active_params(self, hidden: int) -> int:
        """The MLP weights one token multiplies in an MoE layer."""
        return self.router_params(hidden) + self.top_k * self.expert_params(hidden) + self.shared_params(hidden)


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, sec. 2.1):
    queries and keys/values pass through low-rank latents; each head's query
    and key have a non-rotary and a rotary part."""

    q_lora_rank: int | None  # None: a full-rank query projection
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # YaRN on the rotary part (Peng et al. 2023, arXiv 2309.00071; DeepSeek-V2
    # sec. 3.3): the frequency scaling factor (None: unscaled rotary
    # embeddings) and the attention-temperature terms of DeepSeek's
    # yarn_get_mscale, mscale over the rotary part and mscale_all_dim over the
    # softmax scale (megatron-core's YarnRotaryEmbedding and MLA softmax_scale).
    rope_scaling_factor: float | None = None
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def params(self, hidden: int, heads: int) -> int:
        if self.q_lora_rank:
            query = hidden * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * self.qk_head_dim
        else:
            query = hidden * heads * self.qk_head_dim
        key_value = hidden * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        key_value += self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        return query + key_value + heads * self.v_head_dim * hidden


@dataclass(frozen=True)
class Mamba:
    """A Mamba-2 mixer (Dao and Gu 2024, "Transformers are SSMs", arXiv
    2405.21060, sec. 7; megatron-core ssm/mamba_mixer.py): one input
    projection to z, x, B, C and dt (z and x ``num_heads`` x ``head_dim``
    wide, B and C ``num_groups`` x ``state_size``, dt one per head), a
    depthwise causal conv1d over x, B and C, the chunked SSD scan, a
    group-wise RMSNorm of y * silu(z), and the output projection."""

    num_heads: int  # H
    head_dim: int  # P
    state_size: int  # N (d_state)
    num_groups: int  # G: heads in a group share B and C
    conv_kernel: int = 4  # d_conv
    chunk_size: int = 128  # the SSD kernels' block length Q (megatron-core's default)

    @property
    def inner_size(self) -> int:
        """d_inner = H x P: the width of x, z and y."""
        return self.num_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        """x, B and C, which the conv1d runs over."""
        return self.inner_size + 2 * self.num_groups * self.state_size

    @property
    def in_proj_size(self) -> int:
        """The input projection's output: z, x, B, C and dt."""
        return 2 * self.inner_size + 2 * self.num_groups * self.state_size + self.num_heads

    def params(self, hidden: int) -> int:
        """In and out projections (no biases: megatron-core asserts none), the
        conv1d's weights and biases, dt_bias, A_log and D per head, the
        gated norm's weight."""
        conv = self.conv_channels * (self.conv_kernel + 1)
        return hidden * self.in_proj_size + conv + 3 * self.num_heads + self.inner_size + self.inner_size * hidden


@dataclass(frozen=True)
class Yarn:
    """YaRN on a standard attention's rotary embeddings (Peng et al. 2023,
    arXiv 2309.00071; transformers' _compute_yarn_parameters): frequencies
    of fewer than ``beta_slow`` rotations over the original context are
    interpolated by ``factor``, those of more than ``beta_fast`` kept, a ramp
    between; ``truncate`` rounds the ramp's ends to whole dimensions."""

    factor: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_positions: int = 4096
    truncate: bool = True


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (GQA); == heads for MHA
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    gated_mlp: bool  # SwiGLU: gate and up projections
    tied_embeddings: bool
    learned_position_embeddings: bool  # GPT-2 style; otherwise rotary
    linear_bias: bool  # biases in the linear layers (GPT) or none (Llama)
    qkv_bias: bool  # Qwen2 has biases on Q, K, V only
    normalization: str  # "LayerNorm" | "RMSNorm" (Megatron's spelling)
    dropout: float  # hidden (residual) dropout during pre-training
    attention_dropout: float = 0.0  # dropout on the attention probabilities (Megatron's --attention-dropout)
    kv_channels: int | None = None  # head dim when not hidden / heads (Mistral-NeMo, Qwen3)
    rope_theta: float = 10000.0  # rotary base (Llama 3: 500000)
    # Llama 3.1's rope_scaling (rope_type llama3): megatron-core's --use-rope-scaling factor; None: unscaled.
    rope_scaling_factor: float | None = None
    # YaRN rope_scaling outside MLA (gpt-oss; Qwen3 for long context): Megatron-LM
    # core_v0.16.1 writes YaRN for MLA only, torchtitan's gpt_oss builds it. None: none.
    yarn: Yarn | None = None
    rotary_percent: float = 1.0  # the share of each head's dims RoPE rotates (Phi-3's partial_rotary_factor)
    norm_epsilon: float = 1e-5
    causal: bool = True  # decoders mask the future; vision encoders attend to all patches
    vision: VisionTower | None = None  # image encoder feeding the first layer
    moe: MoE | None = None  # mixture-of-experts MLPs
    mla: MLA | None = None  # multi-head latent attention
    qk_norm: bool = False  # RMSNorm on each head's query and key (Qwen3)
    qk_norm_across_heads: bool = False  # OLMo-2's QK norm: one RMSNorm over all heads' queries (and keys), not one per head
    post_norms_only: bool = False  # each sublayer's norm after it, before the residual add, and none before (OLMo-2)
    mtp_layers: int = 0  # multi-token prediction modules after the last layer (DeepSeek-V3)
    # Sliding-window attention (gpt-oss): in the layers ``window_layers``
    # marks, a query attends to itself and the sliding_window - 1 keys before
    # it (Hugging Face's sliding_window; Beltagy et al. 2020, Longformer).
    sliding_window: int | None = None
    window_layers: tuple[bool, ...] = ()  # per layer, from layer_types; () with no window
    attention_sinks: bool = False  # a learned per-head logit in every softmax's denominator (gpt-oss)
    glu_clamp: float | None = None  # gpt-oss's gated MLP: (up + 1) * gate * sigmoid(1.702 gate), both clamped at this
    squared_relu: bool = False  # a plain MLP's activation is relu(x)^2 (Nemotron-4), not GeLU: same GEMMs, one elementwise pass
    layernorm_1p: bool = False  # LayerNorm scaled by (1 + gamma), gamma initialised at 0 (Nemotron-4): the same parameters
    norms_per_layer: int = 2  # before attention and MLP; Gemma 2/3 add one after each (post-norms): 4; Falcon-7B's shared one: 1
    megatron_unbuildable: str | None = None  # why Megatron-LM's pretrain_gpt.py cannot build it (None: it can)
    attention_softcap: float | None = None  # Gemma 2's tanh cap on the attention scores (attn_logit_softcapping)
    logit_softcap: float | None = None  # Gemma 2's tanh cap on the output logits (final_logit_softcapping)
    alibi: bool = False  # ALiBi's per-head linear biases on the attention scores instead of position embeddings (BLOOM)
    embedding_norm: bool = False  # a norm right after the word embedding (BLOOM's word_embeddings_layernorm)
    no_position_embedding: bool = False  # attention without any position information (Nemotron-H: NoPE)
    # Attention and MLP side by side on the layer's input, their outputs
    # added into one residual (Falcon; GPT-J): norms_per_layer norms feed them.
    parallel_attention: bool = False
    mamba: Mamba | None = None  # the Mamba-2 mixers of a hybrid model
    hybrid_pattern: str = ""  # a hybrid model's layers, one HYBRID_SYMBOLS character each ("" for transformer layers)

    def __hash__(self) -> int:
        """The fields' hash, computed once: specs are keys of the cost
        models' caches, looked up millions of times in a search."""
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, field.name) for field in fields(self)))

    @property
    def rotary(self) -> bool:
        """Whether the attention applies rotary embeddings to Q and K."""
        return not (self.learned_position_embeddings or self.alibi or self.no_position_embedding)

    def layer_kind(self, layer: int) -> str:
        """The kind (a SUBLAYERS key) of decoder layer ``layer`` (0-based)."""
        if self.hybrid_pattern:
            return HYBRID_SYMBOLS[self.hybrid_pattern[layer]]
        return "moe" if self.is_moe_layer(layer) else "dense"

    def layer_kinds_in(self, first: int, count: int) -> tuple[tuple[str, int], ...]:
        """(kind, how many) of layers [first, first + count), in SUBLAYERS'
        order, kinds absent from the range left out (remembered per range:
        the search asks for the same few ranges millions of times)."""
        found = self._layer_kinds_memo.get((first, count))
        if found is None:
            found = self._layer_kinds_memo[first, count] = self._count_layer_kinds(first, count)
        return found

    @cached_property
    def _layer_kinds_memo(self) -> dict[tuple[int, int], tuple[tuple[str, int], ...]]:
        return {}

    def _count_layer_kinds(self, first: int, count: int) -> tuple[tuple[str, int], ...]:
        if self.hybrid_pattern:
            window = self.hybrid_pattern[first:first + count]
            counts = {kind: window.count(symbol) for symbol, kind in HYBRID_SYMBOLS.items()}
        else:
            moe = self.moe_layers_in(first, count)
            counts = {"dense": count - moe, "moe": moe}
        return tuple((kind, counts[kind]) for kind in SUBLAYERS if counts.get(kind))

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The kinds of layer the model has, in SUBLAYERS' order."""
        return tuple(kind for kind, _ in self.layer_kinds_in(0, self.num_layers))

    @property
    def qk_norm_params(self) -> int:
        """The QK norms' weights: one head dim each (Qwen3), or the whole query and key widths (OLMo-2)."""
        if not self.qk_norm:
            return 0
        return self.q_size + self.kv_size if self.qk_norm_across_heads else 2 * self.head_dim

    def norms_in(self, kind: str) -> int:
        """Norms in one layer of ``kind``: each sublayer's pre-norm (and
        Gemma 2/3's post-norm), or a parallel block's norms_per_layer."""
        return self.norms_per_layer if self.parallel_attention else self.norms_per_layer // 2 * len(SUBLAYERS[kind])

    def sublayers_in(self, first: int, count: int, sublayer: str) -> int:
        """How many of layers [first, first + count) have ``sublayer``."""
        return sum(n for kind, n in self.layer_kinds_in(first, count) if sublayer in SUBLAYERS[kind])

    @property
    def windowed_layers(self) -> int:
        """How many layers attend within the sliding window."""
        return sum(self.window_layers) if self.sliding_window else 0

    def window_binds(self, seq_length: int) -> bool:
        """A sliding window narrower than the sequence: at or beyond it, every
        query sees all its keys and the layers are plain causal attention."""
        return bool(self.sliding_window) and self.sliding_window < seq_length

    def is_moe_layer(self, layer: int) -> bool:
        if self.hybrid_pattern:
            return self.hybrid_pattern[layer] == "E"
        return self.moe is not None and layer >= self.moe.first_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.moe_layers_in(0, self.num_layers)

    def moe_layers_in(self, first: int, count: int) -> int:
        """How many of layers [first, first + count) have an MoE MLP."""
        if self.moe is None:
            return 0
        if self.hybrid_pattern:
            return self.hybrid_pattern[first:first + count].count("E")
        return max(0, first + count - max(first, self.moe.first_dense_layers))

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """Per head width of Q and K (MLA: non-rotary plus rotary part)."""
        return self.mla.qk_head_dim if self.mla else self.head_dim

    @property
    def v_head_dim(self) -> int:
        return self.mla.v_head_dim if self.mla else self.head_dim

    @property
    def q_size(self) -> int:
        """Width of Q: heads x head dim."""
        return self.num_attention_heads * self.qk_head_dim

    @property
    def kv_size(self) -> int:
        """Width of K: query groups x head dim (MLA: every head has its own key)."""
        return self.num_query_groups * self.qk_head_dim

    @property
    def v_size(self) -> int:
        return self.num_query_groups * self.v_head_dim

    @property
    def attention_output_size(self) -> int:
        """Width of the attention output, the projection's input."""
        return self.num_attention_heads * self.v_head_dim

    # --- parameter counts (whole model, before any parallel split) ---------
    def attention_weights(self) -> int:
        """The attention's GEMM weights: QKV (MLA: latents and up-projections) and output."""
        if self.mla:
            return self.mla.params(self.hidden_size, self.num_attention_heads)
        return self.hidden_size * (self.q_size + self.kv_size + self.v_size) + self.attention_output_size * self.hidden_size

    def attention_params(self) -> int:
        biases = (self.q_size + self.kv_size + self.v_size) * (self.linear_bias or self.qkv_bias) + self.hidden_size * self.linear_bias
        return self.attention_weights() + biases

    def mlp_params(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        up = (2 if self.gated_mlp else 1) * h * f
        biases = ((2 if self.gated_mlp else 1) * f + h) * self.linear_bias
        return up + h * f + biases

    def norm_params(self) -> int:
        """Parameters of one norm (LayerNorm has a bias, RMSNorm not)."""
        return self.hidden_size * (2 if self.normalization == "LayerNorm" else 1)

    def sublayer_params(self, sublayer: str) -> int:
        """One sublayer's weights, its norms excluded: the attention (with
        QK norms and sinks), a dense or MoE MLP, or a Mamba mixer."""
        if sublayer == "attention":
            return self.attention_params() + self.qk_norm_params + self.num_attention_heads * self.attention_sinks
        if sublayer == "mlp":
            return self.mlp_params()
        if sublayer == "moe":
            return self.moe.layer_params(self.hidden_size)
        return self.mamba.params(self.hidden_size)

    def layer_params(self, kind: str = "dense") -> int:
        """One decoder layer of ``kind`` (a SUBLAYERS key): its sublayers
        and their norms (one before each, and Gemma 2/3's one after each)."""
        return sum(self.sublayer_params(sublayer) for sublayer in SUBLAYERS[kind]) + self.norms_in(kind) * self.norm_params()

    def embedding_params(self) -> int:
        """The word (and learned position) embedding, and BLOOM's norm after it."""
        positions = self.max_position_embeddings * self.hidden_size if self.learned_position_embeddings else 0
        return self.vocab_size * self.hidden_size + positions + self.norm_params() * self.embedding_norm

    def head_params(self) -> int:
        """Final norm plus the output projection (shared when embeddings are tied)."""
        output = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        return self.norm_params() + output

    def mtp_params(self) -> int:
        """Each multi-token prediction module: two norms, a 2h -> h projection
        and one MoE layer; it shares the embedding and the output layer."""
        h = self.hidden_size
        return self.mtp_layers * (2 * self.norm_params() + 2 * h * h + self.layer_params("moe" if self.moe is not None else "dense"))

    def total_params(self) -> int:
        vision = self.vision.params(self.hidden_size) if self.vision else 0
        layers = sum(count * self.layer_params(kind) for kind, count in self.layer_kinds_in(0, self.num_layers))
        return layers + self.embedding_params() + self.head_params() + vision + self.mtp_params()

    def active_params(self, input_embedding: bool = True) -> int:
        """The weights one token multiplies: total_params less the routed
        experts it is not sent to (in every MoE layer and MTP module).
        Model cards differ on the input embedding (a lookup, not a GEMM):
        Qwen, OLMoE and Phi count it, DeepSeek and OpenAI (gpt-oss) do not;
        an output layer tied to it is counted either way."""
        idle = 0
        if self.moe is not None:
            h, moe = self.hidden_size, self.moe
            idle = (self.num_moe_layers + self.mtp_layers) * (moe.layer_params(h) - moe.active_params(h))
        embedding = 0 if input_embedding or self.tied_embeddings else self.embedding_params()
        return self.total_params() - idle - embedding


@dataclass(frozen=True)
class VisionTower:
    """A ViT encoder whose patch features a 2-layer MLP projects into the
    language model's hidden size (LLaVA, Liu et al. 2023). Megatron runs it
    on the first pipeline stage with the text embedding (its LLaVA model
    builds the encoder where ``add_encoder``: pipeline rank 0)."""

    encoder: ModelSpec  # non-causal, learned positions, LayerNorm, GeLU MLP
    image_tokens: int  # patches per image, the encoder's sequence length
    channels: int = 3
    patch_size: int = 14

    def params(self, text_hidden: int) -> int:
        enc = self.encoder
        patch_embedding = self.channels * self.patch_size**2 * enc.hidden_size
        positions = (self.image_tokens + 1) * enc.hidden_size  # + class token
        projector = enc.hidden_size * text_hidden + text_hidden * text_hidden + 2 * text_hidden
        return enc.num_layers * enc.layer_params() + patch_embedding + positions + projector


# Hugging Face LlamaConfig's defaults (transformers configuration_llama.py),
# for a nested text_config that leaves them out (LLaVA's published config).
LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}


def _vision_language(read: ConfigReader, name: str) -> ModelSpec:
    """LLaVA-style: ``text_config`` is a Llama-family decoder (Hugging Face's
    LlamaConfig defaults fill what it leaves out) and ``vision_config`` a
    CLIP ViT (pre-LayerNorm, GeLU MLP, biases)."""
    text, vision = read.nested("text_config"), read.nested("vision_config")
    for key in ("text_config", "vision_config"):
        read.require(key in read.config, key, "the sub-model's fields (a vision-language config nests its language and vision models)")
    read.check()
    if text.str("model_type", "llama") == "llama":
        text = ConfigReader({**LLAMA_DEFAULTS, **text.config}, text.source, text.prefix, text.problems)
    language = _decoder(text, name)
    image_size = vision.int("image_size", high=1 << 16)
    patch_size = vision.int("patch_size", high=1 << 12)
    hidden = vision.int("hidden_size", high=LIMITS["width"])
    heads = vision.int("num_attention_heads", high=LIMITS["heads"])
    vision.require(hidden % heads == 0, "num_attention_heads", f"a divisor of hidden size {hidden}", heads, given=("hidden_size", "num_attention_heads"))
    vision.require(patch_size <= image_size, "patch_size", f"at most the image size {image_size}", patch_size, given=("image_size", "patch_size"))
    patches = max(1, image_size // patch_size) ** 2
    encoder = ModelSpec(
        name=f"{name}-vision",
        num_layers=vision.int("num_hidden_layers", high=LIMITS["layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        ffn_hidden_size=vision.int("intermediate_size", high=LIMITS["width"]),
        vocab_size=1,  # no vocabulary: patches are embedded by a convolution
        max_position_embeddings=patches + 1,
        gated_mlp=False,
        tied_embeddings=False,
        learned_position_embeddings=True,
        linear_bias=True,
        qkv_bias=False,
        normalization="LayerNorm",
        dropout=0.0,
        norm_epsilon=vision.number("layer_norm_eps", default=1e-5, high=1.0, above_low=True, below_high=True),
        causal=False,
    )
    read.check()
    tower = VisionTower(encoder=encoder, image_tokens=patches, patch_size=patch_size)
    return replace(language, vision=tower)


def model_from_hf_config(config: dict, name: str, source: str) -> ModelSpec:
    """Build a spec from the fields of a Hugging Face ``config.json``; every
    field is checked (hf_config.py), and a SpecError names every problem."""
    read = ConfigReader(config, source)
    family = read.str("model_type")
    read.check()
    if family in VISION_LANGUAGE:
        return _vision_language(read, name)
    spec = _hybrid(read, name) if family in HYBRID else _decoder(read, name)
    read.check()
    return spec


def _decoder(read: ConfigReader, name: str) -> ModelSpec:
    """A decoder-only language model of a family loom reads."""
    family = read.str("model_type")
    if family in UNBUILDABLE:
        read.require(False, "model_type", UNBUILDABLE[family], family)
        read.check()
    known = LLAMA_LIKE | GPT_LIKE | GPT_OSS | STARCODER2 | NEMOTRON | GEMMA | BLOOM | FALCON
    if family not in known:
        where = " (its language model nested under text_config)" if read.has("text_config") else ""
        why = next((f"; it is {reason}, and loom plans decoder language models" for reason, families in OUT_OF_SCOPE.items()
                    if family in families or read.bool("is_encoder_decoder", False) and reason == "an encoder-decoder model"), "")
        read.require(False, "model_type", f"one of {sorted(known | HYBRID | VISION_LANGUAGE)}{where}{why}", family)
        read.check()
    # BloomConfig lets n_embed win over hidden_size
    hidden = read.int(*(("n_embed", "hidden_size") if family in BLOOM else ("hidden_size", "n_embd")), high=LIMITS["width"])
    heads = read.int("num_attention_heads", "n_head", high=LIMITS["heads"])
    kv_heads = read.int("num_key_value_heads", default=heads, high=LIMITS["heads"])
    head_dim = read.int("head_dim", default=0, low=1, high=LIMITS["width"]) or None
    read.require(head_dim is not None or hidden % heads == 0, "num_attention_heads", f"a divisor of hidden size {hidden} (or an explicit head_dim)",
                 heads, given=("hidden_size", "n_embd", "num_attention_heads", "n_head"))
    read.require(heads % kv_heads == 0, "num_key_value_heads", f"a divisor of {heads} attention heads", kv_heads,
                 given=("num_attention_heads", "n_head", "num_key_value_heads"))
    num_layers = read.int("num_hidden_layers", "n_layer", high=LIMITS["layers"])
    gpt_oss = family in GPT_OSS
    llama_like = family in LLAMA_LIKE or gpt_oss or family in GEMMA
    if gpt_oss:
        # Megatron's add_bias_linear puts biases on every linear layer at once:
        # gpt-oss's experts and router always have them, so its attention must too.
        read.require(read.bool("attention_bias", True), "attention_bias", "true for gpt_oss (its experts and router have biases; "
                     "Megatron biases all linear layers or none)", False)
    _check_family(read, family)
    starcoder2 = family in STARCODER2
    # transformers' defaults: GPT2Config's resid_pdrop and attn_pdrop 0.1, the
    # other families' hidden and attention dropout 0.0.
    dropout = read.number("resid_pdrop", "hidden_dropout", "residual_dropout", default=0.1 if family == "gpt2" else 0.0, high=1.0,
                          below_high=True)
    attention_dropout = read.number("attn_pdrop", "attention_dropout", default=0.1 if family == "gpt2" else 0.0, high=1.0, below_high=True)
    spec = ModelSpec(
        name=name,
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        # GPT-2's n_inner null is 4h (GPT2MLP), Falcon's width is read below;
        # every other family's config class has its own default, so the field is required.
        ffn_hidden_size=4 * hidden if family in BLOOM else read.int("intermediate_size", "n_inner", high=LIMITS["width"],
                                                                    default=4 * hidden if family in {"gpt2"} | FALCON else None),
        vocab_size=read.int("vocab_size", low=MIN_VOCAB, high=LIMITS["vocab"], placeholder=MIN_VOCAB),
        # ALiBi has no position table: BLOOM's config names no limit (its 2,048-token pre-training length stands in)
        max_position_embeddings=read.int("max_position_embeddings", "n_positions", default={"bloom": BLOOM_POSITIONS, "falcon": FALCON_POSITIONS}.get(family),
                                         high=LIMITS["positions"]),
        gated_mlp=llama_like,
        # transformers' defaults: GPT-2 and StarCoder2 tie, the others here do not (Nemotron, Gemma and BLOOM: below).
        tied_embeddings=read.bool("tie_word_embeddings", family in ("gpt2", "starcoder2")),
        learned_position_embeddings=family == "gpt2",
        linear_bias=read.bool("use_bias", True) if starcoder2 else not llama_like or gpt_oss,
        qkv_bias=family in QKV_BIAS_FAMILIES,
        normalization="RMSNorm" if llama_like else "LayerNorm",
        dropout=dropout,
        attention_dropout=attention_dropout,
        kv_channels=head_dim if head_dim != hidden // heads else None,
        rope_theta=_rope_theta(read),
        rope_scaling_factor=_rope_scaling_factor(read, family) if family in LLAMA_LIKE - ROPE_CHECKED - MLA_FAMILIES else None,
        rotary_percent=_rotary_percent(read, family),
        # The LayerNorm families' config classes default to 1e-5; the RMSNorm
        # ones differ (LlamaConfig 1e-6, MixtralConfig 1e-5), so it is required.
        norm_epsilon=read.number("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps",
                                 default=None if llama_like else 1e-5, high=1.0, above_low=True, below_high=True),
        moe=_moe(read, family, num_layers),
        mla=_mla(read) if family in MLA_FAMILIES else None,
        qk_norm=family in QK_NORM_FAMILIES,
        mtp_layers=read.int("num_nextn_predict_layers", default=0, low=0, high=LIMITS["layers"]),
    )
    if family not in MLA_FAMILIES:
        spec = replace(spec, yarn=_yarn(read, spec.max_position_embeddings))
    if family in NEMOTRON:  # transformers' NemotronConfig defaults: no attention or MLP biases, untied
        spec = replace(spec, linear_bias=False, squared_relu=True, layernorm_1p=True, tied_embeddings=read.bool("tie_word_embeddings", False))
    if family in FALCON:
        spec = _falcon(read, spec)
    if family == "phi3" and _rope_scaling(read)[2] in LONGROPE:
        spec = replace(spec, megatron_unbuildable="Phi-3's LongRoPE: a rescaling factor per rotary dimension (short_factor, "
                                                  "long_factor), which Megatron-LM core_v0.16.1's rotary embeddings do not have")
    if family == "gpt_neox":
        # GPTNeoXConfig: use_parallel_residual (default true) runs attention
        # and MLP side by side on the layer's input, each with its own LayerNorm.
        parallel = read.bool("use_parallel_residual", True)
        spec = replace(spec, parallel_attention=parallel, megatron_unbuildable=MEGATRON_CANNOT_BUILD["gpt_neox"] if parallel else None)
    if family in OLMO2:
        spec = replace(spec, qk_norm=True, qk_norm_across_heads=True, post_norms_only=True, megatron_unbuildable=MEGATRON_CANNOT_BUILD[family])
    if family in BLOOM:  # transformers' BloomConfig: tied by default, biases everywhere
        spec = replace(spec, tied_embeddings=read.bool("tie_word_embeddings", True), alibi=True, embedding_norm=True,
                       megatron_unbuildable=MEGATRON_CANNOT_BUILD[family])
    if family in GEMMA:  # transformers' Gemma configs tie the embeddings by default
        spec = replace(spec, tied_embeddings=read.bool("tie_word_embeddings", True), norms_per_layer=2 if family == "gemma" else 4,
                       qk_norm=family == "gemma3_text", megatron_unbuildable=MEGATRON_CANNOT_BUILD[family])
        if family != "gemma":
            period = 2 if family == "gemma2" else read.int("sliding_window_pattern", default=6)
            window, layers = _sliding_window(read, num_layers, period, default=GEMMA_WINDOW)
            caps = [read.number(key, default=0.0, high=1e6) if read.config.get(key) is not None else 0.0
                    for key in ("attn_logit_softcapping", "final_logit_softcapping")]
            spec = replace(spec, sliding_window=window, window_layers=layers, attention_softcap=caps[0] or None, logit_softcap=caps[1] or None)
    if gpt_oss:
        window, layers = _sliding_window(read, num_layers, 2)
        spec = replace(spec, sliding_window=window, window_layers=layers, attention_sinks=True,
                       glu_clamp=read.number("swiglu_limit", default=7.0, high=1e6, above_low=True))
    elif family in WINDOW_EVERY_LAYER:
        # MistralConfig's sliding_window defaults to 4096 (a null one is none); the others' to none.
        default = MISTRAL_WINDOW if family == "mistral" and "sliding_window" not in read.config else 0
        window = read.int("sliding_window", default=default, low=1, high=LIMITS["positions"]) or None
        if window:
            spec = replace(spec, sliding_window=window, window_layers=(True,) * num_layers)
    return spec


# transformers' NemotronHConfig spells each layer of ``layers_block_type``
# with one of these (newer releases: linear_attention for Mamba and
# full_attention), where older configs give ``hybrid_override_pattern``.
HYBRID_BLOCK_TYPES = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-", "moe": "E"}


def _hybrid(read: ConfigReader, name: str) -> ModelSpec:
    """Nemotron-H, Nemotron Nano 2 and Nemotron 3 (transformers'
    NemotronHConfig, whose defaults fill what a config leaves out): the
    layers ``hybrid_override_pattern`` lays out (section 1 of the Nemotron-H
    report, arXiv 2504.03624: Mamba-2, self-attention and MLP layers, each a
    residual block with its own RMSNorm), attention without position
    embeddings, squared-ReLU MLPs and experts, no biases but the conv1d's,
    untied embeddings. What Megatron-LM's pretrain_mamba.py cannot build, or
    loom does not price, is refused naming the field."""
    pattern = read.str("hybrid_override_pattern")
    if pattern is None:
        types = read.str_list("layers_block_type", tuple(HYBRID_BLOCK_TYPES))
        pattern = "".join(HYBRID_BLOCK_TYPES[kind] for kind in types or ())
    read.require("/" not in pattern, "hybrid_override_pattern", "no multi-token prediction part after '/' (loom does not plan a "
                 "hybrid model's MTP layers)", pattern)
    pattern = pattern.split("/")[0]
    read.require(bool(pattern) and set(pattern) <= set(HYBRID_SYMBOLS), "hybrid_override_pattern",
                 f"one character per layer, each of {''.join(HYBRID_SYMBOLS)} (megatron-core's hybrid layer symbols)", pattern)
    read.require(len(pattern) <= LIMITS["layers"], "hybrid_override_pattern", f"at most {LIMITS['layers']:,} layers", len(pattern))
    num_layers = read.int("num_hidden_layers", default=max(1, len(pattern)), high=LIMITS["layers"])
    read.require(num_layers == len(pattern), "num_hidden_layers", f"the {len(pattern)} layers of hybrid_override_pattern", num_layers,
                 given=("num_hidden_layers", "hybrid_override_pattern", "layers_block_type"))
    hidden = read.int("hidden_size", high=LIMITS["width"])
    heads = read.int("num_attention_heads", high=LIMITS["heads"])
    kv_heads = read.int("num_key_value_heads", default=8, high=LIMITS["heads"])
    read.require(heads % kv_heads == 0, "num_key_value_heads", f"a divisor of {heads} attention heads", kv_heads,
                 given=("num_attention_heads", "num_key_value_heads"))
    head_dim = read.int("head_dim", "attention_head_dim", default=128, high=LIMITS["width"])
    mamba = Mamba(
        num_heads=read.int("mamba_num_heads", default=128, high=LIMITS["heads"]),
        head_dim=read.int("mamba_head_dim", default=64, high=LIMITS["width"]),
        state_size=read.int("ssm_state_size", "mamba_state_dim", default=128, high=LIMITS["width"]),
        num_groups=read.int("n_groups", "mamba_n_groups", "mamba_num_groups", default=8, high=LIMITS["heads"]),
        conv_kernel=read.int("conv_kernel", "mamba_d_conv", default=4, high=1 << 10),
        chunk_size=read.int("chunk_size", "mamba_chunk_size", default=128, high=1 << 16),
    )
    read.require(mamba.num_heads % mamba.num_groups == 0, "mamba_num_heads", f"a multiple of the {mamba.num_groups} groups (n_groups)",
                 mamba.num_heads, given=("mamba_num_heads", "n_groups", "mamba_n_groups", "mamba_num_groups"))
    for key in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias"):
        read.require(not read.bool(key, False), key, "false (Megatron-LM's Mamba mixer has no projection biases; its layers bias all "
                     "linear layers or none)", True)
    read.require(read.bool("use_conv_bias", True), "use_conv_bias", "true (megatron-core's Mamba conv1d has a bias)", False)
    read.require(not read.bool("residual_in_fp32", False), "residual_in_fp32", "false (loom prices a 16-bit residual stream)", True)
    read.require(read.str("mlp_hidden_act", "relu2") == "relu2", "mlp_hidden_act", "relu2 (Megatron's --squared-relu)",
                 read.config.get("mlp_hidden_act"))
    read.require(read.str("mamba_hidden_act", "silu") == "silu", "mamba_hidden_act", "silu (the Mamba-2 mixer's activation)",
                 read.config.get("mamba_hidden_act"))
    read.require(read.config.get("moe_latent_size") is None, "moe_latent_size", "none (loom does not plan latent MoE projections)",
                 read.config.get("moe_latent_size"))
    read.require(not read.int("num_nextn_predict_layers", default=0, low=0, high=LIMITS["layers"]), "num_nextn_predict_layers",
                 "0 (loom does not plan a hybrid model's multi-token prediction layers)", read.config.get("num_nextn_predict_layers"))
    moe = None
    if "E" in pattern:
        experts = read.int("n_routed_experts", high=LIMITS["experts"])
        top_k = read.int("num_experts_per_tok", high=LIMITS["experts"])
        read.require(top_k <= experts, "num_experts_per_tok", f"at most the {experts} experts", top_k,
                     given=("n_routed_experts", "num_experts_per_tok"))
        shared_experts = read.int("n_shared_experts", default=1, low=0, high=1)  # NemotronHConfig's default: 1
        scaling = read.number("routed_scaling_factor", default=1.0, high=1e6, above_low=True)
        for key in ("n_group", "topk_group"):
            read.int(key, default=1, high=LIMITS["experts"])
        read.bool("norm_topk_prob", True)
        moe = MoE(num_experts=experts, top_k=top_k, expert_ffn_hidden_size=read.int("moe_intermediate_size", high=LIMITS["width"]),
                  shared_ffn_hidden_size=shared_experts and read.int("moe_shared_expert_intermediate_size", high=LIMITS["width"]),
                  gated=False, sigmoid_router=True, topk_scaling_factor=scaling)
    return ModelSpec(
        name=name,
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        ffn_hidden_size=read.int("intermediate_size", default=21504, high=LIMITS["width"]) if "-" in pattern else 4 * hidden,
        vocab_size=read.int("vocab_size", default=131072, low=MIN_VOCAB, high=LIMITS["vocab"], placeholder=MIN_VOCAB),
        max_position_embeddings=read.int("max_position_embeddings", default=4096, high=LIMITS["positions"]),
        gated_mlp=False,
        tied_embeddings=read.bool("tie_word_embeddings", False),
        learned_position_embeddings=False,
        linear_bias=False,
        qkv_bias=False,
        normalization="RMSNorm",
        dropout=read.number("hidden_dropout", default=0.0, high=1.0, below_high=True),
        kv_channels=head_dim if head_dim * heads != hidden else None,
        norm_epsilon=read.number("layer_norm_epsilon", "rms_norm_eps", default=1e-5, high=1.0, above_low=True, below_high=True),
        moe=moe,
        squared_relu=True,
        no_position_embedding=True,
        mamba=mamba,
        hybrid_pattern=pattern,
    )


def _falcon(read: ConfigReader, spec: ModelSpec) -> ModelSpec:
    """Falcon's fields over the common ones (transformers' FalconConfig
    defaults): key/value heads (num_kv_heads under the new decoder
    architecture; one with multi_query, which that architecture ignores;
    else one per head), the MLP width (ffn_hidden_size, 4h), its biases
    (bias), tied embeddings, ALiBi, and the parallel block with its norms
    (num_ln_in_parallel_attn: 2 under the new architecture, else 1)."""
    heads = spec.num_attention_heads
    new_architecture = read.bool("new_decoder_architecture", False)
    if new_architecture:
        kv_heads = read.int("num_kv_heads", default=heads, high=LIMITS["heads"])
    else:
        kv_heads = 1 if read.bool("multi_query", True) else heads
    read.require(heads % kv_heads == 0, "num_kv_heads", f"a divisor of {heads} attention heads", kv_heads, given=("num_kv_heads",))
    read.require(read.str("activation", "gelu") == "gelu", "activation", "gelu (Falcon's MLP)", read.config.get("activation"))
    parallel = new_architecture or read.bool("parallel_attn", True)
    norms = read.int("num_ln_in_parallel_attn", default=2 if new_architecture else 1, high=2) if parallel else 2
    alibi = read.bool("alibi", False)
    return replace(spec, num_query_groups=kv_heads, ffn_hidden_size=read.int("ffn_hidden_size", default=4 * spec.hidden_size, high=LIMITS["width"]),
                   linear_bias=read.bool("bias", False), tied_embeddings=read.bool("tie_word_embeddings", True), alibi=alibi,
                   parallel_attention=parallel, norms_per_layer=norms,
                   megatron_unbuildable=MEGATRON_CANNOT_BUILD["falcon"] if parallel or alibi else None)


def _rope_scaling(read: ConfigReader) -> tuple[str, ConfigReader | None, str | None]:
    """The config's rotary-embedding scaling: its key, reader and kind
    (None or "default" unscaled; "dynamic", "llama3", "yarn", ...).
    transformers 4 saves ``rope_scaling``; transformers 5 saves
    ``rope_parameters`` (rope_type "default" when unscaled, rope_theta
    inside). Where both are given they must agree; a rope_parameters that
    scales must name its rope_type; per-layer-type parameters are Gemma 3's
    only (read as unscaled: loom does not build Gemma's layers)."""
    parameters = read.nested("rope_parameters")
    if parameters is not None and any(isinstance(value, dict) for value in parameters.config.values()):
        read.require(read.str("model_type") in GEMMA, "rope_parameters", "one rope_type and rope_theta (per-layer-type rotary "
                     "parameters are Gemma 3's)", ", ".join(sorted(parameters.config)))
        parameters = None
    if parameters is not None:
        terms = sorted(set(parameters.config) - {"rope_theta", "rope_type", "type"})
        parameters.require(parameters.has("rope_type", "type") or not terms, "rope_type", "a rope type beside the scaling terms "
                           "(transformers 5 names every scaling's)", ", ".join(terms))
    if not read.has("rope_scaling"):
        return "rope_parameters", parameters, parameters.str("rope_type", parameters.str("type")) if parameters else None
    scaling = read.nested("rope_scaling")
    if scaling is not None and parameters is not None:
        read.require(_scaling_terms(parameters.config) in ({}, _scaling_terms(scaling.config)), "rope_parameters",
                     "the scaling rope_scaling gives (the config names two)", parameters.config)
    return "rope_scaling", scaling, scaling.str("rope_type", scaling.str("type")) if scaling else None


def _scaling_terms(mapping: dict) -> dict:
    """A rotary scaling's terms, its kind under one name, the base left out."""
    return {("rope_type" if key == "type" else key): value for key, value in mapping.items() if key != "rope_theta"}


def _yarn(read: ConfigReader, max_positions: int) -> Yarn | None:
    """The config's YaRN rope_scaling outside MLA (None: none), absent terms
    at transformers' defaults (the original context: max_position_embeddings).
    The attention temperature is YaRN's own (0.1 ln factor + 1): an
    attention_factor or DeepSeek's mscales are refused."""
    _, scaling, kind = _rope_scaling(read)
    if kind != "yarn" or scaling is None:
        return None
    for term in ("attention_factor", "mscale", "mscale_all_dim"):
        scaling.require(not scaling.has(term), term, "absent for YaRN outside multi-head latent attention (YaRN's own attention "
                        "temperature)", scaling.config.get(term))
    return Yarn(factor=scaling.number("factor", default=1.0, low=1.0, high=1e6), beta_fast=scaling.number("beta_fast", default=32.0, high=1e6),
                beta_slow=scaling.number("beta_slow", default=1.0, high=1e6),
                original_positions=scaling.int("original_max_position_embeddings", default=max_positions, high=LIMITS["positions"]),
                truncate=scaling.bool("truncate", True))


def _rotary_percent(read: ConfigReader, family: str) -> float:
    """The share of each head's dimensions RoPE rotates: Phi-3's and
    Nemotron's partial_rotary_factor (Phi3Config 1.0, NemotronConfig 0.5),
    GPT-NeoX's rotary_pct (GPTNeoXConfig 0.25; in transformers 5
    partial_rotary_factor, or rope_parameters.partial_rotary_factor, which
    must agree with a top-level one); every other family rotates all of them."""
    defaults = {"phi3": 1.0, "nemotron": 0.5, "gpt_neox": 0.25}
    if family not in defaults:
        return 1.0
    keys = ("rotary_pct", "partial_rotary_factor") if family == "gpt_neox" else ("partial_rotary_factor",)
    # transformers 5 moves it into rope_parameters (convert_rope_params_to_dict).
    parameters = read.nested("rope_parameters")
    inner = parameters.number("partial_rotary_factor", default=defaults[family], high=1.0, above_low=True) if parameters else defaults[family]
    given = {key: read.number(key, default=inner, high=1.0, above_low=True) for key in keys if read.has(key)}
    if parameters is not None and parameters.has("partial_rotary_factor"):
        given["rope_parameters.partial_rotary_factor"] = inner
    (first, factor), *others = given.items() or [(keys[0], inner)]
    for key, value in others:  # every form the config names must say the same
        read.require(value == factor, key, f"{factor:g}, the config's {first} (it names two)", value, given=(first, key))
    return factor


def _rope_theta(read: ConfigReader) -> float:
    """The rotary base: top-level ``rope_theta`` (or GPT-NeoX's
    ``rotary_emb_base``), else transformers 5's ``rope_parameters.rope_theta``;
    where both are given they must agree."""
    parameters = read.nested("rope_parameters")
    inner = parameters.number("rope_theta", default=10000.0, high=1e12, above_low=True) if parameters else 10000.0
    theta = read.number("rope_theta", "rotary_emb_base", default=inner, high=1e12, above_low=True)
    if parameters is not None and parameters.has("rope_theta") and read.has("rope_theta", "rotary_emb_base"):
        read.require(theta == inner, "rope_parameters.rope_theta", f"{theta:.10g}, the config's rope_theta (it names two)", inner,
                     given=("rope_theta", "rope_parameters.rope_theta"))
    return theta


def _rope_scaling_factor(read: ConfigReader, family: str) -> float | None:
    """Llama 3.1's rope scaling factor (None: no scaling) of a Llama-like
    family that ROPE_CHECKED does not cover. Scalings megatron-core cannot
    apply (yarn, linear, llama3 with other fixed values) are refused: a
    launch file would train other position encodings than the config's."""
    key, scaling, kind = _rope_scaling(read)
    if kind in (None, "default", "dynamic", "yarn"):  # yarn: ModelSpec.yarn
        return None
    read.require(kind == "llama3", key, f"none, dynamic, yarn or llama3 for {family} (megatron-core's --use-rope-scaling is "
                 "Llama 3.1's; other scalings loom does not write)", kind)
    if kind != "llama3":  # its other keys are another scaling's
        return None
    for key, fixed in LLAMA3_ROPE_FIXED.items():
        value = scaling.number(key, default=fixed, high=1e9)
        scaling.require(value == fixed, key, f"{fixed:g}, the value megatron-core's --use-rope-scaling applies", value)
    return scaling.number("factor", default=8.0, high=1e6, above_low=True)


def _check_family(read: ConfigReader, family: str) -> None:
    """What a family's config may switch on that Megatron-LM cannot build
    (or loom does not plan): each refused, naming the field."""
    if family in ("qwen3", "qwen3_moe"):
        # Qwen3's attention_bias puts biases on Q, K, V and the output projection:
        # Megatron has --add-qkv-bias (Q, K, V only) or biases on every linear layer.
        read.require(not read.bool("attention_bias", False), "attention_bias", f"false for {family} (biases on Q, K, V and the "
                     "attention output, but not the MLP: Megatron has --add-qkv-bias or biases on every linear layer)", True)
    if family == "llama":
        # LlamaConfig's attention_bias biases Q, K, V and the output projection,
        # mlp_bias the MLP: Megatron has --add-qkv-bias or biases on every linear layer.
        for key in ("attention_bias", "mlp_bias"):
            read.require(not read.bool(key, False), key, "false for llama (Megatron biases Q, K, V alone (--add-qkv-bias) or every "
                         "linear layer; loom prices Llama without biases)", True)
    if family == "internlm2":
        # InternLM2's bias: on wqkv and wo, never on w1/w2/w3 (modeling_internlm2.py).
        read.require(not read.bool("bias", False), "bias", "false for internlm2 (biases on wqkv and wo but not the MLP: Megatron has "
                     "--add-qkv-bias or biases on every linear layer)", True)
    if family in BLOOM:
        read.require(not read.bool("apply_residual_connection_post_layernorm", False), "apply_residual_connection_post_layernorm",
                     "false for bloom (loom prices the residual taken before each norm, as BLOOM trained)", True)
    if family in GEMMA:
        read.require(not read.bool("attention_bias", False), "attention_bias", f"false for {family} (Gemma has no biases)", True)
        activation = read.str("hidden_activation", read.str("hidden_act", "gelu_pytorch_tanh"))
        read.require(activation in GEMMA_ACTIVATIONS, "hidden_activation", f"a GeLU ({', '.join(GEMMA_ACTIVATIONS)}) for {family}'s "
                     "GeGLU", activation)
    if family in OLMO2:
        read.require(not read.bool("attention_bias", False), "attention_bias", "false for olmo2 (OLMo-2 has no biases)", True)
    if family in NEMOTRON:
        read.require(read.str("hidden_act", "relu2") == "relu2", "hidden_act", "relu2 for nemotron (Megatron's --squared-relu)",
                     read.config.get("hidden_act"))
        for key in ("attention_bias", "mlp_bias"):
            read.require(not read.bool(key, False), key, "false for nemotron (Nemotron-4 has no biases; Megatron biases all linear "
                         "layers or none)", True)
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        read.require(not read.bool("use_sliding_window", False), "use_sliding_window",
                     "false (loom does not plan Qwen's windowed layers past max_window_layers)", True)
    if family in GELU_MLP_ACTIVATION:
        key, default = GELU_MLP_ACTIVATION[family]
        activation = read.str(key, default)
        read.require(activation in GELU_ACTIVATIONS, key, f"a GeLU ({', '.join(GELU_ACTIVATIONS)}) for {family}'s MLP (loom prices and "
                     "Megatron builds a GeLU)", activation)
    if family == "gpt_neox":
        read.require(read.bool("attention_bias", True), "attention_bias", "true for gpt_neox (Megatron biases all linear layers or none)",
                     False)
    if family in LLAMA_LIKE and family not in MLA_FAMILIES:
        activation = read.str("hidden_act", "silu")
        read.require(activation in SWIGLU_ACTIVATIONS, "hidden_act", f"silu for {family} (its gated MLP is SwiGLU, Megatron's --swiglu)",
                     activation)
    if family in ROPE_CHECKED:
        key, _, kind = _rope_scaling(read)
        # Phi-3-128k / Phi-3.5-mini's LongRoPE reads (Megatron cannot build
        # it: _decoder marks the model); other scalings change what trains.
        allowed = (None, "default", "dynamic", "yarn", *(LONGROPE if family == "phi3" else ()))
        read.require(kind in allowed, key, f"{', '.join(map(str, allowed[1:-1]))} or {allowed[-1]} for {family}", kind)


def _sliding_window(read: ConfigReader, num_layers: int, period: int, default: int = 0) -> tuple[int | None, tuple[bool, ...]]:
    """gpt-oss, Gemma 2 and 3: ``sliding_window`` keys (the query's own
    included) on the layers ``layer_types`` marks "sliding_attention", full
    causal attention on the "full_attention" ones (transformers'
    GptOssConfig, Gemma2Config, Gemma3TextConfig; without layer_types, every
    ``period``-th layer is global, the others windowed: layer i slides when
    (i + 1) % period != 0). ``default``: the window a config may leave out."""
    window = read.int("sliding_window", default=default, low=1, high=LIMITS["positions"]) or None
    types = read.str_list("layer_types", ("sliding_attention", "full_attention"))
    if types is None:
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]
    read.require(len(types) == num_layers, "layer_types", f"one entry per layer ({num_layers})", len(types), given=("num_hidden_layers",))
    layers = tuple(kind == "sliding_attention" for kind in types[:num_layers])
    read.require(window is not None or not any(layers), "sliding_window", "the window of the layers layer_types marks sliding_attention")
    return (window, layers) if window and any(layers) else (None, ())


def _moe(read: ConfigReader, family: str, num_layers: int) -> MoE | None:
    """Mixtral and gpt-oss: num_local_experts, the expert width in
    intermediate_size (gpt-oss: with biases). Qwen3-MoE and DeepSeek-V2/V3: num_experts / n_routed_experts and
    moe_intermediate_size; DeepSeek's first_k_dense_replace layers are dense
    and every later one is MoE (moe_layer_freq 1)."""
    defaults = MOE_FAMILY_DEFAULTS.get(family)
    if not read.has("num_local_experts", "num_experts", "n_routed_experts") and defaults is None:
        return None
    experts = read.int("num_local_experts", "num_experts", "n_routed_experts", high=LIMITS["experts"], default=defaults and defaults[0])
    first_dense = read.int("first_k_dense_replace", default=0, low=0, high=LIMITS["layers"])
    if family in ("qwen2_moe", "qwen3_moe"):
        first_dense = _qwen_dense_layers(read, num_layers)
    read.require(read.config.get("moe_layer_freq", 1) == 1, "moe_layer_freq", "1 (an MoE MLP in every layer after the dense ones)",
                 read.config.get("moe_layer_freq"))
    width_key = "intermediate_size" if family in ("mixtral", "gpt_oss") else "moe_intermediate_size"
    top_k = read.int("num_experts_per_tok", high=LIMITS["experts"], default=defaults and defaults[1])
    read.require(top_k <= experts, "num_experts_per_tok", f"at most the {experts} experts", top_k,
                 given=("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok"))
    width = read.int(width_key, high=LIMITS["width"])
    read.require(first_dense < num_layers, "first_k_dense_replace", f"fewer than the {num_layers} layers (some must be MoE)", first_dense,
                 given=("num_hidden_layers", "n_layer"))
    # transformers' Qwen2MoeConfig and Qwen3MoeConfig default norm_topk_prob to false.
    router = _deepseek_router(read, family, experts) if family in MLA_FAMILIES else {
        "pre_softmax": family in ("qwen2_moe", "qwen3_moe") and not read.bool("norm_topk_prob", False)}
    qwen2_moe = family == "qwen2_moe"
    if qwen2_moe:  # one gated shared expert of its own width
        shared = read.int("shared_expert_intermediate_size", default=0, low=0, high=LIMITS["width"])
    else:
        shared = read.int("n_shared_experts", default=0, low=0, high=LIMITS["experts"]) * width
    aux_key = "aux_loss_alpha" if family in MLA_FAMILIES else "router_aux_loss_coef"
    return MoE(
        num_experts=experts,
        top_k=top_k,
        aux_loss_coeff=read.number(aux_key, default=AUX_LOSS_DEFAULTS.get(family), high=1e3) if read.has(aux_key) or family in AUX_LOSS_DEFAULTS
        else None,
        seq_aux_loss=family in MLA_FAMILIES and read.bool("seq_aux", True),
        expert_ffn_hidden_size=width,
        shared_ffn_hidden_size=shared,
        first_dense_layers=min(first_dense, num_layers - 1),
        bias=family in GPT_OSS,
        shared_gate=qwen2_moe and shared > 0,
        **router,
    )


# The load-balancing loss coefficient where a config leaves it out:
# transformers' router_aux_loss_coef defaults (MixtralConfig, Qwen2MoeConfig,
# Qwen3MoeConfig 0.001; GptOssConfig 0.9) and DeepSeek's aux_loss_alpha 0.001
# (its configs' and modeling code's, with seq_aux true).
AUX_LOSS_DEFAULTS = {"mixtral": 0.001, "qwen2_moe": 0.001, "qwen3_moe": 0.001, "gpt_oss": 0.9, "deepseek_v2": 0.001, "deepseek_v3": 0.001}
# Families that are mixtures of experts by design, and their experts and
# top-k where a config leaves them out (transformers' MixtralConfig,
# Qwen2MoeConfig, Qwen3MoeConfig, GptOssConfig and DeepseekV3Config defaults).
MOE_FAMILY_DEFAULTS = {"mixtral": (8, 2), "qwen2_moe": (60, 4), "qwen3_moe": (128, 8), "gpt_oss": (128, 4), "deepseek_v3": (256, 8)}
# DeepSeek's routers as transformers' configs default them: V2 softmax over
# all experts, greedy top-k, not renormalised, unscaled; V3 sigmoid scores
# with a learned expert bias choosing the top-k (noaux_tc) from the best 4 of
# 8 groups, renormalised and scaled by 2.5 (DeepseekV2Config, DeepseekV3Config).
DEEPSEEK_ROUTER_DEFAULTS = {
    "deepseek_v2": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1),
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4),
}


def _deepseek_router(read: ConfigReader, family: str, experts: int) -> dict:
    """A DeepSeek config's router as MoE fields (megatron-core 0.16.1
    router.py: --moe-router-score-function, --moe-router-enable-expert-bias,
    --moe-router-pre-softmax, --moe-router-topk-scaling-factor and the group
    limit). megatron-core renormalises sigmoid scores over the top-k, so a
    sigmoid router that does not is refused."""
    default = DEEPSEEK_ROUTER_DEFAULTS[family]
    scoring = read.str("scoring_func", default["scoring_func"])
    read.require(scoring in ("softmax", "sigmoid"), "scoring_func", "softmax or sigmoid", scoring)
    method = read.str("topk_method", default["topk_method"])
    read.require(method in ("greedy", "group_limited_greedy", "noaux_tc"), "topk_method", "greedy, group_limited_greedy or noaux_tc", method)
    normalised = read.bool("norm_topk_prob", default["norm_topk_prob"])
    read.require(scoring == "softmax" or normalised, "norm_topk_prob", "true with sigmoid scores (megatron-core renormalises them)", normalised)
    read.require(scoring == "softmax" or method == "noaux_tc", "topk_method", "noaux_tc with sigmoid scores (megatron-core's sigmoid "
                 "router as loom writes it chooses by score plus the expert bias)", method)
    groups = read.int("n_group", default=default["n_group"], high=experts) if method != "greedy" else 1
    group_topk = read.int("topk_group", default=default["topk_group"], high=groups) if method != "greedy" else 1
    read.require(experts % groups == 0, "n_group", f"a divisor of the {experts} experts", groups)
    scaling = read.number("routed_scaling_factor", default=default["routed_scaling_factor"], high=1e6, above_low=True)
    return dict(sigmoid_router=scoring == "sigmoid" and method == "noaux_tc", pre_softmax=scoring == "softmax" and not normalised,
                topk_scaling_factor=None if scaling == 1.0 else scaling, router_groups=groups, router_group_topk=group_topk)


def _qwen_dense_layers(read: ConfigReader, num_layers: int) -> int:
    """Qwen-MoE: layer i has an MoE MLP unless listed in mlp_only_layers, and
    only when (i + 1) is a multiple of decoder_sparse_step (transformers'
    Qwen2MoeDecoderLayer). loom (and this emitter's --moe-layer-freq) prices
    dense layers before the MoE ones: the dense layers must be the first k."""
    step = read.int("decoder_sparse_step", default=1, high=LIMITS["layers"])
    dense_only = set(read.int_list("mlp_only_layers") or [])
    moe = [i not in dense_only and (i + 1) % step == 0 for i in range(num_layers)]
    first = moe.index(True) if any(moe) else num_layers
    # the field that interleaves them: a sparse step over 1 does by itself
    key, value = ("decoder_sparse_step", step) if step > 1 and num_layers > step else ("mlp_only_layers", sorted(dense_only))
    read.require(all(moe[first:]) and first < num_layers, key, "dense layers (mlp_only_layers, decoder_sparse_step) "
                 "only before the MoE ones, and some MoE layers (loom prices interleaved dense layers only at the start)",
                 value, given=("decoder_sparse_step", "mlp_only_layers"))
    return first if first < num_layers else 0


def _mla(read: ConfigReader) -> MLA:
    mla = MLA(
        q_lora_rank=read.int("q_lora_rank", high=LIMITS["width"]) if read.has("q_lora_rank") else None,
        kv_lora_rank=read.int("kv_lora_rank", high=LIMITS["width"]),
        qk_nope_head_dim=read.int("qk_nope_head_dim", high=LIMITS["width"]),
        qk_rope_head_dim=read.int("qk_rope_head_dim", high=LIMITS["width"]),
        v_head_dim=read.int("v_head_dim", high=LIMITS["width"]),
    )
    return _mla_yarn(read, mla)


def _mla_yarn(read: ConfigReader, mla: MLA) -> MLA:
    """``mla`` with the config's YaRN ``rope_scaling`` (DeepSeek-V2/V3 ship
    ``type: yarn``, factor 40). Megatron-LM core_v0.16.1 sets only the
    factor and the two mscales (--rotary-scaling-factor, --mscale,
    --mscale-all-dim); the other YaRN terms must be MLATransformerConfig's
    fixed defaults (MLA_YARN_FIXED), or a launch file would train other
    position encodings than the config's. Absent keys take DeepSeek's
    modeling defaults (DeepseekV2YarnRotaryEmbedding: mscale 1,
    mscale_all_dim 0, beta_fast 32, beta_slow 1, original 4,096 positions)."""
    key, scaling, kind = _rope_scaling(read)
    if kind in (None, "default", "dynamic"):
        return mla
    read.require(kind == "yarn", key, "none, dynamic or yarn for multi-head latent attention (megatron-core's MLA "
                 "rotary embeddings are plain or YaRN)", kind)
    if kind != "yarn":  # its other keys are another scaling's
        return mla
    for key, fixed in MLA_YARN_FIXED.items():
        value = scaling.number(key, default=fixed, high=1e9)
        scaling.require(value == fixed, key, f"{fixed:g}, MLATransformerConfig's value (Megatron-LM core_v0.16.1 has no flag for it)",
                        value)
    # megatron-core derives the attention temperature from the two mscales
    # and rounds the correction range to whole dimensions
    # (YarnRotaryEmbedding: correction_range_round_to_int, transformers' truncate).
    scaling.require(not scaling.has("attention_factor"), "attention_factor", "absent (megatron-core derives the attention temperature "
                    "from mscale and mscale_all_dim)", scaling.config.get("attention_factor"))
    scaling.require(scaling.bool("truncate", True), "truncate", "true (megatron-core rounds YaRN's correction range to whole "
                    "dimensions)", False)
    return replace(mla, rope_scaling_factor=scaling.number("factor", default=1.0, low=1.0, high=1e6),
                   mscale=scaling.number("mscale", default=1.0, high=1e3), mscale_all_dim=scaling.number("mscale_all_dim", default=0.0, high=1e3))


def load_model(name_or_path: str, source: str = "--model") -> ModelSpec:
    """A catalogue name (``llama-3-70b``), a path to a ``config.json`` or a
    folder holding one (a Hugging Face checkout); ``source`` is where the
    name was given (a job file or the flag)."""
    path = model_config_path(name_or_path)
    if path is None:
        path = Path(name_or_path)
        if path.is_dir() and (path / "config.json").is_file():  # a Hugging Face checkout
            path = path / "config.json"
        elif path.is_dir():
            raise SpecError(source, "model", "a config.json path or a folder holding one (this folder has no config.json)", name_or_path)
        elif not path.is_file() and (path.suffix or "/" in name_or_path or os.sep in name_or_path):
            raise SpecError(source, "model", "an existing config.json path or a folder holding one (no such file)", name_or_path)
        elif not path.is_file():
            raise SpecError(source, "model", f"a catalogue name ({', '.join(model_names())}) or a config.json path", name_or_path)
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise SpecError(str(path), "<top level>", "a JSON object")
    # A Hugging Face checkout's config.json is named after its folder.
    folder = path.resolve().parent.name
    name = path.stem if folder == "models" or path.name != "config.json" or not folder else folder
    return model_from_hf_config(config, name=name, source=str(path))
