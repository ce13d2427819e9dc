"""The optimizer on the host CPU: what it frees on the GPU and what its step
costs.

Megatron's HybridDeviceOptimizer (megatron/core/optimizer/cpu_offloading/
hybrid_optimizer.py, at --optimizer-offload-fraction 1.0) and DeepSpeed's
ZeRO-Offload (runtime/zero/stage_1_and_2.py with DeepSpeedCPUAdam) keep the
fp32 master weights and Adam's moments in host memory: every step copies
the rank's gradient shard to the host in fp32, runs Adam there, and copies
the updated 16-bit weights back; the copies of one parameter group overlap
the host's step on another (Megatron's --overlap-cpu-optimizer-d2h-h2d,
DeepSpeed's copies during backward), so the step takes the longer of the two.
torchtitan's CPUOffloadPolicy (torch FSDP2 _fsdp_api.py) keeps the sharded
parameters, gradients and optimizer state on the host: each unit's shard
crosses PCIe before its all-gather and its gradient shard after the
reduce-scatter, in the dtype it is stored in (sharding.py,
``host_copy_bytes``), and Adam steps on the host.

The host figures are the catalogue's (profiles/gpus.yaml pcie_GBps,
host_memory_GBps): link and DRAM peaks, so these times err short.
"""

from __future__ import annotations

from loom.planner.cost.collectives import Link
from loom.profiles.catalogue import GPU

# PCIe moves data in TLPs of at most 256 payload bytes on x86 root complexes,
# each with ~24 bytes of header, sequence number, LCRC and framing (PCI
# Express Base Specification: 12-16 B header, 6 B data-link, 2 B framing).
PCIE_PAYLOAD_EFFICIENCY = 256 / (256 + 24)
# What a host Adam step moves per parameter: DeepSpeedCPUAdam reads the fp32
# weight, gradient and both moments and writes the weight, the moments and
# the 16-bit copy sent back (csrc/adam/cpu_adam_impl.cpp Step_1).
CPU_ADAM_BYTES_PER_PARAM = 4 * 4 + 3 * 4 + 2
# What crosses PCIe per parameter in a Megatron or DeepSpeed step: the fp32
# gradient down, the 16-bit weight up.
STEP_COPY_BYTES_PER_PARAM = 4 + 2


def pcie_link(gpu: GPU) -> Link:
    """The GPU's host link, per direction."""
    return Link(bandwidth_GBps=gpu.pcie_GBps * PCIE_PAYLOAD_EFFICIENCY, latency_s=0.0, kind="pcie")


def host_adam_s(params: float, gpu: GPU) -> float:
    """Adam over ``params`` parameters on the host, memory-bound, at this
    GPU's share of the host's DRAM bandwidth."""
    return params * CPU_ADAM_BYTES_PER_PARAM / (gpu.host_memory_GBps * 1e9)


def accumulation_copies_s(params: float, gpu: GPU, microbatches: int) -> float:
    """Per micro batch (the step's mean), what DeepSpeed's ZeRO-1/2 offload
    copies while gradients accumulate: each parameter's 16-bit gradient goes
    to a pinned host buffer after its backward and, from the second micro
    batch on, comes back to be added first (stage_1_and_2.py
    async_accumulate_grad_in_cpu_via_gpu: ``param.numel()`` elements each
    way, on the compute stream): 2m - 1 copies a step."""
    return (2 * microbatches - 1) / microbatches * pcie_link(gpu).seconds(params * 2)


def step_s(params: float, gpu: GPU, framework: str) -> float:
    """The optimizer step of a rank whose optimizer holds ``params``
    parameters on the host: the copies and the host's Adam overlapped
    (Megatron, DeepSpeed), or the host's Adam alone (torchtitan, whose
    copies are per unit)."""
    adam = host_adam_s(params, gpu)
    if framework == "torchtitan":
        return adam
    return max(adam, pcie_link(gpu).seconds(params * STEP_COPY_BYTES_PER_PARAM))
