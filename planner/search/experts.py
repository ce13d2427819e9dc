"""Inputs and outputs of ``loom experts``.

In: routed-token counts per layer and expert (``.npy``, or JSON: a bare
array, or a mapping with ``load_tokens`` or SGLang's ``logical_count``),
optionally top-k routing traces (``.npy`` or JSON, ``topk_ids``: tokens x
layers x top_k expert ids), and the EP ranks: ``--ep-size`` GPUs,
``--gpus-per-node`` to a node, or the first ``--ep-size`` GPUs of a cluster
file in node order, priced on its links (the cluster graph, or a measured
links profile).

Out: ``expert_map.json`` (the contract below, checked by ``ExpertMap``) and
``expert_location.json``, the file SGLang's ``--init-expert-location``
reads: ``{"physical_to_logical_map": [[...], ...]}``, one row per layer,
physical expert p on EP rank ``p // (physical experts / EP)``. SGLang
passes the mapping's keys to ``ExpertLocationMetadata.init_by_mapping`` as
arguments, so the file holds that one key and nothing else. Its rows are
indexed by layer id and it wants one per hidden layer, dense ones included
(``num_hidden_layers``), so ``dense_layers`` leading rows of SGLang's
trivial map (p -> p mod E) come first when the loads cover MoE layers only
(DeepSeek-V3: 3 dense, 58 MoE).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pydantic

from loom.planner.specs.cluster import load_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.files import read_json
from loom.solvers.experts import (
    CROSS_GPU_COST,
    CROSS_NODE_COST,
    ExpertPlacement,
    ExpertProblem,
    Figures,
    affinity_from_trace,
    link_cost_matrix,
    replica_ranks,
)

SCHEMA_VERSION = "1.0"
MAP_FILE = "expert_map.json"
SGLANG_FILE = "expert_location.json"

# Bounds on what the flags and files may ask for, checked before anything is
# allocated for them; each well beyond what MoE deployments use.
# EP ranks: DeepSeek-V3 decodes on EP 320 (40 nodes), a GB200 NVL72 rack
# holds 72 GPUs; 2048 leaves six times DeepSeek's width.
MAX_EP_SIZE = 2048
# Slots per GPU: one GPU holding every expert of a 512-expert model
# (Qwen3-Next) at EP 1.
MAX_SLOTS_PER_GPU = 512
# Slots of one layer in all (EP ranks x slots per GPU), so experts too: the
# exchange search prices every pair of slots at once in arrays of slots^2
# (32 MiB each at 2048); DeepSeek-V3 at EP 320 has 320.
MAX_SLOTS = 2048
# Layers x slots per layer: EPLB's packing, the fallback every solve starts
# from and cannot cut short, takes about 3 us a slot, so this many take
# about 0.4 s (DeepSeek-V3's 58 MoE layers at EP 2048: 118,784).
MAX_LAYER_SLOTS = 2**17
# MoE layers of a loads file, and --dense-layers: the deepest MoE models
# have about a hundred layers (DeepSeek-V3: 61).
MAX_LAYERS = 1024
# Layers x EP ranks x experts (each replica's share of its expert), with a
# trace also layers x ranks^2 (the tokens between GPUs) and (layers - 1) x
# experts^2 (the affinity): the solver holds float64 arrays of these (128
# MiB at 2^24 cells) and evaluates a placement in about 0.1 s there (58
# layers x 256 experts with a trace on EP 536); DeepSeek-V3 at EP 320 needs 5.9 M.
MAX_DENSE_CELLS = 2**24
# Numbers in a loads file, before SGLang's recordings are summed (128 MiB of float64).
MAX_LOAD_NUMBERS = 2**24
# Routed tokens of one layer: float64 counts tokens exactly up to 2^53, and a
# run of 10^12 tokens at top-8 routes 10^13 per layer.
MAX_LAYER_TOKENS = 2.0**53
# tokens x layers x top_k^2, the expert pairs a trace's affinity counts
# between consecutive layers: under a second at about 13 ns each, e.g.
# 18,000 tokens of DeepSeek-V3 (58 layers, top-8).
MAX_TRACE_PAIRS = 2**26
# A token crossing a link, in tokens of expert compute: even 10 Gb/s Ethernet
# costs DeepSeek-V3 about 50; 10^6 keeps every sum of tokens x cost far
# inside float64.
MAX_LINK_COST = 1_000_000.0
# --time-limit (s): below 0.1 s the solver has no time to improve on greedy,
# and no placement is worth waiting a day for.
MIN_TIME_LIMIT_S = 0.1
MAX_TIME_LIMIT_S = 86_400.0


class MethodFigures(pydantic.BaseModel):
    """A placement's cost, summed over layers (tokens; ``traffic_cost`` and
    ``objective`` in "one token through one expert" units)."""

    max_load_tokens: float
    mean_load_tokens: float
    imbalance: float
    cross_gpu_tokens: float
    cross_node_tokens: float
    traffic_cost: float
    objective: float


class SolverInfo(pydantic.BaseModel):
    method: str
    status: str
    objective: float
    bound: float
    gap: float
    time_limit_s: float


class ExpertMap(pydantic.BaseModel):
    """``expert_map.json``. ``placement[l][e]`` lists the EP rank of each
    replica of expert e in MoE layer l; ``node_of_rank[r]`` is rank r's node."""

    model_config = pydantic.ConfigDict(extra="forbid")

    schema_version: str
    layers: int
    experts: int
    ep_size: int
    slots_per_gpu: int
    redundant_slots: int
    dense_layers: int
    node_of_rank: list[int]
    solver: SolverInfo
    methods: dict[str, MethodFigures]
    placement: list[list[list[int]]]
    sglang_file: str
    # busiest/mean rank load per EP size without replicas (imbalance_by_ep_size):
    # what a job's features.moe_load_imbalance takes.
    imbalance_by_ep_size: dict[int, float] = {}


