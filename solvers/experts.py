"""Expert placement: how many replicas each routed expert of each MoE layer
gets, and which EP rank (GPU) holds each replica.

Plain numbers in: the tokens routed to each expert of each layer
(``load_tokens``, layers x experts), the node of each EP rank, the slots per
GPU, optionally the inter-layer affinity (``affinity_tokens[l, i, j]``: routed
tokens that go from expert i of layer l to expert j of layer l + 1, from top-k
routing traces) and the cost of moving a token's hidden state between two
GPUs. Every slot holds one replica, as in SGLang and EPLB: slots x GPUs -
experts of them are redundant replicas.

A placement is ``expert_of_slot[l, p]``, the expert that physical slot p of
layer l holds, slot p living on EP rank ``p // slots_per_gpu``: exactly
SGLang's ``physical_to_logical_map``.

The model. An expert's tokens split evenly over its replicas, each token
picking a replica wherever it comes from, so with ``share[l, j, g]`` = the
replicas of expert j on GPU g / the replicas of j::

    load[l, g]    = sum_j load_tokens[l, j] * share[l, j, g]
    flow[l, g, h] = sum_ij affinity_tokens[l, i, j] * share[l, i, g] * share[l + 1, j, h]

    minimise    sum_l max_g load[l, g]  +  1/G * sum_l sum_gh flow[l, g, h] * cost[g, h]
    subject to  every slot holds one replica, every expert at least one,
                max_g load[l, g] <= the busiest GPU of EPLB's greedy placement of layer l

Layers run one after another and each waits for its busiest GPU: the first
term. All GPUs send at once, so the step pays the average GPU's share of the
traffic: the second. ``cost[g, h]`` is in "one token through one expert"
units (``link_cost_matrix``). The cap means loom never gives up balance for traffic
below what EPLB reaches. Affinity follows ExFlow (Yao et al. 2024,
"Exploiting Inter-Layer Expert Affinity for Accelerating Mixture-of-Experts
Model Inference", IPDPS): a token that goes from expert i to expert j on
another GPU carries its hidden state across that link; placing affine experts
together cut cross-GPU routing latency by up to 67% there.

Methods (each returns the placement, its objective, a proven lower bound, the
gap and the status):

* ``contiguous``: expert e on rank e // (E / EP), Megatron's and DeepSpeed's
  layout; redundant slots wrap around (SGLang's trivial map, p -> p mod E).
* ``greedy``: EPLB's global policy (github.com/deepseek-ai/EPLB, eplb.py):
  give each redundant slot to the expert with the most tokens per replica,
  then pack replicas heaviest first onto the lightest GPU with a free slot.
* ``exact``: one CP-SAT model over all layers, replica counts included; the
  traffic's products of shares are CP-SAT multiplication constraints. Proven
  optimal (it matches ``brute_force``) on small instances.
* ``decomposed``: for each layer, replica counts and a packing for balance
  first: EPLB's counts and those of a range of target loads per replica,
  each packed like EPLB, the least busiest GPU kept (``_balanced_row``).
  Then each layer in turn with its neighbouring layers fixed, which makes
  the traffic linear in the layer's placement: a generalised assignment
  problem, improved by exchanging replicas between GPUs, by moving each
  GPU's whole set of replicas to another GPU (an assignment problem,
  solved exactly) and, where the layer is small, by CP-SAT from there.
  Every step keeps the cap and only takes strict improvements; the whole
  is a heuristic, reported against the global bound of ``lower_bound``.

Every CP-SAT solve uses one worker and a deterministic time budget, and the
searches break ties by index, so the same problem gives the same placement
on any machine, unless the time limit cuts it short. That limit is wall
clock: each method computes its deadline once and every step checks it,
returning the best placement so far (EPLB's greedy one at worst) with
``cut_short`` saying what was stopped.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from loom.solvers.gap import relative_gap
from ortools.graph.python import linear_sum_assignment
from ortools.sat.python import cp_model

# A token crossing nodes costs about as much as computing it on one expert:
# DeepSeek-V3 sends 7168 x 2 bytes of hidden state per token, 0.29 us over a
# 50 GB/s NIC share (400 Gb/s per GPU), against 2 x 3 x 7168 x 2048 FLOPs,
# 0.22 us at 400 TFLOP/s. NVLink (450 GB/s) is about nine times faster.
CROSS_NODE_COST = 1.0
CROSS_GPU_COST = 0.1
# ``decomposed``: rounds of exchanges, and of exchanges then moves of whole
# GPUs' sets, per layer and sweep; the largest layer model (experts x GPUs)
# CP-SAT then solves.
SWAP_ROUNDS = 200
IMPROVE_ROUNDS = 10
LAYER_EXACT_MAX_VARIABLES = 1024
# ``decomposed``: the share of the time limit its per-layer CP-SAT models get
# in all, as deterministic budgets (which took up to three times as long in
# wall seconds on the tests' 32 experts x 8 GPUs). The rest is for balancing,
# the neighbourhoods and the evaluation, so that the deadline seldom binds
# where CP-SAT runs and the placement stays the same on any machine.
LAYER_MODELS_SHARE = 0.25
# ``decomposed``: target loads per replica tried for the replica counts.
COUNT_TARGETS = 24
# Forward sweep, then sweeps with both neighbouring layers fixed.
SWEEPS = 2
# ``solve`` uses the exact joint model up to this many (layer, expert, count, GPU) variables.
EXACT_MAX_VARIABLES = 200
# Relative change below which two objectives count as equal.
TOLERANCE = 1e-9
# Integer coefficients of the per-layer models: the largest is about this many ticks.
LAYER_TICKS = 1_000_000


@dataclass(frozen=True)
class ExpertProblem:
    load_tokens: np.ndarray  # (layers, experts) routed tokens
    node_of_gpu: np.ndarray  # (gpus,) EP rank -> node index
    slots_per_gpu: int
    affinity_tokens: np.ndarray | None = None  # (layers - 1, experts, experts)
    link_cost: np.ndarray | None = None  # (gpus, gpus); None: link_cost_matrix(node_of_gpu)

    def __post_init__(self) -> None:
        load = np.asarray(self.load_tokens, dtype=float)
        node = np.asarray(self.node_of_gpu, dtype=np.int64)
        object.__setattr__(self, "load_tokens", load)
        object.__setattr__(self, "node_of_gpu", node)
        if load.ndim != 2 or load.size == 0 or not _finite_non_negative(load):
            raise ValueError("load_tokens must be a non-empty, finite, non-negative (layers, experts) array")
        if node.ndim != 1 or node.size == 0:
            raise ValueError("node_of_gpu needs one node index per GPU")
        if self.slots_per_gpu < 1 or self.slots_per_gpu * self.gpus < self.experts:
            raise ValueError(f"{self.slots_per_gpu} slots on each of {self.gpus} GPUs cannot hold {self.experts} experts")
        if self.affinity_tokens is not None:
            affinity = np.asarray(self.affinity_tokens, dtype=float)
            if affinity.shape != (self.layers - 1, self.experts, self.experts) or not _finite_non_negative(affinity):
                raise ValueError(f"affinity_tokens must be finite, non-negative, shaped ({self.layers - 1}, {self.experts}, {self.experts})")
            object.__setattr__(self, "affinity_tokens", affinity)
        cost = link_cost_matrix(node) if self.link_cost is None else np.asarray(self.link_cost, dtype=float)
        if cost.shape != (self.gpus, self.gpus) or not _finite_non_negative(cost) or np.diag(cost).any():
            raise ValueError("link_cost must be finite, non-negative, (gpus, gpus), zero on the diagonal")
        object.__setattr__(self, "link_cost", cost)

    @property
    def layers(self) -> int:
        return self.load_tokens.shape[0]

    @property
    def experts(self) -> int:
        return self.load_tokens.shape[1]

    @property
    def gpus(self) -> int:
        return len(self.node_of_gpu)

    @property
    def slots(self) -> int:
        return self.gpus * self.slots_per_gpu

    @cached_property
    def eplb_counts(self) -> np.ndarray:
        """EPLB's replication (``replicate_experts``), replicas per layer and
        expert: every expert one, then each redundant slot to the expert
        with the most tokens per replica (``_replicate``)."""
        return np.stack([_replicate(self.load_tokens[layer], np.ones(self.experts, dtype=np.int64), self.slots) for layer in range(self.layers)])

    @cached_property
    def greedy_rows(self) -> np.ndarray:
        """EPLB's placement (``greedy_slots``), computed once: the cap, the
        fallback of every method and a baseline. Read-only; copy to change."""
        rows = greedy_slots(self)
        rows.flags.writeable = False
        return rows

    @cached_property
    def balance_cap_tokens(self) -> np.ndarray:
        """Per layer, the busiest GPU's tokens under EPLB's greedy placement:
        no method may put more on any GPU."""
        return layer_loads(self, self.greedy_rows).max(axis=1)


def _finite_non_negative(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all() and (values >= 0).all())


@dataclass(frozen=True)
class Figures:
    """What a placement costs, summed over layers."""

    max_load_tokens: float  # the busiest GPU of each layer
    mean_load_tokens: float  # the mean GPU of each layer
    cross_gpu_tokens: float  # routed tokens whose next expert is on another GPU (0 without affinity)
    cross_node_tokens: float  # ... on another node
    traffic_cost: float  # the objective's second term
    objective: float

    @property
    def imbalance(self) -> float:
        return self.max_load_tokens / self.mean_load_tokens if self.mean_load_tokens > 0 else 1.0


@dataclass(frozen=True)
class ExpertPlacement:
    expert_of_slot: np.ndarray  # (layers, gpus * slots_per_gpu)
    objective: float
    bound: float
    status: str  # "optimal" (proven) or "feasible" (a gap to the bound remains)
    method: str
    wall_time_s: float
    figures: Figures  # evaluate(problem, expert_of_slot)
    cut_short: str = ""  # what the time limit stopped, and what stands in for it; "" if nothing

    @property
    def gap(self) -> float:
        return relative_gap(self.objective, self.bound)


def link_cost_matrix(node_of_gpu: np.ndarray, cross_node: float = CROSS_NODE_COST, cross_gpu: float = CROSS_GPU_COST,
                     bandwidth_GBps: np.ndarray | None = None) -> np.ndarray:
    """Cost of one token's hidden state crossing from GPU g to GPU h, in
    "one token through one expert" units: ``cross_gpu`` inside a node,
    ``cross_node`` across. With a pair bandwidth matrix (the cluster graph's
    or a measured one), every link costs in proportion to its transfer time,
    the slowest link between nodes costing ``cross_node`` (on one node, the
    slowest link costing ``cross_gpu``)."""
    node_of_gpu = np.asarray(node_of_gpu)
    off = ~np.eye(len(node_of_gpu), dtype=bool)
    same = node_of_gpu[:, None] == node_of_gpu[None, :]
    if bandwidth_GBps is None:
        return np.where(off, np.where(same, cross_gpu, cross_node), 0.0)
    bandwidth = np.asarray(bandwidth_GBps, dtype=float)
    if bandwidth.shape != (len(node_of_gpu),) * 2 or not (bandwidth[off] > 0).all():
        raise ValueError("bandwidth_GBps must be (gpus, gpus) with positive entries off the diagonal")
    anchor = (cross_node, bandwidth[~same].min()) if (~same).any() else (cross_gpu, bandwidth[off].min(initial=np.inf))
    return np.where(off, anchor[0] * anchor[1] / np.where(off, bandwidth, 1.0), 0.0)


def affinity_from_trace(topk_ids: np.ndarray, experts: int) -> np.ndarray:
    """``affinity[l, i, j]``: of the routed tokens at expert i in layer l, how
    many continue to expert j in layer l + 1. ``topk_ids`` is (tokens, layers,
    top_k) expert ids; each of a token's k routes at layer l continues to each
    of its k routes at l + 1 with weight 1/k, so a row sums to the expert's
    load and the total to the routed tokens."""
    topk_ids = np.asarray(topk_ids, dtype=np.int64)
    tokens, layers, top_k = topk_ids.shape
    affinity = np.empty((max(layers - 1, 0), experts, experts))
    for layer in range(layers - 1):
        pairs = topk_ids[:, layer, :, None] * experts + topk_ids[:, layer + 1, None, :]
        affinity[layer] = np.bincount(pairs.ravel(), minlength=experts * experts).reshape(experts, experts) / top_k
    return affinity


def loads_from_trace(topk_ids: np.ndarray, experts: int) -> np.ndarray:
    """Routed tokens per layer and expert, from (tokens, layers, top_k) ids."""
    topk_ids = np.asarray(topk_ids, dtype=np.int64)
    return np.stack([np.bincount(topk_ids[:, layer].ravel(), minlength=experts) for layer in range(topk_ids.shape[1])]).astype(float)


# --------------------------------------------------------------------------- evaluation


def shares(problem: ExpertProblem, expert_of_slot: np.ndarray) -> np.ndarray:
    """share[l, j, g]: the fraction of expert j's tokens that GPU g processes."""
    rows = np.asarray(expert_of_slot, dtype=np.int64)
    cells = len(rows) * problem.experts * problem.gpus
    gpu_of_slot = np.arange(problem.slots) // problem.slots_per_gpu
    index = (np.arange(len(rows))[:, None] * problem.experts + rows) * problem.gpus + gpu_of_slot
    on_gpu = np.bincount(index.ravel(), minlength=cells).reshape(len(rows), problem.experts, problem.gpus)
    return on_gpu / on_gpu.sum(axis=2, keepdims=True)


