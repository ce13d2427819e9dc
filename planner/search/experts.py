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


# --------------------------------------------------------------------------- inputs


def read_loads(path: Path) -> np.ndarray:
    """(layers, experts) routed tokens."""
    loads = _read_array(path, ("load_tokens", "logical_count"), "load_tokens")
    if loads.ndim == 3:  # SGLang stacks one [layers, experts] count per recording
        loads = loads.sum(axis=0)
    if loads.ndim != 2 or 0 in loads.shape:
        raise SpecError(str(path), "load_tokens", "a (layers, experts) array of routed-token counts", f"shape {loads.shape}")
    if not np.isfinite(loads).all() or (loads < 0).any():
        raise SpecError(str(path), "load_tokens", "finite, non-negative token counts")
    return loads.astype(float)


def read_trace(path: Path, layers: int, experts: int) -> np.ndarray:
    """(tokens, layers, top_k) expert ids, checked against the loads' shape."""
    trace = _read_array(path, ("topk_ids",), "topk_ids")
    if trace.ndim != 3 or trace.shape[1] != layers or 0 in trace.shape:
        raise SpecError(str(path), "topk_ids", f"a (tokens, {layers} layers, top_k) array of expert ids", f"shape {trace.shape}")
    if not np.array_equal(trace, np.round(trace)) or trace.min() < 0 or trace.max() >= experts:
        raise SpecError(str(path), "topk_ids", f"integer expert ids from 0 to {experts - 1}")
    return trace.astype(np.int64)


def _read_array(path: Path, keys: tuple[str, ...], field: str) -> np.ndarray:
    """A numeric array from ``.npy`` or JSON (bare, or under one of ``keys``)."""
    if not path.is_file():
        raise SpecError(str(path), "<file>", "an existing file")
    if path.suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise SpecError(str(path), "<file>", f"a numeric .npy array ({error})") from None
    elif path.suffix == ".json":
        data = read_json(path, "JSON file")
        if isinstance(data, dict):
            found = [key for key in keys if key in data]
            if not found:
                raise SpecError(str(path), field, f"a key {' or '.join(keys)} (or a bare array)", sorted(data))
            data = data[found[0]]
    else:
        raise SpecError(str(path), "<suffix>", "a .json or .npy file", path.suffix)
    try:
        array = np.asarray(data, dtype=float)
    except (TypeError, ValueError):
        raise SpecError(str(path), field, "a rectangular array of numbers") from None
    return array


def expert_problem(loads_file: Path, slots_per_gpu: int, ep_size: int | None = None, gpus_per_node: int | None = None,
                   cluster_file: Path | None = None, trace_file: Path | None = None,
                   cross_node_cost: float = CROSS_NODE_COST, cross_gpu_cost: float = CROSS_GPU_COST) -> ExpertProblem:
    """The solver's problem from the command's inputs; SpecError names what is wrong."""
    loads = read_loads(loads_file)
    layers, experts = loads.shape
    node_of_gpu, bandwidth = _ep_ranks(ep_size, gpus_per_node, cluster_file)
    if slots_per_gpu * len(node_of_gpu) < experts:
        need = -(-experts // len(node_of_gpu))
        raise SpecError("--slots-per-gpu", "slots_per_gpu", f"at least {need} ({experts} experts on {len(node_of_gpu)} EP ranks)", slots_per_gpu)
    affinity = None if trace_file is None else affinity_from_trace(read_trace(trace_file, layers, experts), experts)
    cost = link_cost_matrix(node_of_gpu, cross_node_cost, cross_gpu_cost, bandwidth)
    return ExpertProblem(loads, node_of_gpu, slots_per_gpu, affinity, cost)


def _ep_ranks(ep_size: int | None, gpus_per_node: int | None, cluster_file: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Node of each EP rank, and the pair bandwidth matrix when a cluster file gives one."""
    if cluster_file is not None:
        topology = load_cluster(cluster_file).topology
        size = ep_size or len(topology.host_of_slot)
        if size > len(topology.host_of_slot):
            raise SpecError("--ep-size", "ep_size", f"at most the {len(topology.host_of_slot)} GPUs of {cluster_file}", size)
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
    )


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