# --------------------------------------------------------------------------- inputs


def check_run_flags(time_limit_s: float, dense_layers: int) -> None:
    """The flags of ``loom experts`` that are not part of the problem
    (``expert_problem`` checks the others). Raises SpecError naming the
    first flag out of its bounds (NaN and infinity always are)."""
    _check_range("--time-limit", time_limit_s, MIN_TIME_LIMIT_S, MAX_TIME_LIMIT_S, "seconds")
    _check_range("--dense-layers", dense_layers, 0, MAX_LAYERS, "layers")


def _check_range(flag: str, value: float, low: float, high: float, unit: str) -> None:
    """SpecError naming ``flag`` unless ``low <= value <= high`` (NaN never is)."""
    if not low <= value <= high:
        raise SpecError(flag, flag.lstrip("-").replace("-", "_"), f"{low:,.10g} to {high:,.10g} {unit}", value)


def read_loads(path: Path) -> np.ndarray:
    """(layers, experts) routed tokens, float, from ``path`` (at most
    MAX_LOAD_NUMBERS numbers; a 3-D array is SGLang's recordings, summed).
    Raises SpecError naming ``path`` unless it holds at most MAX_LAYERS x
    MAX_SLOTS (MAX_LAYER_SLOTS in all) finite, non-negative counts, at most
    MAX_LAYER_TOKENS per layer."""
    loads = _read_array(path, ("load_tokens", "logical_count"), "load_tokens", MAX_LOAD_NUMBERS)
    if loads.ndim not in (2, 3) or 0 in loads.shape:
        raise SpecError(str(path), "load_tokens", "a (layers, experts) array of routed-token counts", f"shape {loads.shape}")
    bad = ~np.isfinite(loads) | (loads < 0)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise SpecError(str(path), "load_tokens", "finite, non-negative token counts", f"{float(loads[where])} at index {list(where)}")
    if loads.ndim == 3:  # SGLang stacks one [layers, experts] count per recording
        with np.errstate(over="ignore"):  # a sum past float's range is inf, refused below
            loads = loads.sum(axis=0)
    if loads.shape[0] > MAX_LAYERS or loads.shape[1] > MAX_SLOTS or loads.size > MAX_LAYER_SLOTS:
        raise SpecError(str(path), "load_tokens", f"at most {MAX_LAYERS:,} layers x {MAX_SLOTS:,} experts, "
                        f"{MAX_LAYER_SLOTS:,} in all (each expert needs a slot)", f"shape {loads.shape}")
    with np.errstate(over="ignore"):
        per_layer = loads.sum(axis=1)
    heaviest = int(per_layer.argmax())
    if not per_layer[heaviest] <= MAX_LAYER_TOKENS:
        raise SpecError(str(path), "load_tokens", "at most 2^53 routed tokens per layer", f"{per_layer[heaviest]:.3g} in layer {heaviest}")
    return loads