def layer_loads(problem: ExpertProblem, expert_of_slot: np.ndarray) -> np.ndarray:
    """Tokens each GPU processes, (layers, gpus)."""
    return np.einsum("lj,ljg->lg", problem.load_tokens, shares(problem, expert_of_slot))


def _flow(problem: ExpertProblem, expert_of_slot: np.ndarray, share: np.ndarray, layer: int) -> np.ndarray:
    """flow[g, h]: routed tokens going from GPU g (``layer``) to GPU h (``layer`` + 1).
    Each slot of ``layer`` sends its expert's onward tokens over its
    replicas: slots x GPUs of work, where share^T @ affinity @ share would
    take experts x GPUs^2."""
    row = expert_of_slot[layer]
    # [i, h]: the tokens of one replica of expert i that reach GPU h
    onward = problem.affinity_tokens[layer] @ share[layer + 1] / np.bincount(row, minlength=problem.experts)[:, None]
    return onward[row].reshape(problem.gpus, problem.slots_per_gpu, problem.gpus).sum(axis=1)


def evaluate(problem: ExpertProblem, expert_of_slot: np.ndarray) -> Figures:
    """What a placement costs (``Figures``, in tokens summed over layers).
    Raises ValueError if ``expert_of_slot`` is not a placement (``check_placement``)."""
    check_placement(problem, expert_of_slot)
    expert_of_slot = np.asarray(expert_of_slot)
    share = shares(problem, expert_of_slot)
    loads = np.einsum("lj,ljg->lg", problem.load_tokens, share)
    same_node = (problem.node_of_gpu[:, None] == problem.node_of_gpu[None, :]).astype(float)
    cross_gpu = cross_node = traffic = 0.0
    for layer in range(problem.layers - 1 if problem.affinity_tokens is not None else 0):
        flow = _flow(problem, expert_of_slot, share, layer)
        total = float(flow.sum())
        cross_gpu += total - float(np.trace(flow))
        cross_node += total - float(np.vdot(flow, same_node))
        traffic += float(np.vdot(flow, problem.link_cost))
    max_load = float(loads.max(axis=1).sum())
    return Figures(
        max_load_tokens=max_load,
        mean_load_tokens=float(loads.mean(axis=1).sum()),
        cross_gpu_tokens=cross_gpu,
        cross_node_tokens=cross_node,
        traffic_cost=traffic / problem.gpus,
        objective=max_load + traffic / problem.gpus,
    )


