"""The cluster spec: nodes of GPUs joined by NVLink inside a node and NICs
between nodes, read from YAML.

Example::

    nodes: 16
    gpus_per_node: 8
    gpu: H100
    nvlink_GBps: 450        # per GPU, per direction
    nics_per_node: 8
    nic_Gbps: 400           # line rate of one NIC
    power_limit_W: 500      # optional: the GPUs' power cap, below their TDP
    nvlink_domain_nodes: 18 # optional: consecutive nodes one NVLink domain joins (GB200 NVL72: 18 of 4 GPUs)
    node_overrides:         # optional: nodes that differ from the rest
      - {node: 3, nic_Gbps: 200}
    # Optional fabric details (see planner/specs/topology.py), for placement:
    nodes_per_leaf: 32           # nodes under one leaf switch, in node order; or
    leaves: [[node000, node005], [node001, ...]]   # the nodes of each leaf switch
    spine_oversubscription: 2    # leaf down- : uplink bandwidth (1 = non-blocking)
    nic_overrides:               # a degraded or missing NIC (Gbps: 0); no node = every node
      - {node: 5, nic: 2, Gbps: 100}
      - {nic: 7, Gbps: 0}        # rail 7 is down
    link_overrides:              # a degraded NVLink between two GPUs of a node
      - {node: 4, gpus: [1, 2], GBps: 100}
    links_profile: links.json    # measured pair bandwidths (loom profile links) replace the figures
    nccl_tests: nccl.json        # nccl-tests bus bandwidths (loom profile nccl-tests) set the link efficiencies
"""

from __future__ import annotations

import dataclasses
import functools
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path


from loom.planner.specs.errors import SpecError
from loom.planner.specs.files import StrictModel, count, rate, read_json, read_mapping, validate
from loom.planner.specs.hardware import Fabric, Node
from loom.planner.specs.topology import Topology, build_topology
from loom.profiles.catalogue import GPU, find_gpu, power_limited
from loom.profiles.nccl_tests import NcclTestsDocument

# What no cluster has (the error message states the limit): 131,072 nodes
# (a million GPUs), 1,024 GPUs a node, 64 NICs a node, 10 TB/s of NVLink per
# GPU, 10 Tb/s per NIC; nor a GPU link under 1 GB/s (a PCIe Gen1 x4 link) or
# a NIC under 1 Gb/s (Ethernet's slowest data-center rate): below those a
# figure is a unit mistake (1e-300 priced a step of 4.67e300 s).
MAX_NODES, MAX_GPUS_PER_NODE, MAX_NICS = 1 << 17, 1024, 64
NVLINK_GBPS = NIC_GBPS = rate(10_000, minimum=1.0, inclusive_minimum=True)
POWER_W = rate(10_000)  # a GPU's power cap; the GPU's own TDP bounds it (catalogue.power_limited)
NodeIndex = count(MAX_NODES - 1, minimum=0)
# A host name as RFC 1123 allows it (labels of letters, digits and hyphens,
# not starting or ending with a hyphen, joined by dots; 253 characters at
# most): launch files write hosts into shell scripts and #SBATCH
# --nodelist, so anything else (spaces, quotes, ``;``, ``$(...)``) is refused.
HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"{HOST_LABEL}(?:\.{HOST_LABEL})*")
MAX_HOST_NAME = 253


class NodeOverride(StrictModel):
    node: NodeIndex | str  # index or host name
    gpu: str | None = None
    nvlink_GBps: NVLINK_GBPS | None = None
    nics_per_node: count(MAX_NICS) | None = None
    nic_Gbps: NIC_GBPS | None = None
    power_limit_W: POWER_W | None = None


class NicOverride(StrictModel):
    node: NodeIndex | str | None = None  # index or host name; None: the NIC on every node (a rail)
    nic: count(MAX_NICS - 1, minimum=0)
    Gbps: rate(10_000, inclusive_minimum=True)  # 0: missing or down


class LinkOverride(StrictModel):
    node: NodeIndex | str
    gpus: tuple[count(MAX_GPUS_PER_NODE - 1, minimum=0), count(MAX_GPUS_PER_NODE - 1, minimum=0)]
    GBps: NVLINK_GBPS  # per direction, like nvlink_GBps


