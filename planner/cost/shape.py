"""The per-GPU shapes of one micro batch (``Shape``): what every kernel-time
and activation estimate is a function of, so those can be cached across the
layouts that share a shape.

Shapes follow Megatron-LM's GPT layer (Shoeybi et al. 2019; Narayanan et al.
SC'21 sec. 3): column-parallel QKV and MLP-up GEMMs, row-parallel projection
and MLP-down GEMMs, each split ``tp`` ways; with context parallelism each rank
holds ``seq / cp`` tokens and attends to all keys (ring attention, Liu et al.
2023; Megatron-Core's CP).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from functools import cached_property
from typing import TYPE_CHECKING

from loom.planner.specs.job import FP32_PRECISIONS, Features
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import ModelSpec

if TYPE_CHECKING:
    from loom.planner.cost.measured import MeasuredLayers



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
    measured: MeasuredLayers | None = None  # a layers profile resolved for the job (cost/measured.py)

    def __hash__(self) -> int:
        """The fields' hash, computed once: every cached kernel time and
        activation count is keyed on a shape."""
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, field.name) for field in fields(self)))

    @classmethod
    def of(cls, model: ModelSpec, layout: Layout, seq_length: int, precision: str, features: Features, measured: MeasuredLayers | None = None) -> Shape:
        return _interned(cls, model, layout.tp, layout.cp, layout.micro_batch_size, layout.sequence_parallel, seq_length, precision,
                         features, layout.ep, layout.etp, measured)

    @cached_property
    def weights_shape(self) -> Shape:
        """This shape less its tokens (one token, no context or sequence
        parallelism, nothing measured): what the weights on one GPU and
        their state are a function of, so memos of the model state key on
        it (one object per shape, its hash computed once)."""
        return _interned(type(self), self.model, self.tp, 1, 1, False, 1, self.precision, self.features, self.ep, self.etp, None)

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation element: 16-bit under bf16, fp16 and fp8
        (whose GEMMs take fp8 copies of 16-bit tensors), 4 in fp32 training."""
        return 4 if self.precision in FP32_PRECISIONS else 2

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
        return [(rows, moe.up_projections * width, h), (rows, h, width)], local_experts

    def attention_flops(self, windowed: bool = False) -> float:
        """Forward FLOPs of QK^T and attention x V on one rank. Causal flash
        attention skips the masked half; the unfused kernels compute it all.
        In a sliding-window layer (``windowed``) flash attention skips the
        blocks outside the window too: query i (1-based) sees min(W, i) keys,
        sum s*W - W(W-1)/2 (Beltagy et al. 2020, Longformer, sec. 3.1: cost
        linear in s), counted s*W - W^2/2 beside the s^2/2 of full causal
        attention (equal at W = s). Unfused kernels still score and mask all
        s x s, and the activations kept do not depend on the window (flash:
        one log-sum-exp per query; unfused: the full masked s x s)."""
        m, s = self.model, self.seq_length
        per_pair = 2.0 * self.micro_batch_size * m.num_attention_heads / self.tp * (m.qk_head_dim + m.v_head_dim)
        if not (self.features.flash_attention and m.causal):
            return per_pair * s * s / self.cp
        window = m.sliding_window if windowed and m.sliding_window and m.sliding_window < s else None
        pairs = s * window - window**2 / 2 if window else s * s / 2
        return per_pair * pairs / self.cp

    def vision(self) -> Shape:
        """The vision encoder's shapes: one sequence of patches per sample, TP
        as in the language model, no context parallelism."""
        tower = self.model.vision
        return Shape(tower.encoder, self.tp, 1, self.micro_batch_size, self.sequence_parallel, tower.image_tokens, self.precision, self.features)


@functools.lru_cache(maxsize=1 << 14)
def _interned(cls: type[Shape], *fields_: object) -> Shape:
    """One Shape object per distinct shape: its hash, which every memo keyed
    on it needs, is computed once, not once per layout priced."""
    return cls(*fields_)
