"""What the cluster is made of, as plain data: each node's GPUs, NVLink and
NICs (``Node``), and what lies between nodes (``Fabric``). The cluster spec
(``cluster.py``) builds them from its file; the topology (``topology.py``)
builds its graph from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loom.profiles.catalogue import GPU

# Achievable fraction of the line rate (nccl-tests busbw / line rate), unless
# the cluster file's nccl_tests profile measured it: NVLink all-reduce reaches
# ~230 of 300 GB/s on A100 and ~360 of 450 GB/s on H100; InfiniBand ~92% of
# line rate.
NVLINK_EFFICIENCY = 0.78
NIC_EFFICIENCY = 0.92



@dataclass(frozen=True)
class Fabric:
    """What lies between the GPUs beyond each node's NVLink and NIC figures."""

    leaf_of_node: tuple[int, ...] | None = None  # None: one non-blocking fabric
    spine_oversubscription: float = 1.0
    nic_Gbps: tuple[tuple[int, int, float], ...] = ()  # (node index, NIC, Gbps) overrides
    nvlink_GBps: tuple[tuple[int, int, int, float], ...] = ()  # (node index, GPU, GPU, GB/s) overrides
    links_profile: Path | None = None  # measured pair bandwidths
    nccl_tests: str | None = None  # the nccl-tests profile that set the link efficiencies
    source: str = ""  # the cluster file, for error messages

    @property
    def measured(self) -> bool:
        """Link figures come from measurements (loom profile links or nccl-tests)."""
        return self.links_profile is not None or self.nccl_tests is not None

    @property
    def plain(self) -> bool:
        """No detail beyond the per-node figures: every pair of GPUs gets what
        the node's NVLink or NIC figure says."""
        flat = self.leaf_of_node is None or len(set(self.leaf_of_node)) == 1 or self.spine_oversubscription == 1.0
        return flat and not self.nic_Gbps and not self.nvlink_GBps and self.links_profile is None


@dataclass(frozen=True)
class Node:
    host: str
    gpu: GPU
    nvlink_GBps: float
    nics_per_node: int
    nic_Gbps: float
    gpus_per_node: int
    nvlink_efficiency: float = NVLINK_EFFICIENCY  # of nvlink_GBps that collectives reach
    nic_efficiency: float = NIC_EFFICIENCY  # of the NICs' line rate
    # GPUs one NVLink domain joins (0: the node's; GB200/GB300 NVL72: 72 over 18 nodes of 4)
    nvlink_domain_gpus: int = 0

    @property
    def domain_gpus(self) -> int:
        """GPUs that reach each other over NVLink: the node, or a rack-scale
        NVLink domain (multi-node NVLink) of consecutive nodes."""
        return self.nvlink_domain_gpus or self.gpus_per_node

    @property
    def nic_GBps_per_gpu(self) -> float:
        """NIC bandwidth one GPU gets when every GPU of the node sends at once."""
        return self.nics_per_node * self.nic_Gbps / 8 / self.gpus_per_node