class ClusterFile(StrictModel):
    name: str | None = None
    nodes: count(MAX_NODES)
    gpus_per_node: count(MAX_GPUS_PER_NODE)
    gpu: str
    nvlink_GBps: NVLINK_GBPS
    nics_per_node: count(MAX_NICS)
    nic_Gbps: NIC_GBPS
    power_limit_W: POWER_W | None = None
    nvlink_domain_nodes: count(MAX_NODES) = 1
    hosts: list[str] | None = None
    node_overrides: list[NodeOverride] = []
    nodes_per_leaf: count(MAX_NODES) | None = None
    leaves: list[list[NodeIndex | str]] | None = None
    spine_oversubscription: rate(1_000, minimum=1.0, inclusive_minimum=True) = 1.0
    nic_overrides: list[NicOverride] = []
    link_overrides: list[LinkOverride] = []
    links_profile: str | None = None
    nccl_tests: str | None = None


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: tuple[Node, ...]
    gpus_per_node: int
    fabric: Fabric = Fabric()
    # False when the file names no hosts: the nodes are placeholders
    # (node000, ...) for whichever the scheduler gives, in its order.
    named_hosts: bool = True

    @property
    def num_gpus(self) -> int:
        return len(self.nodes) * self.gpus_per_node

    @property
    def gpu_summary(self) -> str:
        """How many GPUs of each kind: "64 x H100-SXM5-80GB", or "8 x
        A100-SXM4-40GB + 8 x H100-SXM5-80GB" on a mixed cluster."""
        counts = Counter(node.gpu.kind for node in self.nodes)
        return " + ".join(f"{count * self.gpus_per_node} x {kind}" for kind, count in sorted(counts.items()))

    @cached_property
    def slowest(self) -> Node:
        """A node with the least of everything: synchronous training runs at the
        pace of its slowest member, so uniform-cluster formulas use this node."""
        gpu = group_gpu(self.gpu_types)
        return Node(
            host="slowest",
            gpu=gpu,
            nvlink_GBps=min(n.nvlink_GBps for n in self.nodes),
            nics_per_node=min(n.nics_per_node for n in self.nodes),
            nic_Gbps=min(n.nic_Gbps for n in self.nodes),
            gpus_per_node=self.gpus_per_node,
            nvlink_efficiency=min(n.nvlink_efficiency for n in self.nodes),
            nic_efficiency=min(n.nic_efficiency for n in self.nodes),
            nvlink_domain_gpus=min(n.domain_gpus for n in self.nodes),
        )

    @property
    def hosts(self) -> list[str]:
        return [n.host for n in self.nodes]

    @cached_property
    def gpu_types(self) -> tuple[GPU, ...]:
        """The distinct GPUs of the nodes, in node order."""
        return tuple(dict.fromkeys(n.gpu for n in self.nodes))

    @cached_property
    def heterogeneous(self) -> bool:
        return len({n.gpu.kind for n in self.nodes}) > 1

    @cached_property
    def node_of_host(self) -> dict[str, Node]:
        return {node.host: node for node in self.nodes}

    @cached_property
    def uniform(self) -> bool:
        """Every node alike and nothing in between: the closed-form link
        formulas of planner/cost/network.py are exact, no graph is needed."""
        return self.fabric.plain and len(set(n[1:] for n in map(_node_figures, self.nodes))) == 1

    @cached_property
    def topology(self) -> Topology:
        """The graph of GPUs, NICs and switches with every pair's bandwidth."""
        return build_topology(self.nodes, self.gpus_per_node, self.fabric, self.name)

    def fastest_nodes(self, count: int) -> Cluster:
        """The cluster of ``count`` of its nodes, in their order, the others
        left idle: those with the slowest GPUs, then the slowest NICs, then
        the slowest NVLink (ties: the last nodes); with NVLink domains of
        several nodes, the last whole domains. Switches and link figures are
        kept. Raises ValueError when ``count`` would split an NVLink domain
        or the links were measured pair by pair (a links profile describes
        the whole cluster)."""
        domain_nodes = self.slowest.domain_gpus // self.gpus_per_node
        if not 0 < count <= len(self.nodes) or count % domain_nodes or self.fabric.links_profile is not None:
            raise ValueError(f"cannot keep {count} of the {len(self.nodes)} nodes of {self.name}")
        if domain_nodes > 1:
            kept = list(range(count))
        else:
            def strength(i: int) -> tuple:
                node = self.nodes[i]
                nic = min([node.nic_Gbps, *(gbps for n, _, gbps in self.fabric.nic_Gbps if n == i)])
                nvlink = min([node.nvlink_GBps, *(gbps for n, _, _, gbps in self.fabric.nvlink_GBps if n == i)])
                return (gpu_pace(node.gpu), nic, nvlink, -i)

            kept = sorted(sorted(range(len(self.nodes)), key=strength, reverse=True)[:count])
        new_index = {old: new for new, old in enumerate(kept)}
        fabric = dataclasses.replace(
            self.fabric,
            leaf_of_node=None if self.fabric.leaf_of_node is None else tuple(self.fabric.leaf_of_node[i] for i in kept),
            nic_Gbps=tuple((new_index[n], nic, gbps) for n, nic, gbps in self.fabric.nic_Gbps if n in new_index),
            nvlink_GBps=tuple((new_index[n], a, b, gbps) for n, a, b, gbps in self.fabric.nvlink_GBps if n in new_index),
        )
        return dataclasses.replace(self, nodes=tuple(self.nodes[i] for i in kept), fabric=fabric)

    def slowest_gpu(self, hosts: set[str]) -> GPU:
        """The GPU a group over ``hosts`` runs as (group_gpu)."""
        return group_gpu(tuple(dict.fromkeys(self.node_of_host[host].gpu for host in sorted(hosts))))


