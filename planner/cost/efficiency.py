"""How fast one GPU runs one kernel: GEMMs by shape, flash attention, and the
memory-bound elementwise kernels between them.

A GEMM runs at the GPU's large-GEMM efficiency (catalogue ``gemm_efficiency``)
times its tile and wave utilisation, and never faster than the roofline allows
for the bytes it reads and writes (Williams et al. 2009, "Roofline"). Tile and
wave quantisation follow NVIDIA's "Matrix Multiplication Background User's
Guide": output tiles are padded to the tile size and run in waves of one tile
per SM, so a 2.1-wave GEMM pays for 3 waves. cuBLAS picks among tile shapes;
we take the best of a few, the smaller ones running a little less efficiently.
"""

from __future__ import annotations

import math

from loom.profiles.catalogue import GPU

# (tile_m, tile_n, efficiency of that tile relative to the largest) for the
# CUTLASS/cuBLAS tensor-core kernels that large training GEMMs use.
GEMM_TILES = ((256, 128, 1.0), (128, 256, 1.0), (128, 128, 0.92), (64, 128, 0.8))
# Each output tile pays a fixed prologue (filling the shared-memory pipeline)
# and epilogue (writing C) worth about this many elements of K on top of its
# K-long main loop, so short-K GEMMs (small hidden sizes) run slower:
# efficiency x K / (K + GEMM_K_OVERHEAD). ~6 k-blocks of 64 (CUTLASS's
# multistage mainloop keeps 3-4 in flight).
GEMM_K_OVERHEAD = 384
# Keys whose streaming time equals a flash-attention block's fixed cost.
FLASH_KV_OVERHEAD = 384
# Fraction of the HBM bandwidth that streaming kernels reach (STREAM-like
# copies reach ~90% on A100/H100; PyTorch's elementwise kernels ~80%).
HBM_EFFICIENCY = 0.8
# A kernel never takes less than its launch and tail latency.
KERNEL_MIN_S = 4e-6
# NVFP4: a 4-bit E2M1 value and one E4M3 scale per 16 (NVIDIA's NVFP4
# format; Transformer Engine's NVFP4BlockScaling).
NVFP4_BYTES = 0.5 + 1 / 16
# Bytes per GEMM input element by precision; outputs are 16-bit, or fp32
# when the inputs are (TF32 and FP32 GEMMs read and write fp32).
BYTES = {"fp8": 1, "nvfp4": NVFP4_BYTES, "bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}
# Precisions whose GEMMs take quantised inputs Transformer Engine casts (and keeps for backward).
QUANTISED = ("fp8", "nvfp4")


def backward_gemms(m: int, n: int, k: int) -> list[tuple[int, int, int]]:
    """Y = X W with X (m x k): dX = dY W^T is (m, k, n); dW = X^T dY is (k, n, m)."""
    return [(m, k, n), (k, n, m)]


def tile_utilisation(m: int, n: int, sms: int, batch: int = 1) -> float:
    """The best fraction of the SMs' tile slots a GEMM's output fills."""
    best = 0.0
    for tile_m, tile_n, tile_efficiency in GEMM_TILES:
        tiles = math.ceil(m / tile_m) * math.ceil(n / tile_n) * batch
        waves = math.ceil(tiles / sms)
        useful = m * n * batch / (waves * sms * tile_m * tile_n)
        best = max(best, useful * tile_efficiency)
    return best


def gemm_time_s(m: int, n: int, k: int, gpu: GPU, precision: str, batch: int = 1) -> float:
    """Time of ``batch`` GEMMs (m x k) @ (k x n) at ``precision``."""
    flops = 2.0 * m * n * k * batch
    overhead = GEMM_K_OVERHEAD if gpu.gemm_k_overhead is None else gpu.gemm_k_overhead
    k_efficiency = k / (k + overhead)
    # A measured GEMM curve (loom profile gemm) was measured under whatever
    # power cap the GPU ran at; only the catalogue's figures are the TDP's.
    clock = 1.0 if gpu.gemm_profile else gpu.clock_fraction
    rate = gpu.peak_flops(precision) * gpu.gemm_efficiency[precision] * clock * k_efficiency * tile_utilisation(m, n, gpu.sms, batch)
    in_bytes = BYTES[precision]
    bytes_moved = batch * ((m * k + k * n) * in_bytes + m * n * max(2, in_bytes))
    return max(flops / rate, memory_time_s(bytes_moved, gpu), KERNEL_MIN_S)


def memory_time_s(bytes_moved: float, gpu: GPU) -> float:
    """Time of a memory-bound kernel that reads and writes ``bytes_moved``,
    streaming at HBM_EFFICIENCY of the GPU's bandwidth (times a calibration's
    ``hbm_efficiency_factor``, never past the bandwidth itself)."""
    return bytes_moved / (gpu.hbm_GBps * 1e9 * min(1.0, HBM_EFFICIENCY * gpu.hbm_efficiency_factor))


def flash_attention_time_s(flops: float, gpu: GPU, kv_length: int, kernel: str = "cudnn") -> float:
    """Flash attention runs at its own sustained fraction of 16-bit peak (the
    softmax between its two GEMMs keeps it below GEMM efficiency), reached on
    long sequences: each query block streams ``kv_length`` keys, and short
    streams don't amortise loading the block and writing its output.
    kv / (kv + FLASH_KV_OVERHEAD) follows FlashAttention-2's own benchmark
    (Dao 2023, fig. 4: causal, head dim 128 on A100, 110 TFLOP/s at 512 keys,
    ~165 at 2K, ~185 at 16K). ``kernel`` flash2 runs at the GPU's
    FlashAttention-2 efficiency where the catalogue has one (job.Features
    attention_kernel). A power-capped GPU runs it at its clock_fraction."""
    ramp = kv_length / (kv_length + FLASH_KV_OVERHEAD)
    efficiency = gpu.flash2_attention_efficiency if kernel == "flash2" and gpu.flash2_attention_efficiency else gpu.attention_efficiency
    return flops / (gpu.peak_flops("bf16") * efficiency * gpu.clock_fraction * ramp)
