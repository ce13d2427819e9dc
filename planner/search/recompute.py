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
from loom.planner.specs.layout import DEFAULT_RECOMPUTE_MODULES, OP_SAC, RECOMPUTE_MODULES, Layout
from loom.planner.specs.rules import layout_problems

# Fully recomputed layouts, fastest first, whose partial variants the search tries.
PARTIAL_CANDIDATES = 16


def module_ladder(job: Job, layout: Layout) -> list[tuple[str, ...]]:
    """Module sets of growing savings, greedily: each adds, among the modules
    the model has (those megatron-core accepts for it), the one that frees
    the most activation bytes per second of forward it re-runs given the
    modules already chosen (moe covers moe_act and shared_experts, so those
    add nothing after it); a module that frees nothing more ends the ladder."""
    shape, gpu, model = shape_of(job, layout), job.cluster.slowest.gpu, job.model
    counts = model.layer_kinds_in(0, model.num_layers)

    def saved_and_cost(modules: tuple[str, ...]) -> tuple[float, float]:
        if not modules:
            return 0.0, 0.0
        saved = sum(count * (layer_activation_bytes(shape, "none", kind) - layer_activation_bytes(shape, "selective", kind, modules))
                    for kind, count in counts)
        return saved, sum(count * recomputed_forward(shape, gpu, modules, kind).total_s for kind, count in counts)

    known = (OP_SAC,) if job.framework == "torchtitan" else RECOMPUTE_MODULES
    remaining = [m for m in known
                 if not layout_problems(job, replace(layout, recompute="selective", recompute_modules=(m,), recompute_num_layers=0))]
    ladder: list[tuple[str, ...]] = []
    chosen: tuple[str, ...] = ()
    while remaining:
        base_saved, base_cost = saved_and_cost(chosen)
        options = []
        for module in remaining:
            modules = tuple(sorted((*chosen, module), key=known.index))
            saved, cost = saved_and_cost(modules)
            options.append(((saved - base_saved) / max(cost - base_cost, 1e-12), -known.index(module), module, modules, saved - base_saved))
        rate, _, module, modules, gained = max(options)
        if gained <= 0:
            break
        chosen = modules
        ladder.append(chosen)
        remaining.remove(module)
    return ladder


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