def check_placement(problem: ExpertProblem, expert_of_slot: np.ndarray) -> None:
    """Raise ValueError unless every slot holds an expert and every expert a slot, in every layer."""
    expert_of_slot = np.asarray(expert_of_slot)
    if expert_of_slot.shape != (problem.layers, problem.slots):
        raise ValueError(f"a placement is ({problem.layers}, {problem.slots}) slots, not {expert_of_slot.shape}")
    if expert_of_slot.min() < 0 or expert_of_slot.max() >= problem.experts:
        raise ValueError("every slot must hold one of the experts")
    counts = np.stack([np.bincount(row, minlength=problem.experts) for row in expert_of_slot])
    if (counts < 1).any():
        layer, expert = np.argwhere(counts < 1)[0]
        raise ValueError(f"expert {expert} of layer {layer} has no replica")


def replica_ranks(problem: ExpertProblem, expert_of_slot: np.ndarray) -> list[list[list[int]]]:
    """Per layer, per expert: the EP rank of each of its replicas, ascending."""
    gpu_of_slot = np.arange(problem.slots) // problem.slots_per_gpu
    placement = []
    for row in np.asarray(expert_of_slot):
        by_expert = gpu_of_slot[np.lexsort((gpu_of_slot, row))]
        ends = np.cumsum(np.bincount(row, minlength=problem.experts))[:-1]
        placement.append([ranks.tolist() for ranks in np.split(by_expert, ends)])
    return placement


def _canonical(problem: ExpertProblem, expert_of_slot: np.ndarray) -> np.ndarray:
    """Each GPU's slots in ascending expert order: one representative of
    placements that differ only in slot order on a GPU."""
    layers = len(expert_of_slot)
    return np.sort(np.asarray(expert_of_slot).reshape(layers, problem.gpus, problem.slots_per_gpu), axis=2).reshape(layers, -1)


def _slots_from_counts(problem: ExpertProblem, on_gpu: np.ndarray) -> np.ndarray:
    """A layer's slot row from replicas per (expert, GPU)."""
    return np.concatenate([np.repeat(np.arange(problem.experts), on_gpu[:, g]) for g in range(problem.gpus)])


# --------------------------------------------------------------------------- bounds


