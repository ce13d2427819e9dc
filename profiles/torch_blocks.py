"""The model's layers in plain PyTorch, at the shapes one tensor-parallel rank
of Megatron-Core sees, for ``loom profile layers`` to time and to count what
they keep for backward. Importing this module imports torch.

Each layer follows megatron-core's GPT layer (``transformer_layer.py``,
``attention.py``, ``mlp.py``, ``moe/``) closely enough that it keeps the same
tensors alive for backward:

- a fused norm (Transformer Engine / Apex) keeps its input only;
- the fused QKV GEMM's output is split into views; rotary embedding writes new
  Q and K, so V keeps the whole fused output alive (``torch.split`` in
  ``SelfAttention.get_query_key_value_tensors``);
- flash attention keeps Q, K, V, its output and the fp32 log-sum-exp;
- the fused bias-SwiGLU/GeLU keeps its input; the MoE experts' fused
  weighted SwiGLU also keeps the routing probabilities
  (``activation_func_with_probs`` in ``moe/experts.py``);
- with sequence parallelism a column-parallel GEMM keeps its input before the
  all-gather and gathers it again for backward
  (``LinearWithGradAccumulationAndAsyncCommunication``);
- recompute is Megatron's ``CheckpointFunction``: inputs kept, the forward
  re-run inside backward.

There is one process, so tensor-parallel collectives become local stand-ins
with the same shapes (an all-gather repeats the local rows, a reduce-scatter
keeps the first share); their time is priced by the planner's network model,
not here. Expert parallelism likewise: the GPU's routed rows are spread over
its ``num_experts / ep`` local experts as a balanced all-to-all would leave
them. Biases and attention dropout are left out (fused into neighbouring
kernels, they keep no activations of their own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from loom.planner.specs.model import ModelSpec


@dataclass(frozen=True)
class RankShape:
    """What fixes one TP rank's tensors: the model, the parallel degrees and
    one micro batch."""

    model: ModelSpec
    tp: int
    micro_batch_size: int
    seq_length: int
    sequence_parallel: bool
    ep: int = 1
    etp: int = 1

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_length

    @property
    def local_tokens(self) -> int:
        """Tokens of the residual stream on this rank (split t ways by SP)."""
        return self.tokens // self.tp if self.sequence_parallel else self.tokens


# --- Megatron's autograd building blocks ------------------------------------
class Recompute(torch.autograd.Function):
    """``fn(*inputs)`` keeping only its inputs for backward and re-running it
    there (megatron-core's ``tensor_parallel.CheckpointFunction``). Also what
    a fused kernel that keeps only its input amounts to."""

    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad():
            output = ctx.fn(*inputs)
        torch.autograd.backward(output, grad)
        return (None, *(x.grad for x in inputs))


def recomputed(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    return Recompute.apply(fn, *inputs)


class GatheredLinear(torch.autograd.Function):
    """Column-parallel GEMM under sequence parallelism: all-gather the
    sequence shards (here: repeat the local rows ``tp`` times), multiply;
    keep the shard, not the gathered input; backward gathers it again and
    reduce-scatters the input gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, tp: int) -> torch.Tensor:
        ctx.tp = tp
        ctx.save_for_backward(x, weight)
        return F.linear(x.repeat(tp, 1), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        gathered = x.repeat(ctx.tp, 1)
        grad_input = (grad @ weight).view(ctx.tp, *x.shape).sum(0)
        return grad_input, grad.t() @ gathered, None


class ScatterSequence(torch.autograd.Function):
    """Row-parallel GEMM's reduce-scatter under sequence parallelism: this
    rank keeps its 1/tp share of the tokens; backward all-gathers (here:
    repeats the gradient). Like the other stand-ins it reproduces Megatron's
    shapes and kept tensors, not the exact gradient of one process's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: int) -> torch.Tensor:
        ctx.tp = tp
        return x[: x.shape[0] // tp].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.repeat(ctx.tp, 1), None


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's ``_VocabParallelCrossEntropy`` on one rank: the loss from
    fp32 logits, keeping the fp32 softmax and the targets for backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        softmax = torch.softmax(logits.float(), dim=-1)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(softmax, targets)
        return -torch.log(softmax.gather(1, targets[:, None]).squeeze(1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, targets = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits[torch.arange(len(targets), device=targets.device), targets] -= 1
        return (grad_logits * grad[:, None]).to(ctx.logits_dtype), None


class Dropout(torch.autograd.Function):
    """Dropout keeping a 1-byte mask, as CUDA's (and Megatron's fused
    bias-dropout-add) does; PyTorch's CPU dropout keeps it in the
    activation's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.rand_like(x, dtype=torch.float32) >= p
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class AttachAuxLoss(torch.autograd.Function):
    """megatron-core's ``MoEAuxLossAutoScaler``: the router's load-balancing
    loss rides on the layer output, so backward reaches the router scores
    (with gradient 1, as if added to the training loss)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)


# --- the blocks ---------------------------------------------------------------
class Layers:
    """The parameters of one rank's layers and the functions that run them."""

    def __init__(self, shape: RankShape, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.generator = torch.Generator(device="cpu").manual_seed(0)
        self.persistent: list[torch.Tensor] = []  # weights and constant tables: not activations

    def param(self, *size: int) -> torch.nn.Parameter:
        scale = size[-1] ** -0.5
        data = torch.randn(*size, generator=self.generator) * scale
        return self.keep(torch.nn.Parameter(data.to(self.device, self.dtype)))

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        self.persistent.append(tensor)
        return tensor

    def hidden_states(self, rows: int) -> torch.Tensor:
        """A layer input: ``rows`` tokens of the residual stream."""
        data = torch.randn(rows, self.shape.model.hidden_size, generator=self.generator)
        return data.to(self.device, self.dtype).requires_grad_()

    # -- tensor-parallel GEMMs
    def column_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.shape.sequence_parallel and self.shape.tp > 1:
            return GatheredLinear.apply(x, weight, self.shape.tp)
        return F.linear(x, weight)

    def row_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, weight)
        return ScatterSequence.apply(y, self.shape.tp) if self.shape.sequence_parallel and self.shape.tp > 1 else y

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        model = self.shape.model

        def run(x: torch.Tensor) -> torch.Tensor:
            width = (x.shape[-1],)
            if model.normalization == "RMSNorm":
                y = F.rms_norm(x.float(), width, weight.float(), eps=model.norm_epsilon)
            else:
                y = F.layer_norm(x.float(), width, weight.float(), eps=model.norm_epsilon)
            return y.to(x.dtype)

        return recomputed(run, x)

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        return Dropout.apply(x, self.shape.model.dropout) if self.shape.model.dropout else x