def read_trace(path: Path, layers: int, experts: int) -> np.ndarray:
    """(tokens, layers, top_k) expert ids, checked against the loads' shape.
    Raises SpecError naming ``path`` unless the ids are integers from 0 to
    experts - 1, distinct within each token's top-k, tokens x layers x
    top_k^2 is at most MAX_TRACE_PAIRS and
    the affinity it gives, (layers - 1) x experts^2, at most MAX_DENSE_CELLS."""
    if (layers - 1) * experts**2 > MAX_DENSE_CELLS:
        raise SpecError(str(path), "topk_ids", f"a model of (layers - 1) x experts^2 <= {MAX_DENSE_CELLS:,} (the affinity between layers)",
                        f"{layers} layers x {experts} experts in the loads")
    trace = _read_array(path, ("topk_ids",), "topk_ids", MAX_TRACE_PAIRS)
    if trace.ndim != 3 or trace.shape[1] != layers or 0 in trace.shape:
        raise SpecError(str(path), "topk_ids", f"a (tokens, {layers} layers, top_k) array of expert ids", f"shape {trace.shape}")
    tokens, _, top_k = trace.shape
    if tokens * layers * top_k**2 > MAX_TRACE_PAIRS:
        raise SpecError(str(path), "topk_ids", f"at most {MAX_TRACE_PAIRS // (layers * top_k**2):,} tokens for {layers} layers x top-{top_k} "
                        f"(tokens x layers x top_k^2 <= {MAX_TRACE_PAIRS:,})", f"{tokens:,} tokens")
    if not np.array_equal(trace, np.round(trace)) or trace.min() < 0 or trace.max() >= experts:
        raise SpecError(str(path), "topk_ids", f"integer expert ids from 0 to {experts - 1}")
    ids = np.sort(trace.astype(np.int64), axis=2)
    repeated = np.argwhere((ids[:, :, 1:] == ids[:, :, :-1]).any(axis=2))
    if len(repeated):
        token, layer = repeated[0]
        raise SpecError(str(path), f"topk_ids[{token}][{layer}]", "distinct experts: a router's top-k picks each expert once",
                        trace[token, layer].astype(np.int64).tolist())
    return trace.astype(np.int64)


def _read_array(path: Path, keys: tuple[str, ...], field: str, max_numbers: int) -> np.ndarray:
    """A float array from ``.npy`` or JSON (bare, or under one of ``keys``),
    its size checked against ``max_numbers`` before it is read (a .npy) or
    converted (JSON, which ``read_json`` caps in bytes)."""
    if not path.is_file():
        raise SpecError(str(path), "<file>", "an existing file")
    if path.suffix == ".npy":
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise SpecError(str(path), "<file>", f"a numeric .npy array ({error})") from None
        shape = data.shape
    elif path.suffix == ".json":
        data = read_json(path, "JSON file")
        if isinstance(data, dict):
            found = [key for key in keys if key in data]
            if not found:
                raise SpecError(str(path), field, f"a key {' or '.join(keys)} (or a bare array)", sorted(data))
            data = data[found[0]]
        shape = _nested_shape(data)
        if _holds_a_bool(data):
            raise SpecError(str(path), field, "a rectangular array of real numbers (true/false are not counts)")
    else:
        raise SpecError(str(path), "<suffix>", "a .json or .npy file", path.suffix)
    if math.prod(shape) > max_numbers:
        raise SpecError(str(path), field, f"at most {max_numbers:,} numbers", f"shape {shape}")
    try:
        kind = np.asarray(data).dtype.kind
    except (TypeError, ValueError):
        raise SpecError(str(path), field, "a rectangular array of numbers") from None
    if kind not in "iuf":  # booleans, complex numbers, strings, objects
        raise SpecError(str(path), field, "a rectangular array of real numbers", f"an array of {np.asarray(data).dtype}")
    return np.array(data, dtype=float)  # a copy: no .npy stays mapped


