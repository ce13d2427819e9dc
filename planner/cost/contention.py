"""Compute slowed by the collectives overlapping it.

NCCL runs a collective as one kernel of one thread block per channel
(NVIDIA/nccl src/enqueue.cc: ``grid = {nChannels, 1, 1}``). Each block
holds an SM for as long as the collective runs (512-640 threads and their
registers: no GEMM tile fits beside it), so a GEMM or attention kernel
overlapping it runs on the SMs left: a collective hidden for ``t`` seconds
behind compute still costs that compute ``t x blocks / SMs`` (the motive
for copy-engine collectives in pytorch/pytorch#176418: "reduces
interference with the overlapping computation (e.g. GEMM)").

The channel counts are what NCCL's topology search and ncclTopoPostset
give a ring on DGX-class nodes (src/graph/search.cc, src/graph/connect.cc):

- inside a node, the NVLink search runs at 60 GB/s per channel on Hopper
  (sm90SpeedArrayIntra; 40 on Ampere, 90 on Blackwell) over 18 links of
  about 20 GB/s (12 on A100): 6 channels, duplicated by
  ncclTopoDupChannels (12) and doubled again by ncclTopoPostset: 24
  blocks; Blackwell's 18 NVLink-5 links give 8, then 16, then 32;
- across nodes the search finds one channel per NIC of a rail-optimised
  node (8), which ncclTopoPostset doubles: 16 blocks (on Hopper it
  doubles again below 16: "4 compute channels per search channel").

[derived from NCCL's code, not measured; NCCL_MIN_NCHANNELS /
NCCL_MAX_CTAS change them.]
"""

from __future__ import annotations

from loom.planner.cost.collectives import Link
from loom.profiles.catalogue import GPU

NCCL_NETWORK_CTAS = 16
NCCL_NVLINK_CTAS = 24
NCCL_NVLINK_CTAS_BLACKWELL = 32


def nccl_ctas(link: Link, gpu: GPU) -> int:
    """Thread blocks (SMs) one NCCL collective holds on ``link`` (module
    docstring); 0 on a ``local`` link (nothing runs)."""
    if link.kind == "network":
        return NCCL_NETWORK_CTAS
    if link.kind == "nvlink":
        blackwell = gpu.compute_capability is not None and gpu.compute_capability >= (10, 0)
        return NCCL_NVLINK_CTAS_BLACKWELL if blackwell else NCCL_NVLINK_CTAS
    return 0


def sm_share(link: Link, gpu: GPU) -> float:
    """The share of ``gpu``'s SMs a collective on ``link`` holds while it runs."""
    return min(1.0, nccl_ctas(link, gpu) / gpu.sms)


def slowdown_s(hidden_s: float, share: float) -> float:
    """Seconds compute loses to communication that runs ``hidden_s`` beside
    it holding ``share`` of the SMs: compute of W full-GPU seconds runs at
    1 - share for hidden_s of its time, so it ends at W + hidden_s x share."""
    return hidden_s * share