def lower_bound(problem: ExpertProblem) -> float:
    """No placement beats this. Per layer, the busiest GPU carries at least
    the mean GPU's tokens and at least the largest tokens-per-replica that
    any replication leaves (EPLB's minimises it, ``_replicate``). Traffic: GPU g
    holds at most S experts of layer l + 1, so of the tokens leaving expert
    i at most the S largest of affinity[l, i, :] stay on g (shares are at
    most 1 and sum to 1 over g); the rest cross GPUs. Likewise from j's side,
    and with S x (GPUs of the node) for nodes."""
    loads = problem.load_tokens
    replica = (loads / problem.eplb_counts).max(axis=1)
    bound = float(np.maximum(loads.sum(axis=1) / problem.gpus, replica).sum())
    if problem.affinity_tokens is None or problem.layers < 2:
        return bound
    per_node = np.bincount(problem.node_of_gpu).max()
    crossing_gpu = _crossing_floor(problem.affinity_tokens, problem.slots_per_gpu)
    crossing_node = _crossing_floor(problem.affinity_tokens, problem.slots_per_gpu * per_node)
    same = problem.node_of_gpu[:, None] == problem.node_of_gpu[None, :]
    off = ~np.eye(problem.gpus, dtype=bool)
    inside = problem.link_cost[same & off].min() if (same & off).any() else np.inf
    across = problem.link_cost[~same].min() if (~same).any() else np.inf
    # Every crossing token pays at least the cheaper kind of link; those crossing nodes the dearer one.
    cheapest = min(inside, across)
    if not np.isfinite(cheapest):  # one GPU: no token crosses
        return bound
    traffic = cheapest * crossing_gpu + (across - cheapest) * crossing_node if np.isfinite(across) else cheapest * crossing_gpu
    return bound + float(traffic) / problem.gpus


def _crossing_floor(affinity: np.ndarray, held: int) -> float:
    """Routed tokens that must change place when a place holds ``held`` experts per layer."""
    total = 0.0
    for pair in affinity:
        leaving = pair.sum(axis=1) - np.sort(pair, axis=1)[:, ::-1][:, :held].sum(axis=1)
        arriving = pair.sum(axis=0) - np.sort(pair, axis=0)[::-1][:held].sum(axis=0)
        total += max(leaving.sum(), arriving.sum())
    return total


def _finish(problem: ExpertProblem, expert_of_slot: np.ndarray, bound: float, proven: bool, method: str, started: float,
            cut_short: str = "") -> ExpertPlacement:
    expert_of_slot = _canonical(problem, expert_of_slot)
    figures = evaluate(problem, expert_of_slot)
    bound = min(max(bound, 0.0), figures.objective)
    status = "optimal" if proven or figures.objective <= bound * (1 + TOLERANCE) else "feasible"
    return ExpertPlacement(expert_of_slot, figures.objective, bound, status, method, time.perf_counter() - started, figures, cut_short)


# --------------------------------------------------------------------------- baselines


def contiguous_slots(problem: ExpertProblem) -> np.ndarray:
    """Slot p holds expert p mod E: expert e on rank e // (E / EP) when there
    are no redundant slots (Megatron, DeepSpeed), SGLang's trivial map when there are."""
    return np.tile(np.arange(problem.slots) % problem.experts, (problem.layers, 1))


def greedy_slots(problem: ExpertProblem) -> np.ndarray:
    """EPLB's global policy: its replication, then ``balanced_packing``
    (``_lpt``). Like EPLB, two replicas of one expert may share a GPU."""
    rows = [_packed_row(problem, layer, problem.eplb_counts[layer]) for layer in range(problem.layers)]
    return _canonical(problem, np.array(rows))


def _replicate(load_tokens: np.ndarray, counts: np.ndarray, slots: int, most_loaded: bool = True) -> np.ndarray:
    """Add replicas until ``slots``, each to the expert with the most tokens
    per replica (EPLB's ``replicate_experts``), or the fewest. Adding to the
    most loaded minimises the largest tokens-per-replica: an expert that
    ends with fewer replicas than another count vector gives it got its
    last one while its ratio was the largest, which never rises, so that
    vector's largest ratio is no smaller."""
    counts = counts.copy()
    for _ in range(slots - counts.sum()):
        ratio = load_tokens / counts
        counts[np.argmax(ratio) if most_loaded else np.argmin(ratio)] += 1
    return counts


def _packed_row(problem: ExpertProblem, layer: int, counts: np.ndarray) -> np.ndarray:
    """One layer's slot row: ``counts`` replicas per expert, packed by ``_lpt``."""
    on_gpu = _lpt(problem.load_tokens[layer] / counts, counts, problem.gpus, problem.slots_per_gpu)
    return _slots_from_counts(problem, on_gpu)


def _lpt(replica_tokens: np.ndarray, counts: np.ndarray, bins: int, slots: int) -> np.ndarray:
    """EPLB's ``balanced_packing``: replicas heaviest first (ties: expert
    order), each onto the bin with the fewest tokens among those with a free
    slot (ties: lowest index). Returns replicas per (expert, bin)."""
    on_bin = np.zeros((len(counts), bins), dtype=np.int64)
    open_bins = [(0.0, b) for b in range(bins)]  # a heap of (tokens, bin) with a free slot
    free = [slots] * bins
    for expert in sorted(np.repeat(np.arange(len(counts)), counts).tolist(), key=lambda j: (-replica_tokens[j], j)):
        tokens, target = heapq.heappop(open_bins)
        on_bin[expert, target] += 1
        free[target] -= 1
        if free[target]:
            heapq.heappush(open_bins, (tokens + replica_tokens[expert], target))
    return on_bin


def contiguous(problem: ExpertProblem) -> ExpertPlacement:
    started = time.perf_counter()
    return _finish(problem, contiguous_slots(problem), lower_bound(problem), False, "contiguous", started)


def greedy(problem: ExpertProblem) -> ExpertPlacement:
    started = time.perf_counter()
    return _finish(problem, problem.greedy_rows, lower_bound(problem), False, "greedy", started)


# --------------------------------------------------------------------------- entry point


