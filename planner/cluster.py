"""The cluster spec: nodes of GPUs joined by NVLink inside a node and NICs
between nodes, read from YAML.

Example::

    nodes: 16
    gpus_per_node: 8
    gpu: H100
    nvlink_GBps: 450        # per GPU, per direction
    nics_per_node: 8
    nic_Gbps: 400           # line rate of one NIC
    node_overrides:         # optional: nodes that differ from the rest
      - {node: 3, nic_Gbps: 200}
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pydantic

from loom.planner.errors import SpecError
from loom.planner.specfile import StrictModel, read_mapping, validate
from loom.profiles.catalogue import GPU, find_gpu


class NodeOverride(StrictModel):
    node: int | str  # index or host name
    gpu: str | None = None
    nvlink_GBps: pydantic.PositiveFloat | None = None
    nics_per_node: pydantic.PositiveInt | None = None
    nic_Gbps: pydantic.PositiveFloat | None = None


class ClusterFile(StrictModel):
    name: str | None = None
    nodes: pydantic.PositiveInt
    gpus_per_node: pydantic.PositiveInt
    gpu: str
    nvlink_GBps: pydantic.PositiveFloat
    nics_per_node: pydantic.PositiveInt
    nic_Gbps: pydantic.PositiveFloat
    hosts: list[str] | None = None
    node_overrides: list[NodeOverride] = []


@dataclass(frozen=True)
class Node:
    host: str
    gpu: GPU
    nvlink_GBps: float
    nics_per_node: int
    nic_Gbps: float
    gpus_per_node: int

    @property
    def nic_GBps_per_gpu(self) -> float:
        """NIC bandwidth one GPU gets when every GPU of the node sends at once."""
        return self.nics_per_node * self.nic_Gbps / 8 / self.gpus_per_node


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: tuple[Node, ...]
    gpus_per_node: int

    @property
    def num_gpus(self) -> int:
        return len(self.nodes) * self.gpus_per_node

    @cached_property
    def slowest(self) -> Node:
        """A node with the least of everything: synchronous training runs at the
        pace of its slowest member, so uniform-cluster formulas use this node."""
        gpu = min((n.gpu for n in self.nodes), key=_gpu_pace)
        return Node(
            host="slowest",
            gpu=gpu,
            nvlink_GBps=min(n.nvlink_GBps for n in self.nodes),
            nics_per_node=min(n.nics_per_node for n in self.nodes),
            nic_Gbps=min(n.nic_Gbps for n in self.nodes),
            gpus_per_node=self.gpus_per_node,
        )

    @property
    def hosts(self) -> list[str]:
        return [n.host for n in self.nodes]

    @property
    def heterogeneous(self) -> bool:
        return len({n.gpu.name for n in self.nodes}) > 1

    @cached_property
    def node_of_host(self) -> dict[str, Node]:
        return {node.host: node for node in self.nodes}

    def slowest_gpu(self, hosts: set[str]) -> GPU:
        """The slowest GPU among ``hosts`` (a group runs at its slowest member's pace)."""
        return min((self.node_of_host[host].gpu for host in sorted(hosts)), key=_gpu_pace)


def _gpu_pace(gpu: GPU) -> tuple[float, int]:
    """Orders GPUs slowest (then smallest) first."""
    return (gpu.peak_tflops["bf16"], gpu.memory_bytes)


def cluster_from_spec(spec: ClusterFile, source: str, prefix: str = "") -> Cluster:
    """Expand the file's defaults and overrides into one Node per node.
    ``prefix`` names where the cluster sits in its file (``cluster`` inline)."""

    def at(field: str) -> str:
        return f"{prefix}.{field}" if prefix else field

    hosts = spec.hosts or [f"node{i:03d}" for i in range(spec.nodes)]
    if len(hosts) != spec.nodes:
        raise SpecError(source, at("hosts"), f"{spec.nodes} host names, one per node", len(hosts))
    base = dict(gpu=spec.gpu, nvlink_GBps=spec.nvlink_GBps, nics_per_node=spec.nics_per_node, nic_Gbps=spec.nic_Gbps)
    per_node = [dict(base) for _ in hosts]
    gpu_field = [at("gpu")] * spec.nodes  # where each node's GPU type was given, for error messages
    for i, override in enumerate(spec.node_overrides):
        index = hosts.index(override.node) if override.node in hosts else override.node
        if not isinstance(index, int) or not 0 <= index < spec.nodes:
            raise SpecError(source, at(f"node_overrides.{i}.node"), f"a node index below {spec.nodes} or a host name", override.node)
        per_node[index].update(override.model_dump(exclude={"node"}, exclude_none=True))
        if override.gpu is not None:
            gpu_field[index] = at(f"node_overrides.{i}.gpu")
    nodes = tuple(
        Node(
            host=host,
            gpu=find_gpu(fields["gpu"], source, field),
            nvlink_GBps=fields["nvlink_GBps"],
            nics_per_node=fields["nics_per_node"],
            nic_Gbps=fields["nic_Gbps"],
            gpus_per_node=spec.gpus_per_node,
        )
        for host, fields, field in zip(hosts, per_node, gpu_field)
    )
    return Cluster(name=spec.name or Path(source).stem, nodes=nodes, gpus_per_node=spec.gpus_per_node)


def load_cluster(path: Path) -> Cluster:
    source = str(path)
    return cluster_from_spec(validate(ClusterFile, read_mapping(path), source), source)


def parse_cluster(data: dict, source: str, prefix: str = "") -> Cluster:
    """A cluster given inline (e.g. under ``cluster:`` in a job file)."""
    return cluster_from_spec(validate(ClusterFile, data, source, prefix), source, prefix)