def is_host_name(host: str) -> bool:
    """``host`` is a valid RFC 1123 host name (see HOST_NAME)."""
    return 0 < len(host) <= MAX_HOST_NAME and HOST_NAME.fullmatch(host) is not None


def _node_figures(node: Node) -> tuple:
    return (node.host, node.gpu.kind, node.nvlink_GBps, node.nics_per_node, node.nic_Gbps, node.nvlink_efficiency, node.nic_efficiency)


@functools.cache
def group_gpu(gpus: tuple[GPU, ...]) -> GPU:
    """What a group spanning ``gpus`` (distinct types) runs as: at its
    slowest member's pace, in its smallest member's memory (every rank
    holds the same share) and at its slowest host's pace issuing kernels
    (the group's collectives wait for it) — a type of its own when those are
    other GPUs' (one object per set, so identity stays equality)."""
    slowest = min(gpus, key=gpu_pace)
    smallest = min(gpus, key=lambda gpu: gpu.memory_bytes)
    host_op_s = max(gpu.host_op_s for gpu in gpus)
    if smallest.memory_bytes >= slowest.memory_bytes and host_op_s == slowest.host_op_s:
        return slowest
    name = slowest.name if smallest.memory_bytes >= slowest.memory_bytes else f"{slowest.name}/{smallest.name}"
    return dataclasses.replace(slowest, name=name, memory_bytes=smallest.memory_bytes, host_op_s=host_op_s)


def gpu_pace(gpu: GPU) -> tuple[float, int]:
    """Orders GPUs slowest (then smallest) first."""
    return (gpu.peak_tflops["bf16"] * gpu.clock_fraction, gpu.memory_bytes)