def exact_variables(problem: ExpertProblem) -> int:
    """Size of the exact joint model: (layer, expert, replica count, GPU) variables."""
    return problem.layers * problem.experts * _max_replicas(problem) * problem.gpus


def solve(problem: ExpertProblem, time_limit_s: float = 30.0) -> ExpertPlacement:
    """The best placement found within ``time_limit_s`` seconds of wall
    clock (plus one evaluation of the result): the exact joint model on small
    instances, the layer-by-layer decomposition on large ones. Where the
    limit cuts a method short, ``cut_short`` says so. Raises ValueError for a
    negative or non-finite ``time_limit_s``."""
    if exact_variables(problem) <= EXACT_MAX_VARIABLES:
        return exact(problem, time_limit_s)
    return decomposed(problem, time_limit_s)


def _deadline_s(time_limit_s: float) -> float:
    """The ``time.monotonic()`` reading by which a method stops searching."""
    if not (math.isfinite(time_limit_s) and time_limit_s >= 0):
        raise ValueError(f"time_limit_s must be a finite number of seconds >= 0, not {time_limit_s!r}")
    return time.monotonic() + time_limit_s


def _max_replicas(problem: ExpertProblem) -> int:
    """The most replicas one expert can get: every redundant slot."""
    return problem.slots - problem.experts + 1


def _solver(budget_s: float, deadline_s: float):
    """One worker and a deterministic time budget: the same model gives the
    same answer on any machine. CP-SAT's deterministic seconds run slower
    than wall seconds on these models, hence half the budget. The wall clock
    stops it at ``deadline_s`` (``time.monotonic()``) at the latest; only then
    may the answer depend on the machine."""
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_deterministic_time = max(budget_s / 2, 0.01)
    solver.parameters.max_time_in_seconds = max(min(4 * budget_s, deadline_s - time.monotonic()), 0.001)
    solver.parameters.random_seed = 0
    return solver


# --------------------------------------------------------------------------- exact model


