"""Compute slowed by the collectives overlapping it.

NCCL runs a collective as one kernel of one thread block per channel
(NVIDIA/nccl src/enqueue.cc: ``grid = {nChannels, 1, 1}``). Each block
holds an SM for as long as the collective runs (512-640 threads and their
registers: no GEMM tile fits beside it), so a GEMM or attention kernel
overlapping it runs on the SMs left (the motive for copy-engine
collectives in pytorch/pytorch#176418: "reduces interference with the
overlapping computation (e.g. GEMM)").

The channel counts are what NCCL's topology search and ncclTopoPostset
give a ring on DGX-class nodes, one NIC per GPU behind NVSwitch
(src/graph/search.cc, src/graph/connect.cc):

- inside a node, the NVLink search runs at 60 GB/s per channel on Hopper
  (sm90SpeedArrayIntra; 40 on Ampere, 90 on Blackwell) over 18 links of
  about 20 GB/s (12 on A100): 6 channels, duplicated by
  ncclTopoDupChannels (12) and doubled again by ncclTopoPostset: 24
  blocks; Blackwell's 18 NVLink-5 links give 8, then 16, then 32;
- across nodes the search finds one channel per NIC the group owns in a
  node (k members, k NICs), duplicated while there are at most 4 and
  doubled by ncclTopoPostset: 4k blocks, 16 at most (8 members: 8
  channels, not duplicated, doubled);
- an all-to-all is NCCL's send/recv, which spreads its peers over
  ``p2pnChannels``: the ring's count rounded up to a power of two
  (src/graph/paths.cc ncclTopoComputeP2pChannels): 32 in a node.

[Derived from NCCL's code for full DGX-class nodes, not measured: other
topologies (H800's 8 NVLinks, PCIe nodes, AMD's RCCL), NVLink SHARP's 16
channels and NCCL_MIN_NCHANNELS / NCCL_MAX_CTAS change them.]

What the held SMs cost: compute of W full-GPU seconds beside a collective
of T seconds holding a share s of the SMs ends at W + T s (T <= W), and
at max(T, W + W s) when the collective outlasts it, where the step
already waits T - W for the collective: the compute pays T s less that
slack (slowdown_s).
"""

from __future__ import annotations

from loom.planner.cost.collectives import Link
from loom.profiles.catalogue import GPU

NCCL_NVLINK_CTAS = 24
NCCL_NVLINK_CTAS_BLACKWELL = 32
NCCL_NETWORK_CTAS_PER_MEMBER = 4  # per member of the group in a node ...
NCCL_NETWORK_CTAS = 16  # ... at most


def nccl_ctas(link: Link, gpu: GPU, all_to_all: bool = False) -> int:
    """Thread blocks (SMs) one NCCL collective holds on ``link`` (module
    docstring), a send/recv all-to-all if ``all_to_all``; 0 where NCCL does
    not run (a ``local`` link, PCIe copies)."""
    if link.kind == "network":
        ring = min(NCCL_NETWORK_CTAS, NCCL_NETWORK_CTAS_PER_MEMBER * link.members_per_node)
    elif link.kind == "nvlink":
        blackwell = gpu.compute_capability is not None and gpu.compute_capability >= (10, 0)
        ring = NCCL_NVLINK_CTAS_BLACKWELL if blackwell else NCCL_NVLINK_CTAS
    else:
        return 0
    return 1 << (ring - 1).bit_length() if all_to_all else ring


def sm_share(link: Link, gpu: GPU, all_to_all: bool = False) -> float:
    """The share of ``gpu``'s SMs a collective on ``link`` holds while it runs."""
    return min(1.0, nccl_ctas(link, gpu, all_to_all) / gpu.sms)


def slowdown_s(comm_s: float, held_s: float, hidden_s: float, slack_s: float) -> float:
    """Seconds compute loses to a collective of ``comm_s`` seconds whose
    kernels hold ``held_s`` SM-seconds (in whole GPUs: seconds x share of
    the SMs), ``hidden_s`` of it beside the compute, when the step already
    waits ``slack_s`` for it beyond the compute (module docstring)."""
    if comm_s <= 0.0:
        return 0.0
    return max(0.0, held_s * hidden_s / comm_s - slack_s)
