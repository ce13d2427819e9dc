"""The nodes of a placement, and the SLURM ``sbatch`` wrapper around ``train.sh``.

Every launcher loom writes for (torchrun, the DeepSpeed runner) numbers global
ranks node by node: node k runs the next block of ranks, local rank i of a node
is global rank ``first_rank + i``. So a placement is realisable by such a
launcher exactly when each host's ranks form one contiguous block of the same
size on every host; the node order is then the order of those blocks, and
local rank i must run on the host's GPU ``gpus[i]`` (set through
``CUDA_VISIBLE_DEVICES``). Sources: torchrun gives node ``--node-rank`` k the
ranks from the sum of the earlier nodes' ``--nproc-per-node`` on
(``_assign_worker_ranks`` in torch/distributed/elastic/agent/server/api.py);
DeepSpeed's launch.py numbers ranks host by host in world-info order and takes
``local_rank = rank % (this node's processes)``, which is the position in the
node only when every node runs as many.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from loom.planner.specs.cluster import Cluster
from loom.planner.specs.stages import Placement


@dataclass(frozen=True)
class NodeRanks:
    """One node of a launch: ``host`` runs global ranks
    ``first_rank .. first_rank + len(gpus) - 1``, local rank i on GPU ``gpus[i]``."""

    host: str
    node_rank: int
    first_rank: int
    gpus: tuple[int, ...]
    # Which of the nodes a job is given stands for this one when the cluster
    # names no hosts: the plan's nodes in the cluster's node order.
    given_index: int = 0


def nodes_of(placement: Placement, cluster: Cluster | None = None) -> list[NodeRanks]:
    """The placement's nodes in node-rank order (the host of rank 0 is node 0).

    Raises ValueError when a per-node launcher cannot realise the placement:
    a host's ranks not one contiguous block, a GPU used twice, or hosts running
    different numbers of ranks. With ``cluster``, also for a host the cluster
    does not have or a GPU number outside 0..gpus_per_node-1: CUDA stops
    reading CUDA_VISIBLE_DEVICES at the first invalid index, so such a node
    would quietly start on fewer GPUs than planned."""
    blocks: list[tuple[str, int, list[int]]] = []
    for rank, (host, gpu) in enumerate(placement.gpus):
        if blocks and blocks[-1][0] == host:
            blocks[-1][2].append(gpu)
            continue
        if any(block[0] == host for block in blocks):
            raise ValueError(
                f"ranks of host {host} are not contiguous (rank {rank} comes back to it): "
                "a per-node launch cannot realise this placement"
            )
        blocks.append((host, rank, [gpu]))
    for host, _, gpus in blocks:
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"placement uses a GPU of host {host} twice: {gpus}")
    sizes = {host: len(gpus) for host, _, gpus in blocks}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"hosts run different numbers of ranks {sizes}: a per-node launcher starts as many on every node")
    in_cluster_order = [host for host, _, _ in blocks]
    if cluster is not None:
        _check_in_cluster(blocks, cluster)
        in_cluster_order.sort(key=cluster.hosts.index)
    return [NodeRanks(host, k, first, tuple(gpus), in_cluster_order.index(host)) for k, (host, first, gpus) in enumerate(blocks)]


def _check_in_cluster(blocks: list[tuple[str, int, list[int]]], cluster: Cluster) -> None:
    hosts = set(cluster.hosts)
    for host, _, gpus in blocks:
        if host not in hosts:
            raise ValueError(f"placement uses host {host!r}, which cluster {cluster.name} does not have")
        outside = [gpu for gpu in gpus if not 0 <= gpu < cluster.gpus_per_node]
        if outside:
            raise ValueError(f"placement uses GPU(s) {outside} of host {host}, which has GPUs 0..{cluster.gpus_per_node - 1}")


def allocated_node(index: int) -> str:
    """Bash for the host name of node ``index`` of a SLURM allocation (where
    rank 0 runs when the cluster names no hosts). sed reads all of its input, so the
    pipe raises no SIGPIPE under ``set -o pipefail``."""
    return f'$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n {index + 1}p)'


def slurm_sbatch(job_name: str, nodes: list[NodeRanks], gpus_per_node: int, named_hosts: bool = True, domain_nodes: int = 1) -> str:
    """An ``sbatch`` script that runs ``train.sh`` once per node of the plan.

    It requests every GPU of each node so that the GPU indices of the plan are
    the node's own indices under SLURM's device cgroup. With named hosts it
    pins them (``--nodelist``) and the node rank is not taken from
    ``$SLURM_NODEID``: SLURM numbers the nodes of an allocation in its own
    node-table order, not in ``--nodelist`` order, so that would undo a
    placement that orders nodes differently; ``train.sh`` looks its node rank
    up from ``$SLURMD_NODENAME`` in the plan's host table instead. Without
    named hosts it runs on whatever nodes SLURM gives, node k being
    ``SLURM_NODEID`` k and rank 0 on the allocation's first node. With NVLink
    domains of ``domain_nodes`` nodes the plan needs each run of that many
    nodes to share a domain: SLURM's topology/block plugin allocates whole
    segments (``--segment``), which the script asks for."""
    pin = [f"#SBATCH --nodelist={','.join(node.host for node in nodes)}"] if named_hosts else []
    # As train.sh sets it: inside double quotes, where shlex.quote's single
    # quotes would be kept literally. Host names are RFC 1123 names
    # (planner/specs/cluster.py), which need no quoting.
    master = nodes[0].host if named_hosts else allocated_node(nodes[0].given_index)
    how = (["# per node runs train.sh, which starts torchrun with this node's rank from",
            "# the plan's host table (see train.sh)."] if named_hosts else
           ["# per node runs train.sh, which starts torchrun with this node's rank from",
            "# SLURM_NODEID: the cluster names no hosts, so any nodes will do (see train.sh)."])
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={shlex.quote(job_name)}",
        f"#SBATCH --nodes={len(nodes)}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        "# Whole nodes: their CPUs and memory too (a shared partition otherwise gives the",
        "# one task a CPU and its default memory, which the ranks' loaders then share).",
        "#SBATCH --exclusive",
        *pin,
        *([f"# Every {domain_nodes} consecutive nodes of the plan share one NVLink domain: SLURM's",
           "# topology/block plugin (Slurm 24.05+) allocates them as whole segments.",
           f"#SBATCH --segment={domain_nodes}"] if domain_nodes > 1 else []),
        "# Written by loom. One task",
        *how,
        "set -euo pipefail",
        "",
        "# SLURM runs a copy of this script: train.sh is beside the script as submitted",
        "# (scontrol's Command=, relative to the submit directory), else in that directory.",
        'cd "$SLURM_SUBMIT_DIR"',
        'SUBMITTED="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n \'s/^ *Command=\\([^ ]*\\).*/\\1/p\' || true)"',
        'HERE="$(dirname "${SUBMITTED:-./slurm.sbatch}")"',
        '[[ -f "$HERE/train.sh" ]] || HERE="$SLURM_SUBMIT_DIR"',
        '[[ -f "$HERE/train.sh" ]] || { echo "slurm.sbatch: no train.sh beside the submitted script or in $SLURM_SUBMIT_DIR" >&2; exit 2; }',
        f'export MASTER_ADDR="${{MASTER_ADDR:-{master}}}"',
        'srun --ntasks-per-node=1 bash "$HERE/train.sh" "$@"',
        "",
    ]
    return "\n".join(lines)
