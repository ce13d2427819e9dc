"""The bus bandwidth a group of GPUs gets, from the bandwidth of every pair.

This is the one place where a bandwidth matrix (from the cluster graph or a
measured links profile) turns into the bandwidth of a collective; the time
model and the placement solver both use it, so the solver optimises exactly
what the plan is priced on.

A ring (or tree) collective runs at the pace of its slowest hop. NCCL builds
its rings node by node and runs one channel per member a node holds, each
channel crossing to the next node through its own GPU's NIC (rail-optimised
fabrics; NCCL's PXN moves the data over NVLink to the right rail first). So a
group with ``k`` members on every node it spans gets ``k`` times its slowest
inter-node pair, capped by its slowest pair inside a node (nccl-tests'
multi-node busbw on DGX systems: ~190 GB/s on 8 HDR NICs x 8 A100s).
"""

from __future__ import annotations

import numpy as np

# Groups are priced in chunks of at most this many matrix entries (memory).
CHUNK_ENTRIES = 4_000_000


def group_bandwidth_GBps(bandwidth_GBps: np.ndarray, host_of_slot: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Bus bandwidth of each group (row of ``groups``, GPU slot indices):
    ``min(slowest in-node pair, k x slowest inter-node pair)``, ``k`` the fewest
    members the group has on one node. A group of one GPU gets ``inf``."""
    groups = np.asarray(groups)
    count, size = groups.shape
    result = np.empty(count)
    step = max(1, CHUNK_ENTRIES // max(1, size * size))
    off_diagonal = ~np.eye(size, dtype=bool)
    for start in range(0, count, step):
        chunk = groups[start : start + step]
        pair = bandwidth_GBps[chunk[:, :, None], chunk[:, None, :]]
        hosts = host_of_slot[chunk]
        same = hosts[:, :, None] == hosts[:, None, :]
        inside = np.where(same & off_diagonal, pair, np.inf).min(axis=(1, 2))
        across = np.where(same, np.inf, pair).min(axis=(1, 2))
        per_node = same.sum(axis=2).min(axis=1)
        result[start : start + step] = np.minimum(inside, per_node * across)
    return result


def crosses_nodes(host_of_slot: np.ndarray, groups: np.ndarray) -> bool:
    """Whether any group spans more than one node."""
    hosts = host_of_slot[np.asarray(groups)]
    return bool((hosts != hosts[:, :1]).any())


def fewest_members_per_node(host_of_slot: np.ndarray, groups: np.ndarray) -> int:
    """The fewest members any group has on one of its nodes (groups: an
    array of slot indices, one row per group)."""
    hosts = host_of_slot[np.asarray(groups)]
    return int((hosts[:, :, None] == hosts[:, None, :]).sum(axis=2).min())


def all_to_all_GBps(bandwidth_GBps: np.ndarray, host_of_slot: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """An all-to-all is not a ring: every GPU sends its own share straight to
    every other member, the part for other nodes through its own NIC. So the
    slowest pair across nodes (not k times it) and the share that leaves the
    node ((n - k) / n with k members per node) set its time. Returns (the
    slowest pair across nodes, or inside one when the groups stay in a node;
    the largest share any member sends off its node)."""
    groups = np.asarray(groups)
    hosts = host_of_slot[groups]
    same = hosts[:, :, None] == hosts[:, None, :]
    pair = bandwidth_GBps[groups[:, :, None], groups[:, None, :]]
    remote_share = float(1 - fewest_members_per_node(host_of_slot, groups) / groups.shape[1])
    if remote_share == 0:
        return float(np.where(same & ~np.eye(groups.shape[1], dtype=bool), pair, np.inf).min()), 0.0
    return float(np.where(same, np.inf, pair).min()), remote_share