def exact(problem: ExpertProblem, time_limit_s: float = 30.0) -> ExpertPlacement:
    """One CP-SAT model over every layer, replica counts and all, solved
    within ``time_limit_s`` seconds of wall clock (the model is small: see
    EXACT_MAX_VARIABLES); EPLB's greedy placement if CP-SAT finds none in
    time. Raises ValueError for a negative or non-finite ``time_limit_s``.

    Shares are integers scaled by D = lcm(1..K), K the most replicas one
    expert can get: ``y[l, j, k]`` picks expert j's count k, ``n[l, j, k, g]``
    places its replicas, and ``F[l, j, g] = sum_k D/k * n[l, j, k, g]`` is D x
    share. Token counts, affinities and costs become integer ticks, rounded
    down, so the integer objective never exceeds the true one (scaled) and
    CP-SAT's bound stays a bound; they are exact for integer token counts and
    dyadic costs. The traffic term is sum F[l, i, g] * T[l, i, g] with
    T[l, i, g] = sum_jh affinity x cost x F[l + 1, j, h], a CP-SAT product."""
    started = time.perf_counter()
    deadline_s = _deadline_s(time_limit_s)
    L, E, G, S = problem.layers, problem.experts, problem.gpus, problem.slots_per_gpu
    K = _max_replicas(problem)
    D = math.lcm(*range(1, K + 1))
    ticks = _exact_ticks(problem, D)
    load = np.floor(problem.load_tokens * ticks).astype(np.int64)
    model = cp_model.CpModel()

    # Replica counts and placements.
    y, n, F = {}, {}, {}
    for l, j in itertools.product(range(L), range(E)):
        for k in range(1, K + 1):
            y[l, j, k] = model.NewBoolVar(f"count_{l}_{j}_{k}")
            for g in range(G):
                n[l, j, k, g] = model.NewIntVar(0, min(k, S), f"replicas_{l}_{j}_{k}_{g}")
            model.Add(sum(n[l, j, k, g] for g in range(G)) == k * y[l, j, k])
        model.AddExactlyOne(y[l, j, k] for k in range(1, K + 1))
        for g in range(G):
            F[l, j, g] = model.NewIntVar(0, D, f"share_{l}_{j}_{g}")
            model.Add(F[l, j, g] == sum(D // k * n[l, j, k, g] for k in range(1, K + 1)))
        model.Add(sum(F[l, j, g] for g in range(G)) == D)  # implied, but it tightens the relaxation
    for l, g in itertools.product(range(L), range(G)):
        model.Add(sum(n[l, j, k, g] for j in range(E) for k in range(1, K + 1)) == S)

    # The busiest GPU of each layer, capped at greedy's (in the same integer units, so greedy stays feasible).
    greedy_share = np.rint(shares(problem, problem.greedy_rows) * D).astype(np.int64)
    cap = np.einsum("lj,ljg->lg", load, greedy_share).max(axis=1)
    busiest = []
    for l in range(L):
        M = model.NewIntVar(0, int(cap[l]), f"busiest_{l}")
        for g in range(G):
            model.Add(sum(int(load[l, j]) * F[l, j, g] for j in range(E)) <= M)
        busiest.append(M)

    # Traffic: x G x ticks x D^2, so integer.
    traffic = []
    if problem.affinity_tokens is not None:
        coefficient = np.floor(np.einsum("lij,gh->ligjh", problem.affinity_tokens, problem.link_cost) * ticks).astype(np.int64)
        for l, i, g in itertools.product(range(L - 1), range(E), range(G)):
            terms = coefficient[l, i, g]
            if not terms.any():
                continue
            T = model.NewIntVar(0, int(D * terms.sum()), f"onward_{l}_{i}_{g}")
            model.Add(T == sum(int(terms[j, h]) * F[l + 1, j, h] for j in range(E) for h in range(G) if terms[j, h]))
            product = model.NewIntVar(0, int(D * D * terms.sum()), f"traffic_{l}_{i}_{g}")
            model.AddMultiplicationEquality(product, [F[l, i, g], T])
            traffic.append(product)
    model.Minimize(G * D * sum(busiest) + sum(traffic))

    for (l, j, k), var in y.items():
        model.AddHint(var, int(k == problem.eplb_counts[l, j]))
    for (l, j, k, g), var in n.items():
        model.AddHint(var, int(greedy_share[l, j, g] * k // D) if k == problem.eplb_counts[l, j] else 0)

    solver = _solver(time_limit_s, deadline_s)
    status = solver.Solve(model)
    scale = G * ticks * D * D
    bound = max(lower_bound(problem), solver.BestObjectiveBound() / scale)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        timed_out = "CP-SAT found no placement within the time limit: EPLB's greedy placement stands in"
        return _finish(problem, problem.greedy_rows, bound, False, "exact", started, timed_out if status == cp_model.UNKNOWN else "")
    on_gpu = np.zeros((L, E, G), dtype=np.int64)
    for (l, j, k, g), var in n.items():
        on_gpu[l, j, g] += solver.Value(var)
    expert_of_slot = np.array([_slots_from_counts(problem, on_gpu[l]) for l in range(L)])
    return _finish(problem, expert_of_slot, bound, status == cp_model.OPTIMAL, "exact", started)


def _exact_ticks(problem: ExpertProblem, D: int) -> float:
    """A power of two per token: exact for integer and dyadic inputs, and small
    enough that the scaled objective stays far inside 64-bit integers."""
    largest = problem.gpus * problem.load_tokens.sum()
    if problem.affinity_tokens is not None:
        largest += problem.affinity_tokens.sum() * problem.link_cost.max()
    largest *= D * D
    return 2.0 ** math.floor(math.log2(2**50 / max(largest, 1.0)))


# --------------------------------------------------------------------------- decomposition


def decomposed(problem: ExpertProblem, time_limit_s: float = 30.0) -> ExpertPlacement:
    """Replica counts and packing for balance first (``_balanced_row``);
    then each layer in turn, its neighbouring layers fixed.

    With the neighbours fixed, a replica of expert j on GPU g costs
    ``toward[j, g] / count_j`` of traffic (``_toward``), so one layer is a
    generalised assignment problem: replicas onto slots at a linear cost,
    plus the busiest GPU, every GPU within the cap. ``_improve_layer``
    alternates two neighbourhoods until neither helps; where the layer model
    is small (LAYER_EXACT_MAX_VARIABLES), CP-SAT then solves it from there
    within an even share of LAYER_MODELS_SHARE of the time limit
    (``_layer_model``; on 256 experts x 64 GPUs it found next to nothing in
    0.1 s per pair of nodes, so large layers stop at the neighbourhoods, in
    seconds). The first sweep fixes only the layer before, later ones both
    neighbours. A layer takes a new placement only if it costs strictly less.

    ``time_limit_s`` (seconds of wall clock; ValueError if negative or not
    finite) bounds the whole: every step checks the deadline, and once it
    has passed the placement so far is returned, layers not yet balanced
    keeping EPLB's greedy rows, with ``cut_short`` saying where it stopped."""
    started = time.perf_counter()
    deadline_s = _deadline_s(time_limit_s)
    bound = lower_bound(problem)
    placed = problem.greedy_rows.copy()
    for layer in range(problem.layers):
        if time.monotonic() >= deadline_s:
            return _finish(problem, placed, bound, False, "decomposed", started,
                           f"time limit reached after balancing {layer} of {problem.layers} layers: the rest keep EPLB's greedy placement")
        placed[layer] = _balanced_row(problem, layer, deadline_s)
    layer_budget_s = LAYER_MODELS_SHARE * time_limit_s / (SWEEPS * problem.layers)
    small = problem.experts * problem.gpus <= LAYER_EXACT_MAX_VARIABLES
    for sweep, layer in itertools.product(range(SWEEPS), range(problem.layers)):
        if time.monotonic() >= deadline_s:
            kept = "their balanced placement" if sweep == 0 else "the previous sweep's placement"
            return _finish(problem, placed, bound, False, "decomposed", started,
                           f"time limit reached in traffic sweep {sweep + 1} of {SWEEPS} at layer {layer} of {problem.layers}: "
                           f"layers {layer} to {problem.layers - 1} keep {kept}")
        toward = _toward(problem, placed, layer, both_sides=sweep > 0)
        option = _improve_layer(problem, layer, toward, placed[layer], deadline_s)
        if small and time.monotonic() < deadline_s:
            option = _layer_model(problem, layer, toward, option, layer_budget_s, deadline_s)
        if _layer_cost(problem, layer, option, toward) < _layer_cost(problem, layer, placed[layer], toward) * (1 - TOLERANCE):
            placed[layer] = option
    return _finish(problem, placed, bound, False, "decomposed", started)


def _balanced_row(problem: ExpertProblem, layer: int, deadline_s: float) -> np.ndarray:
    """The layer's row with the least busiest GPU among ``_lpt`` packings of
    the replica counts of ``_count_candidates``, EPLB's first (so never
    worse than greedy); candidates after the first are skipped once
    ``deadline_s`` (``time.monotonic()``) has passed."""
    load = problem.load_tokens[layer]
    best_row, best_busiest = None, math.inf
    for counts in _count_candidates(problem, layer):
        if best_row is not None and time.monotonic() >= deadline_s:
            break
        row = _packed_row(problem, layer, counts)
        busiest = (load @ shares(problem, row[None])[0]).max()
        if busiest < best_busiest:
            best_row, best_busiest = row, busiest
    return _canonical(problem, best_row[None])[0]


def _count_candidates(problem: ExpertProblem, layer: int) -> Iterator[np.ndarray]:
    """Replica counts to pack, per expert: EPLB's, and for targets T from
    EPLB's largest tokens-per-replica up to the largest expert, ceil(tokens
    / T) replicas each, the slots left going to the most or the least loaded
    experts per replica. EPLB's counts minimise the largest replica, but
    when every slot must be filled they can leave more large replicas than
    GPUs (Zipf 1.5 on 256 experts x 64 GPUs x 5 slots: 66 replicas of
    295-381 tokens in one layer; over 58 layers the busiest GPU averages 650
    tokens with EPLB's counts, 528 with targets, against a mean of 512)."""
    load = problem.load_tokens[layer]
    yield problem.eplb_counts[layer]
    smallest = (load / problem.eplb_counts[layer]).max()
    for target in smallest * np.geomspace(1.0, max(load.max() / max(smallest, 1e-30), 1.0), COUNT_TARGETS):
        base = np.maximum(1, np.ceil(load / max(target, 1e-30) - TOLERANCE)).astype(np.int64)
        if base.sum() <= problem.slots:
            for most_loaded in (True, False):
                yield _replicate(load, base, problem.slots, most_loaded)


def _toward(problem: ExpertProblem, placed: np.ndarray, layer: int, both_sides: bool) -> np.ndarray:
    """toward[j, g]: the traffic cost of all of expert j's tokens of ``layer``
    being on GPU g, the previous layer (and, if ``both_sides``, the next)
    fixed as in ``placed``."""
    toward = np.zeros((problem.experts, problem.gpus))
    if problem.affinity_tokens is None:
        return toward
    if layer > 0:  # tokens arriving from layer - 1
        toward += problem.affinity_tokens[layer - 1].T @ shares(problem, placed[layer - 1:layer])[0] @ problem.link_cost
    if both_sides and layer < problem.layers - 1:  # tokens leaving for layer + 1
        toward += problem.affinity_tokens[layer] @ shares(problem, placed[layer + 1:layer + 2])[0] @ problem.link_cost.T
    return toward / problem.gpus


def _layer_cost(problem: ExpertProblem, layer: int, row: np.ndarray, toward: np.ndarray) -> float:
    """The part of the objective that moves with one layer's placement: its
    busiest GPU plus its traffic to the fixed neighbours."""
    share = shares(problem, row[None])[0]
    return float((problem.load_tokens[layer] @ share).max() + (toward * share).sum())


def _improve_layer(problem: ExpertProblem, layer: int, toward: np.ndarray, row: np.ndarray, deadline_s: float) -> np.ndarray:
    """Exchanges of replicas, then a best move of whole GPUs' sets, until a
    round changes nothing (at most IMPROVE_ROUNDS rounds) or ``deadline_s``
    (``time.monotonic()``) passes."""
    for _ in range(IMPROVE_ROUNDS):
        if time.monotonic() >= deadline_s:
            break
        improved = _move_gpu_sets(problem, layer, toward, _swap_search(problem, layer, toward, row, deadline_s))
        if np.array_equal(improved, row):
            break
        row = improved
    return row


def _move_gpu_sets(problem: ExpertProblem, layer: int, toward: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Give each GPU's set of replicas to another GPU, the permutation with
    the least traffic: loads only change places, so the busiest GPU and the
    cap hold. A linear assignment problem (sets x GPUs, OR-Tools, exact on
    costs in integer ticks); keeps ``row`` unless strictly cheaper."""
    replica_cost = toward / np.bincount(row, minlength=problem.experts)[:, None]
    sets = np.asarray(row).reshape(problem.gpus, problem.slots_per_gpu)
    cost = replica_cost[sets].sum(axis=1)  # [set, GPU]
    ticks = np.rint(cost * LAYER_TICKS / max(cost.max(), 1e-30)).astype(np.int64)
    assignment = linear_sum_assignment.SimpleLinearSumAssignment()
    sources, targets = np.divmod(np.arange(problem.gpus * problem.gpus), problem.gpus)
    assignment.add_arcs_with_cost(sources, targets, ticks.ravel())
    if assignment.solve() != assignment.OPTIMAL:
        return row
    moved = np.empty_like(sets)
    for index in range(problem.gpus):
        moved[assignment.right_mate(index)] = sets[index]
    if cost[np.arange(problem.gpus), [assignment.right_mate(i) for i in range(problem.gpus)]].sum() >= np.trace(cost) * (1 - TOLERANCE):
        return row
    return _canonical(problem, moved.reshape(1, -1))[0]


def _swap_search(problem: ExpertProblem, layer: int, toward: np.ndarray, row: np.ndarray, deadline_s: float) -> np.ndarray:
    """Exchange replicas between GPUs while that lowers the layer's cost and
    keeps both GPUs within the cap (the classic exchange neighbourhood of
    generalised assignment). Each round prices every pair of slots at once,
    then applies the best improving exchanges on disjoint GPUs, each priced
    again against the loads the earlier ones left; at most SWAP_ROUNDS rounds,
    none begun after ``deadline_s`` (``time.monotonic()``)."""
    counts = np.bincount(row, minlength=problem.experts)
    cap = problem.balance_cap_tokens[layer] * (1 + TOLERANCE)
    gpu = np.arange(problem.slots) // problem.slots_per_gpu
    expert = np.array(row)
    replica_tokens = problem.load_tokens[layer] / counts
    replica_cost = toward / counts[:, None]
    scale = replica_tokens.sum() + replica_cost.max(axis=1) @ counts
    upper = np.triu(np.ones((problem.slots, problem.slots), dtype=bool), k=1)
    for _ in range(SWAP_ROUNDS):
        if time.monotonic() >= deadline_s:
            break
        tokens = replica_tokens[expert]
        loads = np.bincount(gpu, tokens, minlength=problem.gpus)
        here = replica_cost[expert, gpu]
        there = replica_cost[expert][:, gpu]  # [a, b]: slot a's replica on slot b's GPU
        traffic = there + there.T - here[:, None] - here[None, :]
        load_a = loads[gpu][:, None] - tokens[:, None] + tokens[None, :]
        load_b = loads[gpu][None, :] + tokens[:, None] - tokens[None, :]
        busiest = np.maximum(_busiest_elsewhere(loads)[gpu][:, gpu], np.maximum(load_a, load_b))
        delta = traffic + busiest - loads.max()
        allowed = upper & (gpu[:, None] != gpu[None, :]) & (expert[:, None] != expert[None, :]) & (load_a <= cap) & (load_b <= cap)
        candidates = np.flatnonzero(allowed & (delta < -TOLERANCE * scale))
        if not candidates.size:
            break
        touched = np.zeros(problem.gpus, dtype=bool)
        for a, b in zip(*np.unravel_index(candidates[np.argsort(delta.flat[candidates], kind="stable")], delta.shape)):
            if touched[gpu[a]] or touched[gpu[b]]:
                continue
            moved = tokens[b] - tokens[a]
            after = loads.copy()
            after[gpu[a]] += moved
            after[gpu[b]] -= moved
            if traffic[a, b] + after.max() - loads.max() < -TOLERANCE * scale:
                expert[a], expert[b] = expert[b], expert[a]
                loads = after
                touched[[gpu[a], gpu[b]]] = True
    return _canonical(problem, expert[None])[0]


def _busiest_elsewhere(loads: np.ndarray) -> np.ndarray:
    """[g, h]: the most tokens on any GPU other than g and h (0 if none)."""
    result = np.zeros((len(loads), len(loads)))
    for gpu in np.argsort(loads, kind="stable")[-3:]:  # the busiest last, so it wins where it counts
        elsewhere = np.ones_like(result, dtype=bool)
        elsewhere[gpu, :] = elsewhere[:, gpu] = False
        result = np.where(elsewhere, loads[gpu], result)
    return result


def _layer_model(problem: ExpertProblem, layer: int, toward: np.ndarray, row: np.ndarray, budget_s: float, deadline_s: float) -> np.ndarray:
    """One layer, neighbours fixed, in CP-SAT, hinted with ``row``::

        minimise    M + sum_jg toward[j, g] / count_j x n[j, g]
        subject to  sum_g n[j, g] = count_j                  every replica placed
                    sum_j n[j, g] = S                        every slot filled
                    sum_j tokens_j / count_j x n[j, g] <= M <= cap

    Tokens and cost share one integer tick (rounded: the caller prices the
    result again exactly). Returns ``row`` if CP-SAT finds nothing within the cap."""
    counts = np.bincount(row, minlength=problem.experts)
    replica_tokens = problem.load_tokens[layer] / counts
    replica_cost = toward / counts[:, None]
    unit = LAYER_TICKS / max(replica_tokens @ counts + replica_cost.max(axis=1) @ counts, 1e-30)
    tokens = np.rint(replica_tokens * unit).astype(np.int64)
    cost = np.rint(replica_cost * unit).astype(np.int64)
    experts, gpus, slots = range(problem.experts), range(problem.gpus), problem.slots_per_gpu
    hint = np.zeros((problem.experts, problem.gpus), dtype=np.int64)
    np.add.at(hint, (row, np.arange(problem.slots) // slots), 1)

    model = cp_model.CpModel()
    n = {(j, g): model.NewIntVar(0, int(min(counts[j], slots)), f"replicas_{j}_{g}") for j in experts for g in gpus}
    for j in experts:
        model.Add(sum(n[j, g] for g in gpus) == int(counts[j]))
    for g in gpus:
        model.Add(sum(n[j, g] for j in experts) == slots)
    # Rounding adds at most half a tick per slot: the hint stays feasible.
    busiest = model.NewIntVar(0, int(math.ceil(problem.balance_cap_tokens[layer] * unit)) + slots, "busiest")
    for g in gpus:
        model.Add(sum(int(tokens[j]) * n[j, g] for j in experts) <= busiest)
    model.Minimize(busiest + sum(int(cost[j, g]) * n[j, g] for j in experts for g in gpus))
    for (j, g), var in n.items():
        model.AddHint(var, int(hint[j, g]))
    model.AddHint(busiest, int((tokens @ hint).max()))
    solver = _solver(budget_s, deadline_s)
    if solver.Solve(model) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return row
    on_gpu = np.array([[solver.Value(n[j, g]) for g in gpus] for j in experts])
    if (replica_tokens @ on_gpu).max() > problem.balance_cap_tokens[layer] * (1 + TOLERANCE):
        return row
    return _canonical(problem, _slots_from_counts(problem, on_gpu)[None])[0]


# --------------------------------------------------------------------------- brute force


def brute_force(problem: ExpertProblem) -> ExpertPlacement:
    """Every placement of every layer (replica counts included) within the
    cap, combined by dynamic programming over the chain of layers (the
    objective is a sum of per-layer and adjacent-pair terms). Tiny instances only."""
    started = time.perf_counter()
    options = [_layer_options(problem, layer) for layer in range(problem.layers)]
    share = [shares(problem, rows) for rows in options]  # rows of one layer, as if layers
    best = [(problem.load_tokens[0] @ share[0]).max(axis=1)]
    back = []
    for layer in range(1, problem.layers):
        here = (problem.load_tokens[layer] @ share[layer]).max(axis=1)
        if problem.affinity_tokens is None:
            pair = np.zeros((len(options[layer - 1]), len(options[layer])))
        else:
            onward = np.einsum("aig,ij,gh->ajh", share[layer - 1], problem.affinity_tokens[layer - 1], problem.link_cost)
            pair = onward.reshape(len(onward), -1) @ share[layer].reshape(len(share[layer]), -1).T / problem.gpus
        total = best[-1][:, None] + pair
        back.append(total.argmin(axis=0))
        best.append(total.min(axis=0) + here)
    choice = [int(best[-1].argmin())]
    for pointers in reversed(back):
        choice.append(int(pointers[choice[-1]]))
    expert_of_slot = np.array([options[layer][c] for layer, c in enumerate(reversed(choice))])
    return _finish(problem, expert_of_slot, float(best[-1].min()), True, "brute-force", started)


def _layer_options(problem: ExpertProblem, layer: int) -> np.ndarray:
    """Every slot row of one layer (each GPU's experts as a sorted multiset)
    that holds every expert and keeps the busiest GPU within the cap."""
    per_gpu = list(itertools.combinations_with_replacement(range(problem.experts), problem.slots_per_gpu))
    rows = np.array([sum(choice, ()) for choice in itertools.product(per_gpu, repeat=problem.gpus)])
    rows = rows[np.array([len(set(row)) == problem.experts for row in rows.tolist()])]
    loads = problem.load_tokens[layer] @ shares(problem, rows)
    return rows[loads.max(axis=1) <= problem.balance_cap_tokens[layer] * (1 + TOLERANCE)]
