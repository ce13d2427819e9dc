"""The cluster as a graph, and the bandwidth every pair of GPUs gets.

The graph (networkx) has a vertex per GPU, NIC, leaf switch and the spine:

    GPU --NVLink-- GPU              inside a node (NVSwitch: every pair)
    GPU --PCIe--- NIC --- leaf      the GPU's share of its NIC(s)
    leaf --- spine                  oversubscribed by ``spine_oversubscription``

Edges carry ``GBps``, what one flow gets when every GPU communicates at once
(a collective's steady state). A GPU whose NIC is down reaches the network
through the nearest working NIC of its node, over NVLink (NCCL's PXN), and
shares it. From the graph follows the pair matrix the time model and the
placement solver read:

    same node:        the NVLink edge x the node's nvlink_efficiency
    different nodes:  min(uplink_a x nic_efficiency_a, uplink_b x nic_efficiency_b),
                      / spine_oversubscription if their leaves differ

A measured links profile (``loom profile links``) gives the matrix directly.
Megatron's rank groups (``rank_groups``) map through a placement onto the
graph's GPUs, and each group is priced on the links it gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from loom.planner.cluster import Cluster, Node
from loom.planner.errors import SpecError
from loom.planner.layout import Layout

if TYPE_CHECKING:
    import networkx as nx


@dataclass(frozen=True, eq=False)  # compared by identity: cached per cluster
class Topology:
    gpus: tuple[tuple[str, int], ...]  # slot -> (host, local GPU), node by node
    host_of_slot: np.ndarray  # slot -> node index
    bandwidth_GBps: np.ndarray  # achievable GB/s between two slots, inf on the diagonal
    measured: bool  # from a links profile rather than the cluster file's figures

    @cached_property
    def slot_of(self) -> dict[tuple[str, int], int]:
        return {gpu: slot for slot, gpu in enumerate(self.gpus)}

    def slots(self, gpus: tuple[tuple[str, int], ...]) -> np.ndarray:
        """Slot indices of (host, GPU) pairs, e.g. a placement's."""
        return np.fromiter((self.slot_of[gpu] for gpu in gpus), dtype=np.int64, count=len(gpus))


def build_topology(cluster: Cluster) -> Topology:
    gpus = tuple((node.host, g) for node in cluster.nodes for g in range(cluster.gpus_per_node))
    host_of_slot = np.repeat(np.arange(len(cluster.nodes)), cluster.gpus_per_node)
    if cluster.fabric.links_profile is not None:
        return Topology(gpus, host_of_slot, measured_bandwidth(cluster, gpus), measured=True)
    return Topology(gpus, host_of_slot, pair_bandwidth(cluster_graph(cluster), cluster), measured=False)


def cluster_graph(cluster: Cluster) -> nx.Graph:
    """GPUs, NICs, leaf switches and the spine, with per-flow ``GBps`` on each edge."""
    import networkx as nx  # only clusters with a fabric need the graph

    fabric, per_node = cluster.fabric, cluster.gpus_per_node
    graph = nx.Graph()
    graph.add_node("spine", kind="spine", oversubscription=fabric.spine_oversubscription)
    for n, node in enumerate(cluster.nodes):
        leaf = ("leaf", 0 if fabric.leaf_of_node is None else fabric.leaf_of_node[n])
        graph.add_node(leaf, kind="leaf")
        graph.add_edge(leaf, "spine", kind="uplink")
        slots = [n * per_node + g for g in range(per_node)]
        for slot in slots:
            graph.add_node(("gpu", slot), kind="gpu", host=node.host)
        degraded = {(a, b): GBps for m, a, b, GBps in fabric.nvlink_GBps if m == n}
        for a in range(per_node):
            for b in range(a + 1, per_node):
                graph.add_edge(("gpu", slots[a]), ("gpu", slots[b]), kind="nvlink", GBps=min(node.nvlink_GBps, degraded.get((a, b), node.nvlink_GBps)))
        nic_GBps = _nic_GBps(node, {nic: Gbps for m, nic, Gbps in fabric.nic_Gbps if m == n})
        for nic, GBps in enumerate(nic_GBps):
            if GBps > 0:
                graph.add_edge(("nic", n, nic), leaf, kind="ib", GBps=GBps)
        users = _nic_users(nic_GBps, per_node, node.host, fabric.source)
        for g, nics in enumerate(users):
            for nic in nics:
                sharers = sum(nic in other for other in users)
                graph.add_edge(("gpu", slots[g]), ("nic", n, nic), kind="pcie", GBps=nic_GBps[nic] / sharers)
    return graph


def _nic_GBps(node: Node, overrides: dict[int, float]) -> list[float]:
    return [overrides.get(nic, node.nic_Gbps) / 8 for nic in range(node.nics_per_node)]


