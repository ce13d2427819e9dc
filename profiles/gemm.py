"""``loom profile gemm``: time the matmuls a model's layers run (forward and
both backward GEMMs, per TP size and token count) and fit the time model's
GEMM efficiency curve to them. Importing this module imports torch.

The curve is planner/cost/efficiency.py's: a GEMM runs at peak x
``gemm_efficiency`` x k / (k + ``k_overhead``) x its tile utilisation. The
fit tries every ``k_overhead`` on a grid, takes ``gemm_efficiency`` as the
geometric mean that k_overhead implies across the shapes, and keeps the pair
with the smallest RMS error in log time.
"""

from __future__ import annotations

import numpy as np
import torch

from loom.planner.cost.compute import backward_gemms
from loom.planner.cost.shape import Shape
from loom.planner.cost.efficiency import tile_utilisation
from loom.planner.specs.job import Features
from loom.planner.specs.model import ModelSpec
from loom.profiles.catalogue import GPU
from loom.profiles.layer_profile import GemmFit, GemmPoint
from loom.profiles.layers import DTYPES, spread, timed

K_OVERHEAD_GRID = np.arange(0, 4097, 16)


def model_gemms(model: ModelSpec, tps: tuple[int, ...], tokens: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(m, n, k) of every distinct GEMM one decoder layer and the LM head run
    on one TP rank, forward and backward, sorted."""
    shapes = set()
    for tp in tps:
        for count in tokens:
            shape = Shape(model, tp, 1, 1, tp > 1, count, "bf16", Features())
            forward = [*shape.linear_gemms(), (count, model.vocab_size // tp, model.hidden_size)]
            shapes.update(g for mnk in forward for g in [mnk, *backward_gemms(*mnk)])
    return sorted(shapes)


def measure_gemm(m: int, n: int, k: int, dtype: str, device: torch.device, repeats: int, warmup: int) -> GemmPoint:
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device, DTYPES[dtype])
    b = torch.randn(k, n, generator=generator).to(device, DTYPES[dtype])
    samples = [timed(lambda: a @ b, device)[1] for _ in range(warmup + repeats)][warmup:]
    time = spread(samples)
    return GemmPoint(m=m, n=n, k=k, time=time, tflops=2.0 * m * n * k / time.median_s / 1e12)


def fit_curve(points: list[GemmPoint], gpu: GPU, dtype: str) -> GemmFit:
    """The (gemm_efficiency, k_overhead) that best explain the measured times."""
    peak = gpu.peak_flops(dtype)
    flops = np.array([2.0 * p.m * p.n * p.k for p in points])
    k = np.array([p.k for p in points], dtype=float)
    utilisation = np.array([tile_utilisation(p.m, p.n, gpu.sms) for p in points])
    measured = np.array([p.time.median_s for p in points])
    best = None
    for overhead in K_OVERHEAD_GRID:
        # time = flops / (peak x eff x k/(k+overhead) x util): each point's eff
        implied = flops / (measured * peak * k / (k + overhead) * utilisation)
        efficiency = float(np.exp(np.mean(np.log(implied))))
        error = float(np.sqrt(np.mean(np.log(implied / efficiency) ** 2)))
        if best is None or error < best[2] - 1e-12:
            best = (efficiency, float(overhead), error)
    efficiency, overhead, error = best
    return GemmFit(peak_tflops=peak / 1e12, gemm_efficiency=efficiency, k_overhead=overhead, rms_log_error=error)


def fitted_time_s(point: GemmPoint, fit: GemmFit, gpu: GPU) -> float:
    """The fitted curve's time for one measured shape."""
    rate = fit.peak_tflops * 1e12 * fit.gemm_efficiency * point.k / (point.k + fit.k_overhead)
    return 2.0 * point.m * point.n * point.k / (rate * tile_utilisation(point.m, point.n, gpu.sms))

