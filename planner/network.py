"""Where a parallel group lands, and the link it therefore talks over.

Under Megatron's rank order (``tp-cp-ep-dp-pp``) and the default placement
(rank r on node r // gpus_per_node), a group of ``size`` ranks spaced
``stride`` apart is one of: inside a node (NVLink), or spread over nodes with
``k`` members per node. NCCL then runs one ring channel per NIC the group owns
in a node; on rail-optimised clusters each GPU owns ``nic_GBps_per_gpu``, so
the group's bus bandwidth is ``k x nic_GBps_per_gpu`` capped by NVLink (the
in-node part of the ring). This reproduces nccl-tests' multi-node busbw on DGX
systems (e.g. ~190 GB/s on 8x HDR A100 nodes).
"""

from __future__ import annotations

from loom.planner.cluster import Node
from loom.planner.collectives import LOCAL, Link

# Per-step latency of a ring step or tree hop (NCCL Simple/LL128 protocols).
NVLINK_LATENCY_S = 3e-6
NETWORK_LATENCY_S = 8e-6


def members_per_node(size: int, stride: int, gpus_per_node: int) -> int:
    """How many of the group's ranks share one node under the default placement."""
    if stride >= gpus_per_node:
        return 1
    return max(1, min(size, gpus_per_node // stride))


def nvlink(node: Node) -> Link:
    return Link(node.nvlink_GBps * node.nvlink_efficiency, NVLINK_LATENCY_S, "nvlink")


def group_link(node: Node, size: int, stride: int) -> Link:
    """The link a collective over this group runs on (``node``: the slowest node)."""
    if size == 1:
        return LOCAL
    k = members_per_node(size, stride, node.gpus_per_node)
    if k >= size:
        return nvlink(node)
    network_GBps = k * node.nic_GBps_per_gpu * node.nic_efficiency
    return Link(min(network_GBps, node.nvlink_GBps * node.nvlink_efficiency), NETWORK_LATENCY_S, "network")


def pipeline_link(node: Node, stride: int, pp: int) -> Link:
    """Point-to-point between pipeline neighbours r and r + stride: NVLink when
    the whole pipeline fits in a node, otherwise some boundary crosses nodes
    and, the slowest boundary setting the pace, the NIC prices every one."""
    if pp == 1:
        return LOCAL
    if stride * pp <= node.gpus_per_node:
        return nvlink(node)
    return Link(node.nic_GBps_per_gpu * node.nic_efficiency, NETWORK_LATENCY_S, "network")


def all_to_all_link(node: Node, size: int, stride: int) -> tuple[Link, float]:
    """The link an all-to-all over the group runs on, and the share of each
    GPU's buffer that leaves its node: NVLink inside a node; across nodes,
    each GPU's own NIC share (an all-to-all gets no k-fold ring channels)."""
    if size == 1:
        return LOCAL, 0.0
    k = members_per_node(size, stride, node.gpus_per_node)
    if k >= size:
        return nvlink(node), 0.0
    return Link(node.nic_GBps_per_gpu * node.nic_efficiency, NETWORK_LATENCY_S, "network"), (size - k) / size