def _nic_users(nic_GBps: list[float], gpus: int, host: str, source: str) -> list[list[int]]:
    """The NICs each GPU sends through: its own (GPU g owns NICs g*n/gpus ..
    (g+1)*n/gpus - 1, or shares NIC g*n // gpus when there are fewer NICs than
    GPUs), or, when those are down, the nearest working NIC of the node."""
    nics, working = len(nic_GBps), [nic for nic, GBps in enumerate(nic_GBps) if GBps > 0]
    if not working:
        raise SpecError(source, "nic_overrides", f"at least one working NIC on node {host}")
    users = []
    for g in range(gpus):
        own = list(range(g * nics // gpus, max(g * nics // gpus + 1, (g + 1) * nics // gpus)))
        alive = [nic for nic in own if nic_GBps[nic] > 0]
        users.append(alive or [min(working, key=lambda nic: (abs(nic - own[0]), nic))])
    return users


def pair_bandwidth(graph: nx.Graph, cluster: Cluster) -> np.ndarray:
    """The pair matrix of the graph (see the module docstring)."""
    per_node, nodes = cluster.gpus_per_node, len(cluster.nodes)
    size = per_node * nodes
    uplink, leaf = np.zeros(size), np.zeros(size, dtype=np.int64)
    for slot in range(size):
        for _, nic, data in graph.edges(("gpu", slot), data=True):
            if data["kind"] == "pcie":
                uplink[slot] += data["GBps"] * cluster.nodes[slot // per_node].nic_efficiency
                leaf[slot] = next(v for v in graph[nic] if v[0] == "leaf")[1]
    across = np.minimum.outer(uplink, uplink)
    across /= np.where(leaf[:, None] == leaf[None, :], 1.0, graph.nodes["spine"]["oversubscription"])
    bandwidth = across
    for a, b, data in graph.edges(data=True):
        if data["kind"] == "nvlink":
            bandwidth[a[1], b[1]] = bandwidth[b[1], a[1]] = data["GBps"] * cluster.nodes[a[1] // per_node].nvlink_efficiency
    np.fill_diagonal(bandwidth, np.inf)
    return bandwidth


def measured_bandwidth(cluster: Cluster, gpus: tuple[tuple[str, int], ...]) -> np.ndarray:
    """The cluster's GPUs' pair matrix from a links profile, which must cover them all."""
    from loom.profiles.links import load_links_profile

    path = cluster.fabric.links_profile
    profile = load_links_profile(path)
    row_of = {gpu: i for i, gpu in enumerate(zip(profile.hosts, profile.local_gpus))}
    missing = [gpu for gpu in gpus if gpu not in row_of]
    if missing:
        host, gpu = missing[0]
        raise SpecError(str(path), "gpus", f"every GPU of cluster {cluster.name}; {len(missing)} missing, e.g. {host} GPU {gpu}")
    rows = np.array([row_of[gpu] for gpu in gpus])
    bandwidth = np.array(profile.bandwidth_GBps, dtype=float)[np.ix_(rows, rows)]
    np.fill_diagonal(bandwidth, np.inf)
    return bandwidth


def rank_groups(layout: Layout) -> dict[str, np.ndarray]:
    """Megatron's process groups of a layout, as rows of global ranks.

    Rank order ``tp-cp-ep-dp-pp`` (megatron.core.parallel_state.RankGenerator):
    rank = tp_i + tp (cp_i + cp (dp_i + dp pp_i)). The gradient reduce runs
    over the ``dp-cp`` group (CP ranks hold the same weights); ``pp`` rows are
    whole pipelines, ``embedding`` the first and last stage's ranks that share
    the tied word embedding; ``ep``, ``etp`` and ``expert-dp`` are the MoE layers' groups."""
    grid = np.arange(layout.world_size).reshape(layout.pp, layout.dp, layout.cp, layout.tp)
    pipelines = grid.transpose(1, 2, 3, 0).reshape(-1, layout.pp)
    # MoE layers regroup the same ranks as tp-ep-dp-pp with etp in place of tp.
    experts = np.arange(layout.world_size).reshape(layout.pp, layout.expert_dp, layout.ep, layout.etp)
    return {
        "tp": grid.reshape(-1, layout.tp),
        "cp": grid.transpose(0, 1, 3, 2).reshape(-1, layout.cp),
        "dp-cp": grid.transpose(0, 3, 1, 2).reshape(-1, layout.dp * layout.cp),
        "pp": pipelines,
        "embedding": pipelines[:, [0, -1]] if layout.pp > 1 else pipelines,
        "ep": experts.transpose(0, 1, 3, 2).reshape(-1, layout.ep),
        "etp": experts.reshape(-1, layout.etp),
        "expert-dp": experts.transpose(0, 2, 3, 1).reshape(-1, layout.expert_dp),
    }


def neighbour_pairs(pipelines: np.ndarray) -> np.ndarray:
    """Each pipeline's neighbouring stages as rows of two: the send/recv pairs."""
    if pipelines.shape[1] < 2:
        return pipelines
    return np.stack([pipelines[:, :-1], pipelines[:, 1:]], axis=-1).reshape(-1, 2)
