"""Where a parallel group lands, and the link it therefore talks over
(``Links``: one per kind of group of a layout).

Under Megatron's rank order (``tp-cp-ep-dp-pp``) and the default placement
(rank r on node r // gpus_per_node), a group of ``size`` ranks spaced
``stride`` apart is one of: inside a node (NVLink), or spread over nodes with
``k`` members per node. NCCL then runs one ring channel per NIC the group owns
in a node; on rail-optimised clusters each GPU owns ``nic_GBps_per_gpu``, so
the group's bus bandwidth is ``k x nic_GBps_per_gpu`` capped by NVLink (the
in-node part of the ring). This reproduces nccl-tests' multi-node busbw on DGX
systems (e.g. ~190 GB/s on 8x HDR A100 nodes).

A rack-scale NVLink domain (GB200/GB300 NVL72: 18 nodes of 4 GPUs) puts a
group inside it on NVLink too (NCCL's multi-node NVLink); only what leaves
the domain takes the NICs.

Those closed forms hold on a uniform cluster. On any other (mixed nodes,
degraded links, a fabric, measured links) each group is priced on the pairs
of GPUs the placement gives it, in the cluster's topology.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from loom.planner.cost.collectives import LOCAL, Link
from loom.planner.specs.hardware import Node
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout, neighbour_pairs, rank_groups
from loom.planner.specs.stages import Placement, default_placement
from loom.planner.specs.topology import Topology
from loom.solvers.links import all_to_all_GBps, crosses_nodes, fewest_members_per_node, group_bandwidth_GBps

# Per-step latency of a ring step or tree hop (NCCL Simple/LL128 protocols).
NVLINK_LATENCY_S = 3e-6
NETWORK_LATENCY_S = 8e-6


def members_per_node(size: int, stride: int, gpus_per_node: int) -> int:
    """How many of the group's ranks share one node (or NVLink domain, given
    its GPUs) under the default placement."""
    if stride >= gpus_per_node:
        return 1
    return max(1, min(size, gpus_per_node // stride))


def nvlink_gpus(node: Node, size: int, stride: int) -> int:
    """The GPUs within which a group of ``size`` ranks ``stride`` apart is
    sure to find NVLink: its NVLink domain where groups tile it (the group's
    span divides the domain or the domain divides the span), else its node:
    a 72-GPU domain cut into groups of 16 leaves one group straddling two
    racks, and the slowest group sets the pace."""
    span, domain = size * stride, node.domain_gpus
    return domain if domain % span == 0 or span % domain == 0 else node.gpus_per_node


def nvlink(node: Node) -> Link:
    return Link(node.nvlink_GBps * node.nvlink_efficiency, NVLINK_LATENCY_S, "nvlink")


def group_link(node: Node, size: int, stride: int) -> Link:
    """The link a collective over this group runs on (``node``: the slowest node)."""
    if size == 1:
        return LOCAL
    k = members_per_node(size, stride, nvlink_gpus(node, size, stride))
    if k >= size:
        return nvlink(node)
    # One ring channel per member an NVLink domain (a node, or a rack) holds,
    # each leaving it through its own GPU's NIC.
    network_GBps = k * node.nic_GBps_per_gpu * node.nic_efficiency
    return Link(min(network_GBps, node.nvlink_GBps * node.nvlink_efficiency), NETWORK_LATENCY_S, "network", k)


def pipeline_link(node: Node, stride: int, pp: int) -> Link:
    """Point-to-point between pipeline neighbours r and r + stride: NVLink when
    the whole pipeline fits in an NVLink domain, otherwise some boundary
    leaves it and, the slowest boundary setting the pace, the NIC prices every one."""
    if pp == 1:
        return LOCAL
    if stride * pp <= nvlink_gpus(node, pp, stride):
        return nvlink(node)
    return Link(node.nic_GBps_per_gpu * node.nic_efficiency, NETWORK_LATENCY_S, "network")


def all_to_all_link(node: Node, size: int, stride: int) -> tuple[Link, float]:
    """The link an all-to-all over the group runs on, and the share of each
    GPU's buffer that leaves its NVLink domain: NVLink inside one; beyond it,
    each GPU's own NIC share (an all-to-all gets no k-fold ring channels)."""
    if size == 1:
        return LOCAL, 0.0
    k = members_per_node(size, stride, nvlink_gpus(node, size, stride))
    if k >= size:
        return nvlink(node), 0.0
    return Link(node.nic_GBps_per_gpu * node.nic_efficiency, NETWORK_LATENCY_S, "network", k), (size - k) / size