def _rotary_tables(seq_length: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE (Su et al. 2021) for positions [0, seq_length)."""
    inverse = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32), inverse)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device, dtype)[:, None, :], angles.sin().to(device, dtype)[:, None, :]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x is [batch, seq, heads, head_dim]: rotate each head's halves."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class DecoderLayer(Layers):
    """Pre-norm decoder layer: attention, then a dense MLP or an MoE block."""

    def __init__(self, shape: RankShape, dtype: torch.dtype, device: torch.device, moe: bool, recompute: str):
        super().__init__(shape, dtype, device)
        m, t = shape.model, shape.tp
        self.moe, self.recompute = moe, recompute
        h = m.hidden_size
        self.heads, self.groups = m.num_attention_heads // t, m.num_query_groups // t
        self.norm1, self.norm2 = self.param(h), self.param(h)
        self.qkv = self.param((m.q_size + m.kv_size + m.v_size) // t, h)
        self.proj = self.param(h, m.attention_output_size // t)
        if m.qk_norm:
            self.q_norm, self.k_norm = self.param(m.head_dim), self.param(m.head_dim)
        if not m.learned_position_embeddings:
            self.cos, self.sin = map(self.keep, _rotary_tables(shape.seq_length, m.head_dim, m.rope_theta, dtype, device))
        if moe:
            self._build_moe()
        else:
            self.up, self.down = self._mlp_weights(m.ffn_hidden_size // t)

    def _mlp_weights(self, width: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        h = self.shape.model.hidden_size
        return self.param((2 if self.shape.model.gated_mlp else 1) * width, h), self.param(h, width)

    def _build_moe(self) -> None:
        m, s = self.shape.model, self.shape
        moe = m.moe
        self.router = self.param(moe.num_experts, m.hidden_size)
        self.local_experts = moe.num_experts // s.ep
        self.experts = [self._mlp_weights(moe.expert_ffn_hidden_size // s.etp) for _ in range(self.local_experts)]
        if moe.shared_ffn_hidden_size:
            self.shared_up, self.shared_down = self._mlp_weights(moe.shared_ffn_hidden_size // s.tp)

    def input(self) -> tuple[torch.Tensor, ...]:
        return (self.hidden_states(self.shape.local_tokens),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full":
            return recomputed(self._layer, x)
        return self._layer(x)

    def _layer(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self._attention(self.norm(x, self.norm1)))
        normed = self.norm(x, self.norm2)
        return x + self.dropout(self._moe(normed) if self.moe else self._mlp(normed, self.up, self.down))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        m, s = self.shape.model, self.shape
        d = m.head_dim
        qkv = self.column_linear(x, self.qkv)
        q, k, v = qkv.split([self.heads * d, self.groups * d, self.groups * d], dim=-1)
        q, k, v = (t.reshape(s.micro_batch_size, s.seq_length, -1, d) for t in (q, k, v))
        if m.qk_norm:
            q, k = self.norm(q, self.q_norm), self.norm(k, self.k_norm)
        if not m.learned_position_embeddings:
            q, k = _rotate(q, self.cos, self.sin), _rotate(k, self.cos, self.sin)
        core = recomputed(self._core_attention, q, k, v) if self.recompute == "selective" else self._core_attention(q, k, v)
        return self.row_linear(core, self.proj)

    def _core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Flash attention (PyTorch's SDPA) on [batch, heads, seq, head_dim];
        GQA without expanding K and V."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.shape.model.causal, enable_gqa=self.groups != self.heads
        )
        return out.transpose(1, 2).reshape(self.shape.tokens, -1)

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape.model.gated_mlp:
            gate, up = x.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(x, approximate="tanh")

    def _mlp(self, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """Column-parallel up (and gate), the fused activation, row-parallel down."""
        return self.row_linear(recomputed(self._activation, self.column_linear(x, up)), down)

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        """Router (with Megatron's auxiliary-loss scores), token permutation,
        the local experts with probability-weighted fused activations, and the
        un-permutation; shared experts run beside them as a TP-split MLP. The
        router sees this rank's sequence-parallel tokens (Megatron requires SP
        for MoE with TP)."""
        s, moe = self.shape, self.shape.model.moe
        logits = F.linear(x, self.router)
        probs, chosen = torch.softmax(logits.float(), dim=-1).topk(moe.top_k, dim=-1)
        aux_scores = torch.softmax(logits.float(), dim=-1)  # topk_softmax_with_capacity's aux-loss scores
        load = torch.full((moe.num_experts,), 1.0 / moe.num_experts, device=x.device)
        aux_loss = moe.num_experts * (aux_scores.mean(0) * load).sum()
        order = torch.argsort(chosen.reshape(-1) % self.local_experts, stable=True)
        rows = torch.div(order, moe.top_k, rounding_mode="floor")  # the token of each routed copy
        routed = x.index_select(0, rows).repeat(s.etp, 1)  # dispatch all-to-all, then the ETP all-gather
        row_probs = probs.reshape(-1).index_select(0, order).repeat(s.etp)[:, None]
        outputs = [
            F.linear(recomputed(self._weighted_activation, F.linear(part, up), p), down)
            for part, p, (up, down) in zip(routed.tensor_split(self.local_experts), row_probs.tensor_split(self.local_experts), self.experts)
        ]
        expert_out = torch.cat(outputs)[: len(rows)]  # ETP reduce-scatter, then the combine all-to-all
        # scatter_add, not index_add: PyTorch's index_add keeps its source for backward.
        combined = torch.zeros_like(x).scatter_add(0, rows[:, None].expand_as(expert_out), expert_out)
        if moe.shared_ffn_hidden_size:
            combined = combined + self._mlp(x, self.shared_up, self.shared_down)
        return AttachAuxLoss.apply(combined, aux_loss)

    def _weighted_activation(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return self._activation(x) * probs.to(x.dtype)


class Embedding(Layers):
    """Vocab-parallel word embedding (this rank's vocab/tp rows), learned
    positions when the model has them, the TP all-reduce (reduce-scatter
    under SP) and dropout."""

    def __init__(self, shape: RankShape, dtype: torch.dtype, device: torch.device):
        super().__init__(shape, dtype, device)
        m = shape.model
        self.words = self.param(m.vocab_size // shape.tp, m.hidden_size)
        if m.learned_position_embeddings:
            self.positions = self.param(shape.seq_length, m.hidden_size)

    def input(self) -> tuple[torch.Tensor, ...]:
        vocab = self.shape.model.vocab_size
        return (torch.randint(0, vocab, (self.shape.tokens,), generator=self.generator).to(self.device),)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.words.shape[0]
        outside = ids >= rows  # another rank's vocabulary slice
        x = F.embedding(ids.masked_fill(outside, 0), self.words).masked_fill(outside[:, None], 0.0)
        if self.shape.model.learned_position_embeddings:
            x = x + self.positions.repeat(self.shape.micro_batch_size, 1)
        if self.shape.sequence_parallel and self.shape.tp > 1:
            x = ScatterSequence.apply(x, self.shape.tp)
        return self.dropout(x)


class Head(Layers):
    """Final norm, the vocab-parallel output GEMM and the cross-entropy loss."""

    def __init__(self, shape: RankShape, dtype: torch.dtype, device: torch.device):
        super().__init__(shape, dtype, device)
        m = shape.model
        self.final_norm = self.param(m.hidden_size)
        self.output = self.param(m.vocab_size // shape.tp, m.hidden_size)

    def input(self) -> tuple[torch.Tensor, ...]:
        vocab = self.output.shape[0]
        targets = torch.randint(0, vocab, (self.shape.tokens,), generator=self.generator).to(self.device)
        return self.hidden_states(self.shape.local_tokens), targets

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.column_linear(self.norm(x, self.final_norm), self.output)
        return VocabParallelCrossEntropy.apply(logits, targets)


KINDS = ("dense", "moe", "embedding", "head")


def build(kind: str, shape: RankShape, dtype: torch.dtype, device: torch.device, recompute: str = "none") -> Layers:
    """The layer of ``kind`` (one of ``KINDS``) at ``shape``."""
    if kind in ("dense", "moe"):
        return DecoderLayer(shape, dtype, device, moe=kind == "moe", recompute=recompute)
    return Embedding(shape, dtype, device) if kind == "embedding" else Head(shape, dtype, device)