def _holds_a_bool(data: object) -> bool:
    """Whether a (nested) JSON list holds true or false anywhere."""
    if isinstance(data, list):
        return any(_holds_a_bool(item) for item in data)
    return isinstance(data, bool)


def _nested_shape(data: object) -> tuple[int, ...]:
    """The shape nested lists would have, read along their first elements."""
    shape = []
    while isinstance(data, list):
        shape.append(len(data))
        if not data:
            break
        data = data[0]
    return tuple(shape)


def expert_problem(loads_file: Path, slots_per_gpu: int, ep_size: int | None = None, gpus_per_node: int | None = None,
                   cluster_file: Path | None = None, trace_file: Path | None = None,
                   cross_node_cost: float = CROSS_NODE_COST, cross_gpu_cost: float = CROSS_GPU_COST) -> ExpertProblem:
    """The solver's problem from the command's inputs. Raises SpecError
    naming the flag or file that is wrong, or beyond a bound of this
    module's, before anything is allocated for it."""
    _check_range("--slots-per-gpu", slots_per_gpu, 1, MAX_SLOTS_PER_GPU, "slots")
    for flag, value in (("--ep-size", ep_size), ("--gpus-per-node", gpus_per_node)):
        if value is not None:
            _check_range(flag, value, 1, MAX_EP_SIZE, "EP ranks")
    for flag, value in (("--cross-node-cost", cross_node_cost), ("--cross-gpu-cost", cross_gpu_cost)):
        _check_range(flag, value, 0, MAX_LINK_COST, "tokens of expert compute")
    loads = read_loads(loads_file)
    layers, experts = loads.shape
    node_of_gpu, bandwidth = _ep_ranks(ep_size, gpus_per_node, cluster_file)
    _check_size(layers, experts, len(node_of_gpu), slots_per_gpu, trace_file is not None)
    affinity = None if trace_file is None else affinity_from_trace(read_trace(trace_file, layers, experts), experts)
    cost = link_cost_matrix(node_of_gpu, cross_node_cost, cross_gpu_cost, bandwidth)
    return ExpertProblem(loads, node_of_gpu, slots_per_gpu, affinity, cost)


