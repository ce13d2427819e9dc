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
Megatron's rank groups (``layout.rank_groups``) map through a placement onto
the graph's GPUs, and each group is priced on the links it gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loom.planner.specs.errors import SpecError
from loom.planner.specs.hardware import Fabric, Node

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


def build_topology(nodes: tuple[Node, ...], gpus_per_node: int, fabric: Fabric, name: str) -> Topology:
    """The topology of ``nodes`` (each with ``gpus_per_node`` GPUs) joined by
    ``fabric``; ``name`` is the cluster's, for error messages."""
    gpus = tuple((node.host, g) for node in nodes for g in range(gpus_per_node))
    host_of_slot = np.repeat(np.arange(len(nodes)), gpus_per_node)
    if fabric.links_profile is not None:
        return Topology(gpus, host_of_slot, measured_bandwidth(fabric.links_profile, name, gpus), measured=True)
    return Topology(gpus, host_of_slot, pair_bandwidth(cluster_graph(nodes, gpus_per_node, fabric), nodes, gpus_per_node), measured=False)


def cluster_graph(nodes: tuple[Node, ...], gpus_per_node: int, fabric: Fabric) -> nx.Graph:
    """GPUs, NICs, leaf switches and the spine, with per-flow ``GBps`` on each edge."""
    import networkx as nx  # only clusters with a fabric need the graph

    per_node = gpus_per_node
    graph = nx.Graph()
    graph.add_node("spine", kind="spine", oversubscription=fabric.spine_oversubscription)
    for n, node in enumerate(nodes):
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


def pair_bandwidth(graph: nx.Graph, nodes: tuple[Node, ...], gpus_per_node: int) -> np.ndarray:
    """The pair matrix of the graph (see the module docstring)."""
    per_node = gpus_per_node
    size = per_node * len(nodes)
    uplink, leaf = np.zeros(size), np.zeros(size, dtype=np.int64)
    for slot in range(size):
        for _, nic, data in graph.edges(("gpu", slot), data=True):
            if data["kind"] == "pcie":
                uplink[slot] += data["GBps"] * nodes[slot // per_node].nic_efficiency
                leaf[slot] = next(v for v in graph[nic] if v[0] == "leaf")[1]
    across = np.minimum.outer(uplink, uplink)
    across /= np.where(leaf[:, None] == leaf[None, :], 1.0, graph.nodes["spine"]["oversubscription"])
    bandwidth = across
    for a, b, data in graph.edges(data=True):
        if data["kind"] == "nvlink":
            bandwidth[a[1], b[1]] = bandwidth[b[1], a[1]] = data["GBps"] * nodes[a[1] // per_node].nvlink_efficiency
    np.fill_diagonal(bandwidth, np.inf)
    return bandwidth


def measured_bandwidth(path: Path, cluster_name: str, gpus: tuple[tuple[str, int], ...]) -> np.ndarray:
    """The GPUs' pair matrix from the links profile at ``path``, which must cover them all."""
    from loom.profiles.links import load_links_profile

    profile = load_links_profile(path)
    row_of = {gpu: i for i, gpu in enumerate(zip(profile.hosts, profile.local_gpus))}
    missing = [gpu for gpu in gpus if gpu not in row_of]
    if missing:
        host, gpu = missing[0]
        raise SpecError(str(path), "gpus", f"every GPU of cluster {cluster_name}; {len(missing)} missing, e.g. {host} GPU {gpu}")
    rows = np.array([row_of[gpu] for gpu in gpus])
    bandwidth = np.array(profile.bandwidth_GBps, dtype=float)[np.ix_(rows, rows)]
    np.fill_diagonal(bandwidth, np.inf)
    return bandwidth
