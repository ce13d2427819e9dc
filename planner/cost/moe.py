"""What a Megatron-Core MoE layer spends beyond a dense layer's GEMMs, per
micro batch on one GPU: the routed experts' GEMMs as Transformer Engine
runs them, the token dispatcher's traffic and its memory passes, and how
token dropping and load imbalance set the busiest rank's rows.

Sources: megatron-core 0.16.1 ``transformer/moe/`` (token_dispatcher.py,
experts.py, moe_utils.py, fused_a2a.py), Transformer Engine 2.x
``GroupedLinear`` and DeepEP (github.com/deepseek-ai/DeepEP).
"""

from __future__ import annotations

import math

from loom.planner.cost.collectives import Link, all_gather_s
from loom.planner.cost.efficiency import backward_gemms, gemm_time_s
from loom.planner.cost.shape import Shape
from loom.planner.specs.job import Features
from loom.planner.specs.model import MoE
from loom.profiles.catalogue import GPU

# SMs the fused dispatchers' kernels occupy while they run: megatron-core
# 0.16.1 TransformerConfig moe_deepep_num_sms = 20, moe_hybridep_num_sms = 16.
# (NCCL's all-to-all runs on as many SMs as its channels: contention.py.)
DISPATCHER_SMS = {"deepep": 20, "hybridep": 16}
# Transformer Engine's GroupedLinear issues one cuBLAS GEMM per local expert,
# round-robin over its compute streams (TE cpp_extensions/gemm.py
# general_grouped_gemm -> nvte_multi_tensor_gemm; the stream pool of
# common/util/multi_stream.cpp, get_num_compute_streams() = 4): at most four
# experts' GEMMs share the SMs at once, each padded to its own tiles.
TE_GEMM_STREAMS = 4


def load_imbalance(features: Features, ep: int, moe: MoE) -> float:
    """``features.moe_load_imbalance`` at expert parallel size ``ep``: the
    number, or from a mapping by EP size (``loom experts`` prints one), the
    listed value, else linear in log2(ep) between the listed sizes around
    it (from 1.0 at EP 1: one rank holds every expert), the largest listed
    size's value beyond them; never above what routing can reach there
    (MoE.most_imbalance)."""
    return min(_listed_imbalance(features, ep), moe.most_imbalance(ep))


def _listed_imbalance(features: Features, ep: int) -> float:
    if not isinstance(features.moe_load_imbalance, tuple):
        return features.moe_load_imbalance
    given = dict(features.moe_load_imbalance)
    if ep in given:
        return given[ep]
    points = sorted({1: 1.0, **given}.items())
    below = max((point for point in points if point[0] < ep), default=points[0])
    above = min((point for point in points if point[0] > ep), default=None)
    if above is None:
        return below[1]
    share = (math.log2(ep) - math.log2(below[0])) / (math.log2(above[0]) - math.log2(below[0]))
    return below[1] + share * (above[1] - below[1])


def busiest_rows_factor(shape: Shape) -> float:
    """Rows the busiest expert rank computes (and receives) over an evenly
    loaded rank's. Dropless, it takes the load imbalance at the shape's EP
    size times its share; a capacity factor drops what exceeds
    capacity_factor x the even share, and padding to capacity makes every
    expert compute exactly that many rows (moe_utils.get_capacity and
    apply_router_token_dropping)."""
    features = shape.features
    imbalance = load_imbalance(features, shape.ep, shape.model.moe)
    capacity = features.moe_expert_capacity_factor
    if capacity is None:
        return imbalance
    if features.moe_pad_expert_input_to_capacity:
        return capacity
    return min(imbalance, capacity)


def expert_gemms_s(gpu: GPU, gemms: list[tuple[int, int, int]], local_experts: int, precision: str, backward: bool) -> float:
    """Time of every local expert's GEMMs ``gemms`` (m, n, k per expert) —
    or their backward (dgrad and wgrad) — as TE runs them: groups of
    ``TE_GEMM_STREAMS`` concurrent GEMMs, one after another."""
    expanded = [g for mnk in gemms for g in backward_gemms(*mnk)] if backward else gemms
    concurrent = min(local_experts, TE_GEMM_STREAMS)
    rounds = math.ceil(local_experts / concurrent)
    return rounds * sum(gemm_time_s(*mnk, gpu, precision, batch=concurrent) for mnk in expanded)


def _comb(n: int, k: int) -> float:
    return math.comb(n, k) if 0 <= k <= n else 0.0


def expected_destinations(num_experts: int, experts_per_group: int, top_k: int) -> float:
    """Expected number of groups (ranks, or nodes) holding at least one of a
    token's ``top_k`` experts, experts drawn uniformly without replacement
    and each group holding ``experts_per_group`` of them:
    groups x (1 - C(E - e, k) / C(E, k))."""
    groups = num_experts // experts_per_group
    miss = _comb(num_experts - experts_per_group, top_k) / _comb(num_experts, top_k)
    return groups * (1.0 - miss)


