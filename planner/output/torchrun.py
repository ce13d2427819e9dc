"""``train.sh``: a per-node torchrun script that starts a planned layout's
ranks on the GPUs loom placed them on, for any program torchrun runs
(Megatron-LM's ``pretrain_gpt.py``, ``torchtitan.train``).

The node rank comes from a host table derived from the placement, so
torchrun's global ranks (node_rank * nproc + local_rank, static rendezvous)
land on the GPUs loom chose; local rank i runs on the i-th GPU listed for its
node (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from loom.planner.output.slurm import NodeRanks, allocated_node

MASTER_PORT = 6000


@dataclass(frozen=True)
class Program:
    """What each node's torchrun runs: a title, comment lines for the
    header, the framework's lines before the launch (variables, environment,
    argument arrays) and the torchrun target with its arguments (shell
    words, quoted as needed)."""

    title: str
    notes: list[str]
    setup: list[str]
    target: str
    torchrun_flags: tuple[str, ...] = ()  # torchrun's own options beyond the rendezvous (e.g. which ranks' output to keep)


def tf32_environment(precision: str) -> list[str]:
    """PyTorch runs fp32 matmuls in full FP32 unless allowed TF32
    (torch.backends.cuda.matmul.allow_tf32, off by default since 1.12); the
    override variable allows it for every cuBLAS matmul of the process
    (aten/src/ATen/Context.h allowTF32CuBLAS: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE),
    which is what precision tf32 prices."""
    return ["export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1  # precision tf32: fp32 matmuls on TF32 tensor cores", ""] if precision == "tf32" else []


def train_sh(program: Program, cluster_name: str, label: str, world_size: int, nodes: list[NodeRanks], named: bool) -> str:
    """The script, run once on every node of the plan."""
    header = _header(program.title, program.notes, cluster_name, label, world_size, nodes, named)
    return "\n".join([*header, *_node_table(nodes, named), *program.setup, *_torchrun(program.target, program.torchrun_flags)])


def _header(title: str, notes: list[str], cluster_name: str, label: str, world_size: int, nodes: list[NodeRanks], named: bool) -> list[str]:
    if named:
        rank = ["# Run it once on every node of the plan (slurm.sbatch does). The node rank is",
                "# looked up from this host's names (LOOM_HOST, SLURMD_NODENAME, the short and",
                "# full host name, its addresses) so that global ranks land where loom placed",
                "# them; LOOM_NODE_RANK overrides it."]
        master = [f'MASTER_ADDR="${{MASTER_ADDR:-{nodes[0].host}}}"']
    else:
        rank = ["# Run it once on every node (slurm.sbatch does). The cluster names no hosts, so",
                "# any nodes will do: the i-th node the job is given (LOOM_NODE_INDEX, else",
                "# SLURM_NODEID) stands for the plan's i-th node in the cluster's node order.",
                "# The placement holds per node (which GPU runs which local rank), not which",
                "# machine is which. Rank 0 runs on MASTER_ADDR, else on its node of the SLURM",
                "# allocation."]
        first = nodes[0].given_index
        master = ['if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then',
                  f"    MASTER_ADDR={allocated_node(first)}",
                  "fi",
                  f'MASTER_ADDR="${{MASTER_ADDR:?set MASTER_ADDR to the address of node {first} of the job (0 first)}}"']
    return [
        "#!/usr/bin/env bash",
        f"# {title} written by loom: {label},",
        f"# {world_size} GPUs on {len(nodes)} node(s) of cluster {cluster_name}.",
        *rank,
        *notes,
        "set -euo pipefail",
        "",
        f"NNODES={len(nodes)}",
        f"NPROC_PER_NODE={len(nodes[0].gpus)}",
        *master,
        f'MASTER_PORT="${{MASTER_PORT:-{MASTER_PORT}}}"',
        "",
    ]


def _node_table(nodes: list[NodeRanks], named: bool) -> list[str]:
    """host -> node rank, and node rank -> CUDA_VISIBLE_DEVICES, so local rank i
    runs on GPU gpus[i] (torchrun passes the variable through to its workers,
    which take the device of their LOCAL_RANK).

    The override is LOOM_NODE_RANK, not NODE_RANK: job platforms export their
    own NODE_RANK in their own node order, which would silently undo the
    placement. CUDA_VISIBLE_DEVICES is exported even for the order 0..n-1:
    an inherited one (a shell's, a scheduler's partial list) would renumber
    the GPUs the plan names by the node's own numbers."""
    if named:
        rank = [
            "declare -A NODE_RANK_OF_HOST=(  # names in lower case: host names ignore case",
            *(f"    [{shlex.quote(node.host.lower())}]={node.node_rank}" for node in nodes),
            ")",
            "# This node by any of its names: the scheduler's, the short and full host names, its addresses.",
            'NODE_RANK="${LOOM_NODE_RANK:-}"',
            'for NAME in ${LOOM_HOST:-} ${SLURMD_NODENAME:-} $(hostname -s) $(hostname) $(hostname -f 2>/dev/null) $(hostname -I 2>/dev/null); do',
            '    [[ -z "$NODE_RANK" && -n "${NODE_RANK_OF_HOST[${NAME,,}]+x}" ]] && NODE_RANK="${NODE_RANK_OF_HOST[${NAME,,}]}"',
            "done",
            '[[ -n "$NODE_RANK" ]] || { echo "this node ($(hostname)) is not in this plan; set LOOM_HOST or LOOM_NODE_RANK" >&2; exit 1; }',
        ]
    else:
        rank_of_given = [node.node_rank for node in sorted(nodes, key=lambda node: node.given_index)]
        rank = [
            "# Node rank of the job's i-th node.",
            f"NODE_RANK_OF_GIVEN=({' '.join(map(str, rank_of_given))})",
            "# LOOM_NODE_RANK, where set, is the node rank itself.",
            'if [[ -n "${LOOM_NODE_RANK:-}" ]]; then',
            '    NODE_RANK="$LOOM_NODE_RANK"',
            "else",
            '    NODE_INDEX="${LOOM_NODE_INDEX:-${SLURM_NODEID:?set LOOM_NODE_INDEX to the index of this node, 0 first, or LOOM_NODE_RANK}}"',
            '    NODE_RANK="${NODE_RANK_OF_GIVEN[$NODE_INDEX]:?the plan runs on nodes 0..$((NNODES - 1)), not $NODE_INDEX}"',
            "fi",
        ]
    lines = [
        f"# Node k runs global ranks k*{len(nodes[0].gpus)} .. (k+1)*{len(nodes[0].gpus)}-1.",
        *rank,
        "# Local rank i of node k runs on the i-th GPU listed for node k.",
        "GPUS_OF_NODE=(",
        *(f"    {','.join(map(str, node.gpus))}  # {shlex.quote(node.host) if named else f'node {node.node_rank}'}" for node in nodes),
        ")",
        'export CUDA_VISIBLE_DEVICES="${GPUS_OF_NODE[$NODE_RANK]:?node rank $NODE_RANK is not in this plan}"',
    ]
    return [*lines, ""]


def bash_array(name: str, args: list[str]) -> list[str]:
    """A bash array, one flag and its values per line."""
    lines: list[str] = []
    for token in args:
        if token.startswith("--") or not lines:
            lines.append(f"    {shlex.quote(token)}")
        else:
            lines[-1] += f" {shlex.quote(token)}"
    return [f"{name}=(", *lines, ")", ""]


def _torchrun(target: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [
        'exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK" \\',
        '    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \\',
        *([f"    {' '.join(shlex.quote(flag) for flag in flags)} \\"] if flags else []),
        f'    {target} "$@"',
        "",
    ]
