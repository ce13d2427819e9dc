"""Partial recomputation: between recomputing nothing and every layer, the
least that makes a layout fit. That is how NVIDIA's recipes fit large
models: megatron-core's block method (``--recompute-method block
--recompute-num-layers N``: the first N layers of each model chunk) and its
recompute modules (``--recompute-modules``, e.g. DeepSeek-V3's
``mla_up_proj mlp``).

For a layout that fits with full recomputation, the search also tries:

- block: the fewest fully recomputed layers per chunk that fit (memory falls
  as N grows, so a bisection finds it);
- modules: a ladder of module sets, each adding the module that frees the
  most bytes per second of recomputation among those the model has
  (greedy, as for a knapsack), the first set that fits.

Both cost less time than recomputing every layer, so where one fits it
ranks above the full variant.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from loom.planner.cost.compute import recomputed_forward
from loom.planner.cost.layers import layer_activation_bytes, shape_of
from loom.planner.specs.job import Job
from loom.planner.specs.layout import DEFAULT_RECOMPUTE_MODULES, RECOMPUTE_MODULES, Layout
from loom.planner.specs.rules import layout_problems

# Fully recomputed layouts, fastest first, whose partial variants the search tries.
PARTIAL_CANDIDATES = 16


def module_ladder(job: Job, layout: Layout) -> list[tuple[str, ...]]:
    """Module sets of growing savings: the modules the model has (those
    megatron-core accepts for it), ordered by the activation bytes each
    frees per second of forward it re-runs, as cumulative prefixes."""
    shape, gpu = shape_of(job, layout), job.cluster.slowest.gpu
    model = job.model
    moe_layers = model.num_moe_layers
    counts = ((model.num_layers - moe_layers, False), (moe_layers, True))
    scored = []
    for module in RECOMPUTE_MODULES:
        if layout_problems(job, replace(layout, recompute="selective", recompute_modules=(module,), recompute_num_layers=0)):
            continue
        saved = sum(count * (layer_activation_bytes(shape, "none", moe) - layer_activation_bytes(shape, "selective", moe, (module,)))
                    for count, moe in counts if count)
        cost_s = sum(count * recomputed_forward(shape, gpu, (module,), moe).total_s for count, moe in counts if count)
        if saved > 0:
            scored.append((-saved / max(cost_s, 1e-12), RECOMPUTE_MODULES.index(module), module))
    ordered = [module for _, _, module in sorted(scored)]
    return [tuple(sorted(ordered[: i + 1], key=RECOMPUTE_MODULES.index)) for i in range(len(ordered))]


def partial_variants(job: Job, layout: Layout, fits: Callable[[Layout], bool]) -> list[Layout]:
    """For ``layout`` (recomputing every layer): the fewest fully recomputed
    layers per chunk that ``fits``, and the first module set of the ladder
    that does; each only where it exists, and none where the layout fits
    without recomputation (which is faster still)."""
    if fits(replace(layout, recompute="none", recompute_num_layers=0)):
        return []
    found = []
    most = -(-job.model.num_layers // (layout.pp * layout.vpp))  # layers of the largest chunk
    low, high = 1, most - 1  # block N = most would recompute every layer
    while low <= high:
        middle = (low + high) // 2
        if fits(replace(layout, recompute_num_layers=middle)):
            high = middle - 1
        else:
            low = middle + 1
    if low < most:
        found.append(replace(layout, recompute_num_layers=low))
    for modules in module_ladder(job, layout):
        named = () if modules == DEFAULT_RECOMPUTE_MODULES else modules  # the plain selective layout
        selective = replace(layout, recompute="selective", recompute_modules=named, recompute_num_layers=0)
        if fits(selective):
            found.append(selective)
            break
    return found
