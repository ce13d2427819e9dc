"""``loom profile gemm``: time the matmuls a model's layers run (forward and
both backward GEMMs, per TP size and token count) and fit the time model's
GEMM efficiency curve to them. Importing this module imports torch.

The curve is planner/cost/efficiency.py's: a GEMM runs at peak x
``gemm_efficiency`` x k / (k + ``k_overhead``) x its tile utilisation. The
fit tries every ``k_overhead`` on a grid, takes ``gemm_efficiency`` as the
geometric mean that k_overhead implies across the shapes (capped at 1: no
GEMM beats the peak), and keeps the pair with the smallest RMS error in log
time.

Before anything is allocated, ``check_memory`` refuses a ``--tokens`` whose
GEMMs' operands cannot fit in the device's memory; ``model_gemms`` refuses a
TP that does not divide the model's widths; ``fit_curve`` refuses GEMMs that
ran faster than the named GPU's peak (they were measured on another GPU).
"""

from __future__ import annotations

import numpy as np
import torch

from loom.planner.cost.efficiency import backward_gemms
from loom.planner.cost.shape import Shape
from loom.planner.cost.efficiency import tile_utilisation
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Features
from loom.planner.specs.model import ModelSpec
from loom.profiles.catalogue import GPU
from loom.profiles.layer_profile import PEAK_TOLERANCE, GemmFit, GemmPoint, first_above_peak, gemm_tflops
from loom.profiles.layers import DTYPES, check_fits, check_tp, out_of_memory_is_bad_input, spread, timed

K_OVERHEAD_GRID = np.arange(0, 4097, 16)


def model_gemms(model: ModelSpec, tps: tuple[int, ...], tokens: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(m, n, k) of every distinct GEMM one decoder layer and the LM head run
    on one TP rank, forward and backward, sorted. Raises SpecError naming
    --tp unless each TP divides the heads, query groups, MLP width and
    vocabulary (``check_tp``)."""
    shapes = set()
    for tp in tps:
        check_tp(model, tp)
        for count in tokens:
            shape = Shape(model, tp, 1, 1, tp > 1, count, "bf16", Features())
            forward = [*shape.linear_gemms(), (count, model.vocab_size // tp, model.hidden_size)]
            shapes.update(g for mnk in forward for g in [mnk, *backward_gemms(*mnk)])
    return sorted(shapes)


def operand_bytes(m: int, n: int, k: int, dtype: str) -> int:
    """Bytes an (m x k) @ (k x n) GEMM holds at ``dtype``: both operands and its output."""
    return (m * k + k * n + m * n) * DTYPES[dtype].itemsize


def check_memory(model: ModelSpec, tps: tuple[int, ...], tokens: tuple[int, ...], dtype: str, device: torch.device) -> None:
    """Refuse, before anything is allocated, a token count whose largest
    GEMM (``operand_bytes``) does not fit in ``device``'s memory: SpecError
    naming --tokens and the largest count that fits."""
    for tp in tps:
        for count in tokens:
            check_fits("--tokens", count, lambda rows: max(operand_bytes(*mnk, dtype) for mnk in model_gemms(model, (tp,), (rows,))),
                       device, f"the largest GEMM of {model.name} at tp {tp}")


def measure_gemm(m: int, n: int, k: int, dtype: str, device: torch.device, repeats: int, warmup: int) -> GemmPoint:
    """Time (m x k) @ (k x n) at ``dtype`` on ``device``: ``warmup`` untimed
    runs, then the median and spread of ``repeats``. The operands are made
    on the device in ``dtype``, so nothing else is allocated. Raises
    SpecError naming --tokens if the device runs out of memory."""
    with out_of_memory_is_bad_input("--tokens", None, f"the {m}x{n}x{k} GEMM"):
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(m, k, generator=generator, device=device, dtype=DTYPES[dtype])
        b = torch.randn(k, n, generator=generator, device=device, dtype=DTYPES[dtype])
        samples = [timed(lambda: a @ b, device)[1] for _ in range(warmup + repeats)][warmup:]
    time = spread(samples)
    return GemmPoint(m=m, n=n, k=k, time=time, tflops=gemm_tflops(m, n, k, time.median_s))


def fit_curve(points: list[GemmPoint], gpu: GPU, dtype: str) -> GemmFit:
    """The (gemm_efficiency, k_overhead) that best explain the measured
    times, gemm_efficiency at most 1 (for each k_overhead the geometric mean
    is the least-squares fit in log time, so capping it is the constrained
    optimum). Raises SpecError naming --gpu when a GEMM ran faster than
    ``gpu``'s peak at ``dtype`` allows (PEAK_TOLERANCE): the numbers were
    not taken on that GPU."""
    peak = gpu.peak_flops(dtype)
    index = first_above_peak(points, peak / 1e12)
    if index is not None:
        point = points[index]
        raise SpecError("--gpu", "gpu", f"the GPU the GEMMs ran on: {point.m}x{point.n}x{point.k} ran at {point.achieved_tflops:.4g} TFLOP/s, "
                        f"above {gpu.name}'s {dtype} peak of {peak / 1e12:g} (+{PEAK_TOLERANCE:.0%})", gpu.name)
    flops = np.array([2.0 * p.m * p.n * p.k for p in points])
    k = np.array([p.k for p in points], dtype=float)
    utilisation = np.array([tile_utilisation(p.m, p.n, gpu.sms) for p in points])
    measured = np.array([p.time.median_s for p in points])
    best = None
    for overhead in K_OVERHEAD_GRID:
        # time = flops / (peak x eff x k/(k+overhead) x util): each point's eff
        implied = flops / (measured * peak * k / (k + overhead) * utilisation)
        efficiency = min(1.0, float(np.exp(np.mean(np.log(implied)))))
        error = float(np.sqrt(np.mean(np.log(implied / efficiency) ** 2)))
        if best is None or error < best[2] - 1e-12:
            best = (efficiency, float(overhead), error)
    efficiency, overhead, error = best
    return GemmFit(peak_tflops=peak / 1e12, gemm_efficiency=efficiency, k_overhead=overhead, rms_log_error=error)


def fitted_time_s(point: GemmPoint, fit: GemmFit, gpu: GPU) -> float:
    """The fitted curve's time for one measured shape."""
    rate = fit.peak_tflops * 1e12 * fit.gemm_efficiency * point.k / (point.k + fit.k_overhead)
    return 2.0 * point.m * point.n * point.k / (rate * tile_utilisation(point.m, point.n, gpu.sms))