def cluster_from_spec(spec: ClusterFile, source: str, prefix: str = "") -> Cluster:
    """Expand the file's defaults and overrides into one Node per node.
    ``prefix`` names where the cluster sits in its file (``cluster`` inline)."""

    def at(field: str) -> str:
        return f"{prefix}.{field}" if prefix else field

    hosts = spec.hosts if spec.hosts is not None else [f"node{i:03d}" for i in range(spec.nodes)]
    for i, host in enumerate(hosts):
        if not is_host_name(host):
            raise SpecError(source, at(f"hosts.{i}"), f"a host name: letters, digits, hyphens and dots, 1 to {MAX_HOST_NAME} characters, "
                            "no label starting or ending with a hyphen (RFC 1123)", host)
    if len(hosts) != spec.nodes:
        raise SpecError(source, at("hosts"), f"{spec.nodes} host names, one per node", len(hosts))
    lowered = [host.lower() for host in hosts]  # host names ignore case (RFC 4343)
    repeated = sorted({host for host, low in zip(hosts, lowered) if lowered.count(low) > 1})
    if repeated:
        raise SpecError(source, at("hosts"), "a different name for every node (names ignore case)", repeated[0])
    base = dict(gpu=spec.gpu, nvlink_GBps=spec.nvlink_GBps, nics_per_node=spec.nics_per_node, nic_Gbps=spec.nic_Gbps,
                power_limit_W=spec.power_limit_W)
    per_node = [dict(base) for _ in hosts]
    gpu_field = [at("gpu")] * spec.nodes  # where each node's GPU type was given, for error messages
    power_field = [at("power_limit_W")] * spec.nodes
    overridden: set[int] = set()
    for i, override in enumerate(spec.node_overrides):
        index = hosts.index(override.node) if override.node in hosts else override.node
        if not isinstance(index, int) or not 0 <= index < spec.nodes:
            raise SpecError(source, at(f"node_overrides.{i}.node"), f"a node index below {spec.nodes} or a host name", override.node)
        if index in overridden:
            raise SpecError(source, at(f"node_overrides.{i}.node"), "a node no earlier override names (one entry per node)", override.node)
        overridden.add(index)
        per_node[index].update(override.model_dump(exclude={"node"}, exclude_none=True))
        if override.gpu is not None:
            gpu_field[index] = at(f"node_overrides.{i}.gpu")
        if override.power_limit_W is not None:
            power_field[index] = at(f"node_overrides.{i}.power_limit_W")
    efficiencies = _measured_efficiencies(spec, source, at, hosts, per_node) if spec.nccl_tests else {}
    nodes = tuple(
        Node(
            host=host,
            gpu=_capped_gpu(find_gpu(fields["gpu"], source, field), fields["power_limit_W"], source, limit_field),
            nvlink_GBps=fields["nvlink_GBps"],
            nics_per_node=fields["nics_per_node"],
            nic_Gbps=fields["nic_Gbps"],
            gpus_per_node=spec.gpus_per_node,
            nvlink_domain_gpus=spec.gpus_per_node * spec.nvlink_domain_nodes,
            **efficiencies,
        )
        for host, fields, field, limit_field in zip(hosts, per_node, gpu_field, power_field)
    )
    _check_domains(spec, source, at)
    _check_one_vendor(nodes, per_node, gpu_field, source)
    return Cluster(name=spec.name or Path(source).stem, nodes=nodes, gpus_per_node=spec.gpus_per_node, fabric=_fabric(spec, hosts, source, at),
                   named_hosts=spec.hosts is not None)


def _check_one_vendor(nodes: tuple[Node, ...], per_node: list[dict], gpu_field: list[str], source: str) -> None:
    """One job's GPUs are one vendor's: its collectives run in one
    communicator, NCCL's on NVIDIA GPUs (those with a CUDA compute
    capability) or RCCL's on AMD's, and neither joins the other's."""
    nvidia = [node.gpu.compute_capability is not None for node in nodes]
    other = next((i for i, flag in enumerate(nvidia) if flag != nvidia[0]), None)
    if other is not None:
        vendor = "an NVIDIA" if nvidia[0] else "a non-NVIDIA"
        raise SpecError(source, gpu_field[other], f"{vendor} GPU like node 0's {nodes[0].gpu.name} (one job's collectives form one NCCL "
                        "or RCCL communicator; neither spans both vendors' GPUs)", per_node[other]["gpu"])


def _check_domains(spec: ClusterFile, source: str, at) -> None:
    """NVLink domains larger than a node tile the cluster in whole domains, on
    a uniform cluster: loom prices them by the closed forms of
    planner/cost/network.py (its topology graph and placement solver know
    NVLink inside a node only)."""
    domain = spec.nvlink_domain_nodes
    if domain == 1:
        return
    if spec.nodes % domain:
        raise SpecError(source, at("nvlink_domain_nodes"), f"a divisor of nodes = {spec.nodes} (whole NVLink domains)", domain)
    fabric = [name for name in ("node_overrides", "nic_overrides", "link_overrides", "leaves", "nodes_per_leaf", "links_profile")
              if getattr(spec, name)]
    if fabric:
        raise SpecError(source, at("nvlink_domain_nodes"), f"1 with {fabric[0]} (NVLink domains beyond a node are priced on uniform "
                        "clusters only)", domain)


