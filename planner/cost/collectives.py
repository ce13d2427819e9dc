"""Collective communication times with the alpha-beta model: a latency per
step plus bytes over bandwidth (Hockney 1994; Thakur et al. 2005, "Optimization
of Collective Communication Operations in MPICH"; NCCL's ring and double
binary tree algorithms, as in nccl-tests' PERFORMANCE.md).

``bytes_`` is always the size of the whole buffer (what nccl-tests calls the
message size); bandwidth is the per-GPU "bus bandwidth" of the link the group
sits on, so nccl-tests' busbw figures can be plugged in directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """What a group of GPUs communicates over."""

    bandwidth_GBps: float  # achievable per-GPU bus bandwidth, per direction
    latency_s: float  # per step of a ring or per hop of a tree
    kind: str  # "nvlink" | "network" | "local"
    # On a network link, the group's members in one NVLink domain (the
    # fewest of any domain it spans): the NICs its rings leave through.
    members_per_node: int = 1

    def seconds(self, bytes_: float) -> float:
        return bytes_ / (self.bandwidth_GBps * 1e9)


LOCAL = Link(bandwidth_GBps=math.inf, latency_s=0.0, kind="local")


def all_reduce_s(bytes_: float, n: int, link: Link) -> float:
    """Ring: 2(n-1)/n of the buffer crosses each GPU's link in 2(n-1) steps.
    Double binary tree: ~2x the buffer, but only 2 log2(n) latency hops. NCCL
    picks the faster; so do we."""
    if n == 1:
        return 0.0
    ring = 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * link.seconds(bytes_)
    tree = 2 * math.ceil(math.log2(n)) * link.latency_s + 2 * link.seconds(bytes_)
    return min(ring, tree)


def reduce_scatter_s(bytes_: float, n: int, link: Link) -> float:
    """Ring reduce-scatter: (n-1)/n of the buffer, n-1 steps."""
    if n == 1:
        return 0.0
    return (n - 1) * link.latency_s + (n - 1) / n * link.seconds(bytes_)


def all_gather_s(bytes_: float, n: int, link: Link) -> float:
    """Ring all-gather: the mirror image of reduce-scatter."""
    return reduce_scatter_s(bytes_, n, link)


def all_to_all_s(bytes_: float, n: int, link: Link) -> float:
    """Pairwise all-to-all (NCCL's send/recv pairs): each GPU keeps 1/n of
    its buffer and exchanges the rest with the n-1 others, one per step."""
    return reduce_scatter_s(bytes_, n, link)


def send_recv_s(bytes_: float, link: Link) -> float:
    """One point-to-point transfer."""
    return link.latency_s + link.seconds(bytes_)