def dispatch_bytes(shape: Shape, ranks_per_node: int) -> tuple[float, float]:
    """Bytes one GPU sends in one dispatch (or receives in one combine), as
    (all of it, the part that leaves its node), 16-bit tokens (megatron-core
    0.16.1 dispatches in bf16: fused_a2a.py fp8_dispatch = False).

    - ``alltoall``: every routed copy: tokens x top_k rows (token_dispatcher.py
      MoEAlltoAllTokenDispatcher; NCCL all_to_all_single).
    - ``deepep`` / ``hybridep``: one copy per destination rank, and across nodes
      one per destination node, forwarded over NVLink there (DeepEP README,
      "normal kernels"; HybridEP's hierarchical dispatch).
    - ``allgather``: every token to all ep x etp ranks (MoEAllGatherTokenDispatcher).
    """
    moe, ep = shape.model.moe, shape.ep
    tokens_bytes = shape.moe_tokens * shape.model.hidden_size * shape.act_bytes
    local = moe.num_experts // ep
    nodes = max(1, ep // ranks_per_node)
    remote = (nodes - 1) / nodes
    dispatcher = shape.features.moe_token_dispatcher
    if dispatcher == "alltoall":
        sent = tokens_bytes * moe.top_k * (ep - 1) / ep
        return sent, tokens_bytes * moe.top_k * remote
    if dispatcher == "allgather":
        sent = tokens_bytes * (ep * shape.etp - 1)
        return sent, tokens_bytes * (nodes - 1) * ranks_per_node
    ranks = expected_destinations(moe.num_experts, local, moe.top_k) * shape.etp
    if nodes == 1:
        return tokens_bytes * ranks * (ep - 1) / ep, 0.0
    remote_nodes = expected_destinations(moe.num_experts, local * ranks_per_node, moe.top_k) * remote
    return tokens_bytes * ranks, tokens_bytes * remote_nodes


def permute_bytes(shape: Shape) -> float:
    """Bytes the dispatcher's local permutations read and write in one
    forward pass (backward moves the same): the top-k gather of the tokens
    and the weighted scatter back (moe_utils.permute / unpermute), and with
    more than one local expert the sort of the received rows by expert and
    back (sort_chunks_by_idxs). HybridEP fuses all of them into its dispatch
    and combine kernels (fused_a2a.py HybridEPDispatch, dispatch_with_permute)."""
    moe = shape.model.moe
    if shape.features.moe_token_dispatcher == "hybridep":
        return 0.0
    rows = shape.moe_tokens * moe.top_k * busiest_rows_factor(shape)
    row_bytes = shape.model.hidden_size * shape.act_bytes
    passes = 2 + (2 if moe.num_experts // shape.ep > 1 and shape.features.moe_token_dispatcher == "alltoall" else 0)
    return passes * 2 * rows * row_bytes


def dispatch_s(shape: Shape, link: Link, remote_share: float) -> float:
    """One dispatch (or one combine) of one pass on the EP group's ``link``,
    of which ``remote_share`` of an all-to-all's buffer leaves the node
    (network.all_to_all_link). Inside a node all bytes cross NVLink; across
    nodes the network carries the remote bytes while NVLink carries the rest
    at the same time, and the network sets the pace; the busiest rank's
    share is the load imbalance's, and small messages to each remote peer
    reach only message_efficiency of it. Each of the ep - 1 peers costs one
    message latency. The all-gather dispatcher all-gathers
    every token over the ep x etp ranks (its combine reduce-scatters them)."""
    ep = shape.ep
    if ep * shape.etp == 1:
        return 0.0
    if shape.features.moe_token_dispatcher == "allgather":
        tokens_bytes = shape.moe_tokens * shape.model.hidden_size * shape.act_bytes
        return all_gather_s(tokens_bytes * ep * shape.etp, ep * shape.etp, link)
    ranks_per_node = max(1, round(ep * (1 - remote_share)))
    sent, remote = dispatch_bytes(shape, ranks_per_node)
    if not remote_share:
        return (ep - 1) * link.latency_s + link.seconds(sent) * busiest_rows_factor(shape)
    # The busiest rank receives (and in the combine sends) its extra rows;
    # small messages to each remote peer run below the NIC's bandwidth.
    remote_peers = max(1, ep - ranks_per_node)
    return (ep - 1) * link.latency_s + link.seconds(remote) * busiest_rows_factor(shape) / message_efficiency(remote / remote_peers)


# NCCL's all-to-all across nodes at 128 KiB per peer (64 H800, 8 MiB per rank)
# reached 24-28 GB/s bus bandwidth against 45-49 at large messages: about half
# (NVIDIA/nccl issue #1531).
A2A_HALF_BANDWIDTH_PEER_BYTES = 128 * 2**10


def message_efficiency(bytes_per_peer: float) -> float:
    """Share of the network bandwidth an all-to-all reaches with
    ``bytes_per_peer`` to each remote peer: m / (m + m_half), half at
    A2A_HALF_BANDWIDTH_PEER_BYTES (a per-message cost the bandwidth must
    amortise, as in Hockney's model)."""
    return bytes_per_peer / (bytes_per_peer + A2A_HALF_BANDWIDTH_PEER_BYTES)


# DeepEP's buffer (deep_ep Buffer, sized by megatron-core fused_a2a.get_buffer
# from Buffer.get_dispatch_config / get_combine_config, DeepEP v1.2.1
# csrc/config.hpp): --moe-deepep-num-sms 20 gives 10 channels; each NVLink
# peer's channel queues Rn tokens of hidden_bytes plus index, scale and
# weight slots, each RDMA peer's Rr tokens; plus a 32 MiB workspace.
DEEPEP_CHANNELS = 10
DEEPEP_NVL_RECV_TOKENS = {8: 256, 64: 288, 128: 560}  # group size up to which each applies
DEEPEP_RDMA_RECV_TOKENS = {16: 140, 32: 128, 64: 140, 128: 132}
DEEPEP_TOKEN_META_BYTES = 8 + 128 * 8 + 128 * 4 + 128 * 4
DEEPEP_WORKSPACE_BYTES = 32 * 2**20
GPUS_PER_NVLINK_PEERS = 8  # DeepEP's NUM_MAX_NVL_PEERS
# HybridEP (HybridEPBuffer, DeepEP hybrid-ep csrc/hybrid_ep/hybrid_ep.cu):
# room for every rank's tokens at once, at least 512 tokens per rank.
HYBRIDEP_MIN_TOKENS = 512


def _at_most(table: dict[int, int], n: int) -> int:
    return next((value for size, value in sorted(table.items()) if n <= size), table[max(table)])


def dispatcher_buffer_bytes(shape: Shape) -> float:
    """Memory the token dispatcher holds for the whole run, outside the
    activations: DeepEP's NVLink (and RDMA) queues, HybridEP's worst-case
    token, probability and all-gather buffers, or the all-gather
    dispatcher's persistent gathered tokens (megatron-core's "mpu" global
    memory buffer, tensor_parallel/mappings.py). alltoall keeps none. Both
    DeepEP and HybridEP take 8 GPUs to an NVLink domain."""
    moe, dispatcher = shape.model.moe, shape.features.moe_token_dispatcher
    n = shape.ep * shape.etp
    if moe is None or n == 1 or dispatcher == "alltoall":
        return 0.0
    hidden_bytes = shape.model.hidden_size * shape.act_bytes
    if dispatcher == "allgather":
        return shape.moe_tokens * n * hidden_bytes
    if dispatcher == "hybridep":
        tokens = max(shape.moe_tokens, HYBRIDEP_MIN_TOKENS) * n
        local, ranks_per_node = moe.num_experts // shape.ep, min(n, GPUS_PER_NVLINK_PEERS)
        nodes = max(1, n // ranks_per_node)
        return (tokens * hidden_bytes + tokens * local * ranks_per_node * 4 + moe.num_experts * shape.moe_tokens * n
                + shape.moe_tokens * hidden_bytes * (1 + 3 * (nodes - 1)) * (nodes > 1))
    nvl, rdma = min(n, GPUS_PER_NVLINK_PEERS), max(n // GPUS_PER_NVLINK_PEERS, 1)
    nvl_bytes = DEEPEP_CHANNELS * nvl * (2 * rdma + 3) * 4
    nvl_bytes += DEEPEP_CHANNELS * nvl * _at_most(DEEPEP_NVL_RECV_TOKENS, n) * (hidden_bytes + DEEPEP_TOKEN_META_BYTES)
    rdma_bytes = 0.0
    if n > GPUS_PER_NVLINK_PEERS:
        rdma_bytes = DEEPEP_CHANNELS * rdma * (8 * 2 + 2) * 2 * 4
        rdma_bytes += DEEPEP_CHANNELS * rdma * _at_most(DEEPEP_RDMA_RECV_TOKENS, n) * 2 * (hidden_bytes + DEEPEP_TOKEN_META_BYTES + 16)
    return nvl_bytes + rdma_bytes + DEEPEP_WORKSPACE_BYTES


def forward_transient_bytes(shape: Shape) -> float:
    """What an MoE layer holds for a moment beyond what it saves, on the
    busiest rank: each permutation and all-to-all reads one buffer of routed
    rows and writes another, so two are alive at once (the permuted tokens
    and the all-to-all's output, then that and its expert-sorted copy:
    token_dispatcher.py); HybridEP writes the sorted rows straight into its
    own buffer (one); the all-gather dispatcher unpermutes into a full
    [tokens x ep x etp, hidden] tensor before its reduce-scatter."""
    moe = shape.model.moe
    if moe is None:
        return 0.0
    row_bytes = shape.model.hidden_size * shape.act_bytes
    if shape.features.moe_token_dispatcher == "allgather":
        return shape.moe_tokens * shape.ep * shape.etp * row_bytes
    rows = shape.moe_tokens * moe.top_k * shape.etp * busiest_rows_factor(shape)
    return (1 if shape.features.moe_token_dispatcher == "hybridep" else 2) * rows * row_bytes
