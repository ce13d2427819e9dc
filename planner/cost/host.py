"""Host (CPU) time to issue one decoder layer's kernels from Python, per
micro batch and pass. Eager PyTorch launches each kernel from the host; the
GPU runs ahead of the host until a device-to-host sync, so a layer whose
kernels are shorter than the Python that issues them runs at the host's
pace (Megatron-LM docs/discussions/deepseek-v3-gb200-optimization: "the CPU
kernel launch speed cannot keep up ... host boundedness", worst for
"fine-grained MoE models" and fp8, which "introduce more quantization,
router, and other kernels").

A layer's host time is a count of operations, each at the measured cost of
issuing one: a PyTorch op, or a Transformer Engine module call. The counts
follow megatron-core 0.16.1's code path for each piece (cited per count).
"""

from __future__ import annotations

from loom.planner.cost.efficiency import QUANTISED
from loom.planner.cost.shape import Shape
from loom.planner.specs.model import SUBLAYERS
from loom.profiles.catalogue import GPU

# The CPU time to issue one PyTorch op is the system's (GPU.host_op_s:
# 13.48 us on an x86 DGX H100, 37.08 us on GB200's Grace; TransformerEngine
# issue #2053). A Transformer Engine module call (quantizers, workspaces, fp8
# metadata) took 2.7x a torch Linear's CPU time on the same machine: 99.66 vs
# 37.08 us on GB200 and 90.53 vs 33.17 us on GH200 (same issue).
TE_MODULE_OPS = 99.66 / 37.08
# Under fp8 a TE module also quantizes its input and weight and keeps their
# scales: "scheduling a te.Linear layer in FP8 takes more than 2x more time
# compared to scheduling the te.Linear layer in BF16" (H100,
# TransformerEngine issue #761).
TE_FP8_MODULE_FACTOR = 2.0

# Per decoder layer, forward: the attention half is TE's LayerNormLinear
# (QKV), DotProductAttention and Linear (projection) — 3 modules — and the
# fused rotary embedding of Q and K and the bias-dropout-add (3 ops);
# QK-norm adds 2 TE norm modules (megatron-core transformer_layer.py,
# attention.py). A dense MLP is LayerNormLinear + Linear (2 modules), the
# fused bias-activation and the bias-dropout-add (2 ops).
ATTENTION_MODULES, ATTENTION_OPS = 3, 3
DENSE_MLP_MODULES, DENSE_MLP_OPS = 2, 2
# A Mamba-2 mixer: the norm-fused in-projection and the out-projection (2
# modules); A = -exp(A_log.float()) (3 ops), the [s, b] / [b, s] copies (2),
# the combined conv1d + scan's Triton kernels (conv1d, dt cumsum, chunk
# state, state passing, C B^T, chunk scan: 6), the gated norm (1) and the
# bias-dropout-add (1) (megatron-core ssm/mamba_mixer.py _ssm_training,
# mamba_layer.py; mamba_ssm ops/triton/ssd_combined.py).
MAMBA_MODULES, MAMBA_OPS = 2, 13
# An MoE MLP: its own pre-MLP norm (1 module), the two GroupedLinear modules
# and the fused weighted activation (1 op), the bias-dropout-add (1 op).
MOE_MLP_MODULES, MOE_MLP_OPS = 3, 2
# The router's kernels (GEMM, score function, top-k, aux-loss bookkeeping):
# 72, or 31 with --moe-router-fusion (Megatron-LM docs/discussions/
# deepseek-v3-gb200-optimization, "router fusion ... from 72 to 31").
ROUTER_OPS = {False: 72, True: 31}
# The dispatcher's ops around the experts, forward (token_dispatcher.py):
# alltoall: preprocess (count, all-gather of counts, D2H copy, sync), permute
# (fused: row-id map + gather), the token and probs all-to-alls, sort by
# expert and back, the combine all-to-all and unpermute; unfused permute and
# unpermute add the index building (arange, expand, masked_select x2) and the
# zeros + scatter_add. allgather: three all-gathers (map, probs, tokens), the
# local slice + count + .cpu() sync, permute, unpermute, reduce-scatter.
# flex (DeepEP): top-k metadata, dispatch layout, dispatch, multihot,
# permute + .item() sync, unpermute, combine. HybridEP: metadata
# preprocess, dispatch_with_permute, sync for the permuted count,
# combine_with_unpermute (fused_a2a.py).
DISPATCH_OPS = {
    ("alltoall", True): 12, ("alltoall", False): 18,
    ("allgather", True): 9, ("allgather", False): 13,
    ("deepep", True): 9, ("deepep", False): 12,
    ("hybridep", True): 4, ("hybridep", False): 4,
}
# Transformer Engine GroupedLinear issues per local expert one GEMM and,
# under fp8, two tensor allocations for its quantized copies
# (fused_multi_cast_transpose: "torch.empty() (2x num_gemms calls)",
# TransformerEngine issue #1499, maintainer's answer).
GEMM_OPS_PER_EXPERT = {False: 1, True: 3}


def _layer_ops(shape: Shape, kind: str, backward: bool) -> tuple[int, int]:
    """(TE module calls, other ops) to issue one layer of ``kind`` (a
    SUBLAYERS key), one pass. Backward runs each op's backward (autograd) and
    one more GEMM per GEMM (the data and the weight gradient)."""
    m, features, sublayers = shape.model, shape.features, SUBLAYERS[kind]
    modules, ops, gemms = 0, 0, 0
    if "attention" in sublayers:  # QKV and the projection
        modules, ops, gemms = ATTENTION_MODULES + (2 if m.qk_norm else 0), ATTENTION_OPS, 2
    if "mamba" in sublayers:  # the in- and out-projections
        modules, ops, gemms = modules + MAMBA_MODULES, ops + MAMBA_OPS, gemms + 2
    shared = "mlp" in sublayers
    if "moe" in sublayers:
        local = m.moe.num_experts // shape.ep
        gemms += 2 * local
        ops += MOE_MLP_OPS + ROUTER_OPS[features.moe_router_fusion] + 2 * local * GEMM_OPS_PER_EXPERT[shape.precision in QUANTISED]
        ops += DISPATCH_OPS[(features.moe_token_dispatcher, features.moe_permute_fusion)]
        modules += MOE_MLP_MODULES
        shared = m.moe.shared_ffn_hidden_size > 0
    if shared:
        modules, ops, gemms = modules + DENSE_MLP_MODULES, ops + DENSE_MLP_OPS, gemms + 2
    return modules, ops + (gemms if backward else 0)


def layer_host_s(shape: Shape, gpu: GPU, kind: str, backward: bool = False) -> float:
    """Host time to issue one decoder layer's kernels, one pass, on the
    host ``gpu`` sits in."""
    modules, ops = _layer_ops(shape, kind, backward)
    module_ops = TE_MODULE_OPS * (TE_FP8_MODULE_FACTOR if shape.precision in QUANTISED else 1.0)
    return (modules * module_ops + ops) * gpu.host_op_s


def syncs_every_moe_layer(shape: Shape) -> bool:
    """Whether each MoE layer's forward waits for the GPU (a device-to-host
    copy of the tokens per expert): every dropless dispatcher needs the
    counts on the host — alltoall for NCCL's split sizes, allgather's
    .cpu(), DeepEP's and HybridEP's permuted-token counts — and only padding
    every expert to its capacity makes the shapes static
    (token_dispatcher.py, drop_and_pad)."""
    features = shape.features
    static = features.moe_expert_capacity_factor is not None and features.moe_pad_expert_input_to_capacity
    return shape.model.moe is not None and not static