@dataclass(frozen=True)
class Links:
    """The link each parallel group of the layout talks over: for a group
    kind, the slowest group's (they all run at once and the step waits)."""

    tp: Link
    cp: Link
    dp: Link  # the dp-cp group of the gradient reduce
    pp: Link  # between pipeline neighbours
    embedding: Link  # between the first and last stage
    ep: Link = LOCAL  # MoE token all-to-all (per GPU, see network.all_to_all_link)
    ep_remote_share: float = 0.0  # of each GPU's all-to-all buffer that leaves its node
    etp: Link = LOCAL  # expert tensor parallel: gathers each expert's tokens
    expert_dp: Link = LOCAL  # the experts' gradient reduce
    shard: Link = LOCAL  # sharded data parallelism: the fsdp x CP ranks that gather weights
    replicate: Link = LOCAL  # ... and the HSDP replicas that all-reduce the shards' gradients

    @classmethod
    def of(cls, job: Job, layout: Layout, placement: Placement | None = None) -> Links:
        """On a uniform cluster, by the closed forms above;
        otherwise each group priced on the GPUs ``placement`` gives it."""
        degrees = (layout.tp, layout.cp, layout.dp, layout.pp, layout.ep, layout.etp, layout.fsdp)
        if job.cluster.uniform:
            return _uniform_links(job.cluster.slowest, degrees)
        placement = placement or default_placement(job.cluster, layout.world_size)
        return _placed_links(job.cluster.topology, degrees, placement)


def _groups_layout(degrees: tuple[int, ...]) -> Layout:
    """A layout with these (tp, cp, dp, pp, ep, etp, fsdp): all its groups depend on."""
    tp, cp, dp, pp, ep, etp, fsdp = degrees
    return Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, etp=etp, fsdp=fsdp, micro_batch_size=1, global_batch_size=dp)


@functools.lru_cache(maxsize=4096)
def _uniform_links(node: Node, degrees: tuple[int, ...]) -> Links:
    layout = _groups_layout(degrees)
    stage_ranks = layout.tp * layout.cp * layout.dp
    pp = pipeline_link(node, stage_ranks, layout.pp)
    ep, ep_remote_share = all_to_all_link(node, layout.ep, layout.etp)
    return Links(
        tp=group_link(node, layout.tp, 1),
        cp=group_link(node, layout.cp, layout.tp),
        dp=group_link(node, layout.dp * layout.cp, layout.tp),
        pp=pp,
        embedding=pipeline_link(node, stage_ranks * (layout.pp - 1), 2) if layout.pp > 1 else pp,
        # Expert ranks are ordered tp-ep-dp-pp with etp in place of tp (RankGenerator for experts).
        ep=ep,
        ep_remote_share=ep_remote_share,
        etp=group_link(node, layout.etp, 1),
        expert_dp=group_link(node, layout.expert_dp, layout.etp * layout.ep),
        # Shard index inside the replica index (layout.rank_groups).
        shard=group_link(node, layout.param_shards, layout.tp) if layout.fsdp else LOCAL,
        replicate=group_link(node, layout.dp_replicate, layout.tp * layout.param_shards) if layout.fsdp else LOCAL,
    )


def _all_to_all(topology: Topology, placed: np.ndarray) -> dict:
    if placed.shape[1] == 1:
        return {"ep": LOCAL, "ep_remote_share": 0.0}
    bandwidth, share = all_to_all_GBps(topology.bandwidth_GBps, topology.host_of_slot, placed)
    # share = (n - k) / n with k members on a node (all_to_all_GBps)
    members = round(placed.shape[1] * (1 - share))
    link = Link(bandwidth, NETWORK_LATENCY_S, "network", members) if share else Link(bandwidth, NVLINK_LATENCY_S, "nvlink")
    return {"ep": link, "ep_remote_share": share}


@functools.lru_cache(maxsize=256)
def _placed_links(topology: Topology, degrees: tuple[int, ...], placement: Placement) -> Links:
    layout = _groups_layout(degrees)
    groups = rank_groups(layout)
    slots = topology.slots(placement.gpus)

    def link(ranks: np.ndarray) -> Link:
        if ranks.shape[1] == 1:
            return LOCAL
        placed = slots[ranks]
        bandwidth = float(group_bandwidth_GBps(topology.bandwidth_GBps, topology.host_of_slot, placed).min())
        if crosses_nodes(topology.host_of_slot, placed):
            return Link(bandwidth, NETWORK_LATENCY_S, "network", fewest_members_per_node(topology.host_of_slot, placed))
        return Link(bandwidth, NVLINK_LATENCY_S, "nvlink")

    return Links(
        tp=link(groups["tp"]), cp=link(groups["cp"]), dp=link(groups["dp-cp"]),
        pp=link(neighbour_pairs(groups["pp"])), embedding=link(groups["embedding"]),
        **_all_to_all(topology, slots[groups["ep"]]), etp=link(groups["etp"]), expert_dp=link(groups["expert-dp"]),
        shard=link(groups["shard"]) if layout.fsdp else LOCAL, replicate=link(groups["replicate"]) if layout.fsdp else LOCAL,
    )