def _capped_gpu(gpu: GPU, power_limit_W: float | None, source: str, field: str) -> GPU:
    """``gpu`` under the node's power cap (profiles/catalogue.py power_limited)."""
    try:
        return power_limited(gpu, power_limit_W)
    except ValueError as problem:
        raise SpecError(source, field, str(problem), power_limit_W) from None


# How far a run's bus bandwidth (nccl-tests doc/PERFORMANCE.md) may exceed the
# line rate the cluster declares. In-network reduction (NVLink SHARP,
# InfiniBand SHARP) sends each byte of a collective once instead of 2(n-1)/n
# times, so its busbw can reach twice the links' rate; a point-to-point or
# all-to-all run cannot beyond the datasheet's rounding (an H100's 18 NVLink 4
# links carry 18 x 26.6 = 478 GB/s per direction, quoted as 450) [derived].
MAX_BUS_EFFICIENCY = {"in_network": 2.0, "point_to_point": 1.1}
IN_NETWORK_OPS = ("all_reduce", "reduce_scatter", "all_gather", "reduce", "broadcast")


def _measured_efficiencies(spec: ClusterFile, source: str, at, hosts: list[str], per_node: list[dict]) -> dict[str, float]:
    """NVLink and NIC efficiency from an imported nccl-tests profile: each
    run's bus bandwidth at its largest message (busbw is normalised to be
    comparable to the links' speed, nccl-tests doc/PERFORMANCE.md) over the
    line rate it ran on, from the nodes it ran on (``per_node`` fields of
    ``hosts``; a host the cluster does not name counts as the default node).
    Runs inside one NVLink domain (a node, or nvlink_domain_nodes of them)
    measure NVLink; runs across domains with k GPUs per node measure the
    NICs k GPUs use: each its own NIC while there are enough, else its share
    (max(k x nics / gpus_per_node, min(k, nics))). The median of each kind
    replaces the default; a kind no run measured keeps it. A run on GPUs of
    another kind than the cluster's (the catalogue name's first word: h100
    is not h200) or beyond MAX_BUS_EFFICIENCY measured another cluster:
    SpecError naming ``nccl_tests``."""
    path = Path(spec.nccl_tests)
    if not path.is_absolute() and Path(source).is_file():
        path = Path(source).parent / path
    if not path.is_file():
        raise SpecError(source, at("nccl_tests"), "an existing profile from loom profile nccl-tests", spec.nccl_tests)
    document = validate(NcclTestsDocument, read_json(path, "nccl-tests profile"), str(path))
    families = {find_gpu(fields["gpu"], source).name.split("-")[0].lower() for fields in per_node}
    index_of = {host.lower(): i for i, host in enumerate(hosts)}
    default = dict(nvlink_GBps=spec.nvlink_GBps, nics_per_node=spec.nics_per_node, nic_Gbps=spec.nic_Gbps)
    nvlink, nic = [], []
    for run in document.runs:
        foreign = next((gpu.device for gpu in run.gpus
                        if not any(re.search(rf"\b{family}\b", gpu.device.lower()) for family in families)), None)
        if foreign is not None:
            raise SpecError(source, at("nccl_tests"), f"a profile measured on this cluster's {spec.gpu} GPUs ({run.source} ran on {foreign})",
                            spec.nccl_tests)
        gpus_per_host = Counter(gpu.host for gpu in run.gpus)
        if sum(gpus_per_host.values()) < 2:
            continue
        indices = [index_of.get(host.lower()) for host in gpus_per_host]
        nodes = [per_node[i] if i is not None else default for i in indices]
        known = all(i is not None for i in indices)
        one_domain = len({i // spec.nvlink_domain_nodes for i in indices}) == 1 if known else len(indices) <= spec.nvlink_domain_nodes
        busbw_GBps = max(run.rows, key=lambda row: row.size_bytes).out_of_place.busbw_GBps
        if one_domain:
            kind, line_GBps = "NVLink", min(node["nvlink_GBps"] for node in nodes)
            nvlink.append(busbw_GBps / line_GBps)
        else:
            k = min(gpus_per_host.values())
            kind = "NIC"
            line_GBps = min(max(k * node["nics_per_node"] / spec.gpus_per_node, min(k, node["nics_per_node"])) * node["nic_Gbps"] / 8
                            for node in nodes)
            nic.append(busbw_GBps / line_GBps)
        most = MAX_BUS_EFFICIENCY["in_network" if run.op in IN_NETWORK_OPS else "point_to_point"]
        if busbw_GBps > most * line_GBps:
            raise SpecError(source, at("nccl_tests"), f"a profile of this cluster's links: {run.source} ({run.op}) moved {busbw_GBps:.1f} GB/s "
                            f"of bus bandwidth over {line_GBps:.1f} GB/s of {kind} the cluster declares, beyond the {most:g}x it can reach",
                            spec.nccl_tests)
    if not nvlink and not nic:
        raise SpecError(str(path), "runs", "a run on two or more GPUs with its '#  Rank ... on HOST' lines")
    found = {"nvlink_efficiency": nvlink, "nic_efficiency": nic}
    return {name: statistics.median(values) for name, values in found.items() if values}


def _fabric(spec: ClusterFile, hosts: list[str], source: str, at) -> Fabric:
    """The fabric fields, with node names resolved to indices and GPU and NIC
    numbers checked against the node's counts."""

    def node_index(node: int | str, field: str) -> int:
        index = hosts.index(node) if node in hosts else node
        if not isinstance(index, int) or not 0 <= index < spec.nodes:
            raise SpecError(source, at(field), f"a node index below {spec.nodes} or a host name", node)
        return index

    nics = []
    for i, override in enumerate(spec.nic_overrides):
        if override.nic >= spec.nics_per_node:
            raise SpecError(source, at(f"nic_overrides.{i}.nic"), f"a NIC index below nics_per_node = {spec.nics_per_node}", override.nic)
        targets = range(spec.nodes) if override.node is None else [node_index(override.node, f"nic_overrides.{i}.node")]
        nics += [(node, override.nic, override.Gbps) for node in targets]
    links = []
    for i, override in enumerate(spec.link_overrides):
        a, b = override.gpus
        if max(a, b) >= spec.gpus_per_node or a == b:
            raise SpecError(source, at(f"link_overrides.{i}.gpus"), f"two different GPU indices below gpus_per_node = {spec.gpus_per_node}", list(override.gpus))
        links.append((node_index(override.node, f"link_overrides.{i}.node"), min(a, b), max(a, b), override.GBps))
    profile = None
    if spec.links_profile is not None:
        profile = Path(spec.links_profile)
        if not profile.is_absolute() and Path(source).is_file():
            profile = Path(source).parent / profile
    return Fabric(
        leaf_of_node=_leaf_of_node(spec, node_index, source, at),
        spine_oversubscription=spec.spine_oversubscription,
        nic_Gbps=tuple(nics),
        nvlink_GBps=tuple(links),
        links_profile=profile,
        nccl_tests=spec.nccl_tests,
        source=source,
    )


def _leaf_of_node(spec: ClusterFile, node_index, source: str, at) -> tuple[int, ...] | None:
    if spec.leaves is not None and spec.nodes_per_leaf is not None:
        raise SpecError(source, at("leaves"), "either leaves or nodes_per_leaf, not both")
    if spec.nodes_per_leaf is not None:
        return tuple(n // spec.nodes_per_leaf for n in range(spec.nodes))
    if spec.leaves is None:
        return None
    leaf_of_node: dict[int, int] = {}
    for leaf, members in enumerate(spec.leaves):
        for i, node in enumerate(members):
            index = node_index(node, f"leaves.{leaf}.{i}")
            if index in leaf_of_node:
                raise SpecError(source, at(f"leaves.{leaf}.{i}"), "each node under one leaf switch", node)
            leaf_of_node[index] = leaf
    if len(leaf_of_node) != spec.nodes:
        missing = sorted(set(range(spec.nodes)) - set(leaf_of_node))
        raise SpecError(source, at("leaves"), f"every node under some leaf switch; {len(missing)} missing, e.g. node {missing[0]}")
    return tuple(leaf_of_node[n] for n in range(spec.nodes))


def load_cluster(path: Path) -> Cluster:
    source = str(path)
    return cluster_from_spec(validate(ClusterFile, read_mapping(path), source), source)


def parse_cluster(data: dict, source: str, prefix: str = "") -> Cluster:
    """A cluster given inline (e.g. under ``cluster:`` in a job file)."""
    return cluster_from_spec(validate(ClusterFile, data, source, prefix), source, prefix)