def _check_size(layers: int, experts: int, gpus: int, slots_per_gpu: int, traced: bool) -> None:
    """Enough slots for the experts, and no more EP ranks and slots than the
    solver's bounds allow (MAX_SLOTS, MAX_LAYER_SLOTS, MAX_DENSE_CELLS)."""
    most_ranks = min(MAX_SLOTS, MAX_LAYER_SLOTS // layers, MAX_DENSE_CELLS // (layers * experts))
    if traced:
        most_ranks = min(most_ranks, math.isqrt(MAX_DENSE_CELLS // layers))
    if gpus > most_ranks:
        model = f"{layers} layers x {experts} experts{' with a trace' if traced else ''}"
        raise SpecError("--ep-size", "ep_size", f"at most {most_ranks:,} EP ranks for {model} (the solver's size bounds: "
                        f"layers x ranks x experts{' (and x ranks)' if traced else ''} <= {MAX_DENSE_CELLS:,}, "
                        f"layers x slots <= {MAX_LAYER_SLOTS:,})", gpus)
    most_slots = min(MAX_SLOTS, MAX_LAYER_SLOTS // layers)
    if gpus * slots_per_gpu > most_slots:
        raise SpecError("--slots-per-gpu", "slots_per_gpu", f"at most {most_slots // gpus:,} on {gpus:,} EP ranks for {layers} layers "
                        f"(slots per layer <= {MAX_SLOTS:,}, layers x slots <= {MAX_LAYER_SLOTS:,})", slots_per_gpu)
    if gpus * slots_per_gpu < experts:
        need = -(-experts // gpus)
        raise SpecError("--slots-per-gpu", "slots_per_gpu", f"at least {need} ({experts} experts on {gpus} EP ranks)", slots_per_gpu)


def _ep_ranks(ep_size: int | None, gpus_per_node: int | None, cluster_file: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Node of each EP rank, and the pair bandwidth matrix when a cluster file gives one."""
    if cluster_file is not None:
        cluster = load_cluster(cluster_file)
        if gpus_per_node is not None:
            raise SpecError("--gpus-per-node", "gpus_per_node", f"not given with --cluster ({cluster_file} says how many GPUs each node has)",
                            gpus_per_node)
        size = ep_size or cluster.num_gpus
        if size > cluster.num_gpus:
            raise SpecError("--ep-size", "ep_size", f"at most the {cluster.num_gpus} GPUs of {cluster_file}", size)
        if size > MAX_EP_SIZE:
            raise SpecError("--ep-size", "ep_size", f"at most {MAX_EP_SIZE:,} EP ranks: give --ep-size ({cluster_file} has {size:,} GPUs)", size)
        topology = cluster.topology
        return topology.host_of_slot[:size], topology.bandwidth_GBps[:size, :size]
    if ep_size is None:
        raise SpecError("--ep-size", "ep_size", "the number of EP ranks (or --cluster)")
    per_node = gpus_per_node or ep_size
    if ep_size % per_node:
        raise SpecError("--gpus-per-node", "gpus_per_node", f"a divisor of --ep-size {ep_size}", per_node)
    return np.arange(ep_size) // per_node, None


# --------------------------------------------------------------------------- outputs


def figures_model(figures: Figures) -> MethodFigures:
    return MethodFigures(imbalance=figures.imbalance, **dataclasses.asdict(figures))


def expert_map(problem: ExpertProblem, solution: ExpertPlacement, methods: dict[str, Figures], time_limit_s: float,
               dense_layers: int = 0) -> ExpertMap:
    """The map document; no wall time, so the same inputs give the same file."""
    return ExpertMap(
        schema_version=SCHEMA_VERSION,
        layers=problem.layers,
        experts=problem.experts,
        ep_size=problem.gpus,
        slots_per_gpu=problem.slots_per_gpu,
        redundant_slots=problem.slots - problem.experts,
        dense_layers=dense_layers,
        node_of_rank=problem.node_of_gpu.tolist(),
        solver=SolverInfo(method=solution.method, status=solution.status, objective=solution.objective, bound=solution.bound,
                          gap=solution.gap, time_limit_s=time_limit_s),
        methods={name: figures_model(figures) for name, figures in methods.items()},
        placement=replica_ranks(problem, solution.expert_of_slot),
        sglang_file=SGLANG_FILE,
        imbalance_by_ep_size=imbalance_by_ep_size(problem.load_tokens),
    )


def imbalance_by_ep_size(loads: np.ndarray) -> dict[int, float]:
    """For each EP size from 2 that divides the expert count, the busiest
    rank's routed tokens over the mean when each rank holds a contiguous
    block of experts and no replicas (Megatron's expert placement: rank r
    holds experts [r E/ep, (r+1) E/ep)), over all layers: sum_l max_r /
    sum_l mean_r, since each layer waits for its busiest rank. ``loads``:
    (layers, experts) routed tokens. Rounded to 4 digits."""
    layers, experts = loads.shape
    found = {}
    for ep in range(2, experts + 1):
        if experts % ep:
            continue
        per_rank = loads.reshape(layers, ep, experts // ep).sum(axis=2)
        mean = per_rank.mean(axis=1).sum()
        found[ep] = round(float(per_rank.max(axis=1).sum() / mean), 4) if mean > 0 else 1.0
    return found


def sglang_location(problem: ExpertProblem, expert_of_slot: np.ndarray, dense_layers: int = 0) -> dict:
    """SGLang's ``--init-expert-location`` mapping: ``dense_layers`` rows of its
    trivial map, then the placement's slots (physical expert -> logical expert)."""
    trivial = np.arange(problem.slots) % problem.experts
    rows = [trivial.tolist()] * dense_layers + np.asarray(expert_of_slot).tolist()
    return {"physical_to_logical_map": rows}


def output_files(document: ExpertMap, location: dict) -> dict[str, str]:
    """File name -> text, for ``write_atomically``."""
    fields = document.model_dump()
    # One field per line, each value compact: the placement of 58 layers x 256 experts stays a few hundred KB.
    lines = [f"  {json.dumps(name)}: {json.dumps(value, separators=(',', ':'))}" for name, value in fields.items()]
    return {
        MAP_FILE: "{\n" + ",\n".join(lines) + "\n}\n",
        SGLANG_FILE: json.dumps(location, separators=(",", ":")) + "\n",
    }
