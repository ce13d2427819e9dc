"""Rank placement: which GPU slot runs each global rank.

Plain numbers in, a bijection out. Ranks come in blocks of ``block_size``
consecutive ranks that must share one host (one launcher per node numbers a
node's ranks consecutively), so a placement is: which host runs each block,
and which of the host's GPUs runs each rank of it. The objective is the
step's communication time on the links each group gets (solvers/links.py)::

    minimise  sum over group kinds t of  volume_t / min over groups g of t of bw(g)

``volume_t`` is the bytes (GB) each GPU moves per step over a group of kind t
(all groups of a kind run at once and the step waits for the slowest).

Methods (each returns the objective, a proven lower bound, gap and status):

* ``exact``: one CP-SAT model over every (rank, GPU) pair, for small clusters.
  Bottleneck objectives become levels: a boolean ``z[t, l]`` says "every
  group of kind t gets at least V_l", which forbids the rank pairs of those
  groups from sitting on GPU pairs slower than V_l; the objective is linear
  in the z's. The proven optimum matches brute force (tests/test_placement.py).
* ``decomposed``: nodes first, then GPUs inside each node (Pipette, Yim et
  al. 2023, decomposes the same way and anneals; here each level is a
  CP-SAT model with a bound). Level 1 places blocks on hosts, pricing a host
  by its slowest GPU's network bandwidth and its leaf switch: hosts with the
  same leaf, bandwidth and GPU type are interchangeable, so the model has a
  variable per (block, host class), not per (block, host). Level 2 permutes
  each host's GPUs with the ``exact`` model on that host alone. The bound is
  the global one of ``lower_bound_s``: every used GPU runs some rank, and
  that rank's groups of every kind together can be no faster than that
  GPU's links allow (a group reaching beyond its leaf switch pays the
  spine).
* ``anneal``: simulated annealing over the same moves (swap two blocks'
  hosts, or two GPUs inside a host), the baseline Pipette uses.

Both solvers start from ``start`` (Megatron's order) and keep it unless they
find something strictly faster, so a uniform cluster keeps the default.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loom.solvers.gap import relative_gap
from loom.solvers.links import group_bandwidth_GBps

if TYPE_CHECKING:
    from ortools.sat.python import cp_model

# CP-SAT objectives are integers: seconds are counted in nanoseconds.
TICKS_PER_S = 1e9
# Relative change below which two placements count as equally fast.
TOLERANCE = 1e-9
# Up to this many GPUs, one exact model; above, the decomposition.
EXACT_MAX_GPUS = 32
# Bandwidths within this relative distance are one level (measured noise).
LEVEL_TOLERANCE = 1e-6


@dataclass(frozen=True)
class GroupKind:
    name: str
    volume_GB: float  # per GPU per step
    groups: np.ndarray  # (count, size) global ranks


@dataclass(frozen=True)
class PlacementProblem:
    bandwidth_GBps: np.ndarray  # (slots, slots), inf on the diagonal
    host_of_slot: np.ndarray  # slot -> host index; a host's slots are consecutive
    kinds: tuple[GroupKind, ...]
    block_size: int  # ranks r // block_size share a host
    start: np.ndarray  # rank -> slot: the placement to improve
    host_type: np.ndarray  # host -> GPU type id: blocks move only between hosts of one type
    reorder_gpus: bool = True  # False: a block's ranks keep their GPUs' order on any host (DeepSpeed's runner)

    @property
    def num_ranks(self) -> int:
        return len(self.start)

    @property
    def num_blocks(self) -> int:
        return self.num_ranks // self.block_size

    def slots_of_host(self, host: int) -> np.ndarray:
        return np.flatnonzero(self.host_of_slot == host)


@dataclass(frozen=True)
class PlacementSolution:
    slot_of_rank: np.ndarray
    communication_s: float
    start_s: float
    bound_s: float
    status: str  # "optimal" (proven) or "feasible" (a gap to the bound remains)
    method: str
    wall_time_s: float

    @property
    def gap(self) -> float:
        return relative_gap(self.communication_s, self.bound_s)


def communication_s(problem: PlacementProblem, slot_of_rank: np.ndarray) -> float:
    """The objective: each kind's volume over its slowest group's bandwidth."""
    total = 0.0
    for kind in problem.kinds:
        if kind.groups.shape[1] < 2 or kind.volume_GB == 0:
            continue
        slots = slot_of_rank[kind.groups]
        total += kind.volume_GB / group_bandwidth_GBps(problem.bandwidth_GBps, problem.host_of_slot, slots).min()
    return total


@dataclass(frozen=True)
class _Reach:
    """The fastest partners each GPU slot has: inside its host (ranked),
    on any other host, on another host under its own leaf switch, and
    under another leaf; how many hosts its leaf holds."""

    inside_ranked: np.ndarray  # (slots, GPUs per host): fastest partner first
    across_best: np.ndarray
    in_leaf_best: np.ndarray
    across_leaf_best: np.ndarray
    leaf_hosts: np.ndarray  # hosts under each slot's leaf
    largest_leaf: int
    idle: int  # slots no rank uses


def _reach(problem: PlacementProblem) -> _Reach:
    bandwidth, host_of_slot = problem.bandwidth_GBps, problem.host_of_slot
    hosts = _hosts(problem)
    num_hosts, per_host = len(hosts.leaf), len(host_of_slot) // len(hosts.leaf)
    by_host = bandwidth.reshape(num_hosts, per_host, num_hosts, per_host)
    inside = by_host[np.arange(num_hosts), :, np.arange(num_hosts), :].copy()  # (host, GPU, partner)
    inside[:, np.arange(per_host), np.arange(per_host)] = -np.inf
    same_host = host_of_slot[:, None] == host_of_slot[None, :]
    leaf_of_slot = hosts.leaf[host_of_slot]
    same_leaf = leaf_of_slot[:, None] == leaf_of_slot[None, :]
    leaf_sizes = np.bincount(hosts.leaf)
    return _Reach(
        inside_ranked=-np.sort(-inside.reshape(len(host_of_slot), per_host), axis=1),
        across_best=np.where(same_host, 0.0, bandwidth).max(axis=1),
        in_leaf_best=np.where(~same_host & same_leaf, bandwidth, 0.0).max(axis=1),
        across_leaf_best=np.where(~same_leaf, bandwidth, 0.0).max(axis=1),
        leaf_hosts=leaf_sizes[leaf_of_slot],
        largest_leaf=int(leaf_sizes.max()),
        idle=len(host_of_slot) - problem.num_ranks,
    )


def _kind_caps_GBps(problem: PlacementProblem, reach: _Reach) -> np.ndarray:
    """Per kind, a bandwidth no placement gives all its groups (inf where
    none is proven). For a kind whose groups cover every rank, some group
    sits on each used GPU (the slowest GPUs may idle when ranks < GPUs). A
    group whose members include c on one node is at most as fast as its
    GPU's (c-1)-th fastest NVLink partner, and across nodes at most k times
    its fastest network partner; if it spans more nodes than a leaf switch
    holds, at most k times its fastest partner under another leaf."""
    caps = np.full(len(problem.kinds), np.inf)
    for t, kind in enumerate(problem.kinds):
        covers = len(np.unique(kind.groups)) == problem.num_ranks  # every rank in some group
        if kind.groups.shape[1] < 2 or kind.volume_GB == 0 or not covers:
            continue
        blocks = kind.groups // problem.block_size
        together = (blocks[:, :, None] == blocks[:, None, :]).sum(axis=2)  # members on each member's node
        spanned = np.array([len(set(row)) for row in blocks.tolist()])
        k = together.min(axis=1).max()
        best = np.full(len(problem.host_of_slot), np.inf)
        if together.min() > 1:
            best = np.minimum(best, reach.inside_ranked[:, together.min() - 2])
        if spanned.min() > 1:
            best = np.minimum(best, k * reach.across_best)
        if spanned.min() > reach.largest_leaf:
            best = np.minimum(best, k * reach.across_leaf_best)
        caps[t] = np.sort(best)[reach.idle]
    return caps


def _rank_shapes(problem: PlacementProblem) -> dict[tuple, list[int]]:
    """What the bound needs to know of each rank's groups, with the ranks
    alike in it merged: per group through the rank, (kind, members on the
    rank's node c, fewest members on one node k, nodes spanned > 1), and for
    each subset of its groups spanning nodes, how many nodes their union
    spans (mask-indexed). Maps each shape to the indices, in the shape's
    group list, of the groups that span nodes."""
    of_rank: list[list] = [[] for _ in range(problem.num_ranks)]
    for t, kind in enumerate(problem.kinds):
        if kind.groups.shape[1] < 2 or kind.volume_GB == 0:
            continue
        for group, row in zip(kind.groups.tolist(), (kind.groups // problem.block_size).tolist()):
            counts: dict[int, int] = {}
            for block in row:
                counts[block] = counts.get(block, 0) + 1
            k, blocks = min(counts.values()), frozenset(counts)
            for rank, block in zip(group, row):
                of_rank[rank].append((t, counts[block], k, blocks))
    shapes: dict[tuple, list[int]] = {}
    for groups in {tuple(sorted(groups, key=lambda g: (g[0], g[1], g[2], sorted(g[3])))) for groups in of_rank}:
        spanning = [i for i, group in enumerate(groups) if len(group[3]) > 1]
        unions = tuple(len(frozenset().union(*(groups[spanning[i]][3] for i in range(len(spanning)) if mask >> i & 1))) or 1
                       for mask in range(1 << len(spanning)))
        shapes[(tuple((t, c, k, len(blocks) > 1) for t, c, k, blocks in groups), unions)] = spanning
    return shapes


def lower_bound_s(problem: PlacementProblem) -> float:
    """No placement communicates less, by the groups through each GPU
    together. Fix a placement, a used slot s and the rank r on it. Each
    group g through r (c of its members on r's node, at least k on each of
    its nodes: both fixed by the blocks) is at most as fast as s's (c-1)-th
    fastest NVLink partner, and, if it spans nodes, k times s's fastest
    partner on another host under s's leaf when all its nodes are under that
    leaf, else under another leaf; and no faster than its kind's cap
    (_kind_caps_GBps). The groups wholly under s's leaf span together at most
    the hosts the leaf holds. So the step's communication is at least
    LB(s) = min over ranks and over such subsets of sum over kinds of
    volume / (that kind's bound at s), and, as at most ``idle`` slots go
    unused, at least the (idle + 1)-th largest LB(s). It is never below the
    kinds' caps summed (checked against brute force and CP-SAT optima in
    tests/test_placement.py)."""
    reach = _reach(problem)
    caps = _kind_caps_GBps(problem, reach)
    volumes = np.array([kind.volume_GB for kind in problem.kinds])
    capped = np.where(np.isfinite(caps), volumes / caps, 0.0)  # per kind, the cap's time
    slot_bound = np.full(len(problem.host_of_slot), np.inf)
    for (groups, unions), spanning in _rank_shapes(problem).items():
        for mask, union in enumerate(unions):
            possible = union <= reach.leaf_hosts
            if not possible.any():
                continue
            under_leaf = {spanning[i] for i in range(len(spanning)) if mask >> i & 1}
            fastest = np.tile(caps[:, None], (1, len(problem.host_of_slot)))  # (kind, slot)
            for i, (t, c, k, spans) in enumerate(groups):
                if c >= 2:
                    fastest[t] = np.minimum(fastest[t], reach.inside_ranked[:, c - 2])
                if spans:
                    fastest[t] = np.minimum(fastest[t], k * (reach.in_leaf_best if i in under_leaf else reach.across_leaf_best))
            with np.errstate(divide="ignore"):
                seconds = np.where(np.isfinite(fastest), volumes[:, None] / fastest, capped[:, None]).sum(axis=0)
            slot_bound = np.minimum(slot_bound, np.where(possible, seconds, np.inf))
    return float(np.sort(slot_bound)[::-1][reach.idle])


def solve(problem: PlacementProblem, time_limit_s: float = 10.0) -> PlacementSolution:
    """The best placement found within ``time_limit_s``: exact on small clusters,
    decomposed on large ones."""
    if len(problem.host_of_slot) <= EXACT_MAX_GPUS:
        return exact(problem, time_limit_s)
    return decomposed(problem, time_limit_s)


def _finish(problem: PlacementProblem, slot_of_rank: np.ndarray, bound_s: float, proven: bool, method: str, started: float) -> PlacementSolution:
    """Keep the start unless the result is strictly faster (ties keep Megatron's order)."""
    start_s = communication_s(problem, problem.start)
    found_s = communication_s(problem, slot_of_rank)
    if found_s >= start_s * (1 - TOLERANCE):
        slot_of_rank, found_s = problem.start, start_s
    bound_s = min(bound_s, found_s)
    status = "optimal" if proven or found_s <= bound_s * (1 + TOLERANCE) else "feasible"
    return PlacementSolution(slot_of_rank, found_s, start_s, bound_s, status, method, time.perf_counter() - started)


# ---------------------------------------------------------------- exact model


def _cp_sat():
    """OR-Tools' CP-SAT, loaded on first solve: it pulls in pandas (~0.4 s),
    which plans on uniform clusters never need."""
    from ortools.sat.python import cp_model

    return cp_model


def exact(problem: PlacementProblem, time_limit_s: float) -> PlacementSolution:
    started = time.perf_counter()
    cp = _cp_sat()
    ranks = np.arange(problem.num_ranks)
    hosts = np.unique(problem.host_of_slot)
    model = cp.CpModel()
    on = {}  # (rank, slot) -> bool
    block_on = {}  # (block, host) -> bool
    for block in range(problem.num_blocks):
        start_type = problem.host_type[problem.host_of_slot[problem.start[block * problem.block_size]]]
        for host in hosts:
            if problem.host_type[host] == start_type:
                block_on[block, host] = model.NewBoolVar(f"block{block}@host{host}")
        model.AddExactlyOne(v for (b, _), v in block_on.items() if b == block)
    for host in hosts:
        model.AddAtMostOne(v for (_, h), v in block_on.items() if h == host)
    for rank in ranks:
        for (block, host), chosen in block_on.items():
            if block == rank // problem.block_size:
                for slot in _allowed_slots(problem, rank, host):
                    on[rank, slot] = model.NewBoolVar(f"rank{rank}@slot{slot}")
                    model.AddImplication(on[rank, slot], chosen)
        model.AddExactlyOne(v for (r, _), v in on.items() if r == rank)
    for slot in range(len(problem.host_of_slot)):
        model.AddAtMostOne(v for (_, s), v in on.items() if s == slot)
    slots_of_rank = {rank: [s for (r, s) in on if r == rank] for rank in ranks}
    objective = _add_levels(model, problem, on, slots_of_rank)
    for (rank, slot), var in on.items():
        model.AddHint(var, int(problem.start[rank] == slot))
    status, solver = _solve(model, objective, time_limit_s)
    if status not in (cp.OPTIMAL, cp.FEASIBLE):
        return _finish(problem, problem.start, lower_bound_s(problem), False, "exact", started)
    slot_of_rank = np.array([next(s for s in slots_of_rank[r] if solver.Value(on[r, s])) for r in ranks])
    # Less one tick per rounded coefficient, so the bound stays a bound.
    solver_bound_s = (objective.constant + solver.BestObjectiveBound() - len(objective.terms)) / TICKS_PER_S
    bound_s = max(lower_bound_s(problem), solver_bound_s)
    return _finish(problem, slot_of_rank, bound_s, status == cp.OPTIMAL, "exact", started)


def _allowed_slots(problem: PlacementProblem, rank: int, host: int) -> np.ndarray:
    """The host's GPUs ``rank`` may run on: any, or when GPUs keep their order
    the one at the rank's position in its block."""
    slots = problem.slots_of_host(host)
    if problem.reorder_gpus:
        return slots
    block = np.arange(rank - rank % problem.block_size, rank - rank % problem.block_size + problem.block_size)
    position = int(np.argsort(np.argsort(problem.start[block]))[rank % problem.block_size])
    return slots[position : position + 1]


@dataclass
class _Objective:
    constant: float  # ticks when every kind is at its slowest level
    terms: list  # (coefficient, level var)


def _levels(values: np.ndarray) -> list[float]:
    """Distinct bandwidths, ascending, merging those closer than LEVEL_TOLERANCE."""
    levels: list[float] = []
    for value in np.unique(values[np.isfinite(values)]):
        if not levels or value > levels[-1] * (1 + LEVEL_TOLERANCE):
            levels.append(float(value))
    return levels


def _add_levels(model: cp_model.CpModel, problem: PlacementProblem, on: dict, slots_of_rank: dict) -> _Objective:
    """For every kind, level booleans z[l] ("all its groups get >= V_l") and the
    clauses that forbid a group's rank pair on a GPU pair slower than V_l: if
    rank i is on slot a, rank j must be on a slot b fast enough from a.
    Pairs in one block are priced at their NVLink pair; pairs across blocks
    at k times the pair (k: the group's fewest members on one node)."""
    bandwidth = problem.bandwidth_GBps
    objective = _Objective(0.0, [])
    for kind in problem.kinds:
        pairs = _rank_pairs(kind, problem.block_size)
        if not pairs or kind.volume_GB == 0:
            continue
        candidates = np.concatenate([factor * bandwidth[np.ix_(slots_of_rank[i], slots_of_rank[j])].ravel() for i, j, factor in pairs])
        for level, reached in _level_ladder(model, kind, _levels(candidates), objective):
            for i, j, factor in pairs:
                for a in slots_of_rank[i]:
                    fast = [on[j, b] for b in slots_of_rank[j] if b != a and factor * bandwidth[a, b] >= level]
                    if len(fast) < len(slots_of_rank[j]) - (a in slots_of_rank[j]):
                        model.AddBoolOr([reached.Not(), on[i, a].Not(), *fast])
    return objective


def _level_ladder(model, kind: GroupKind, levels: list[float], objective: _Objective) -> list[tuple[float, object]]:
    """For ascending bandwidth ``levels``, a boolean per level above the first
    ("every group of ``kind`` gets at least this"), each implying the one
    below; the objective starts at the slowest level's time and each reached
    level takes off the time it saves. Returns (level less the tolerance,
    boolean) for the caller to constrain."""
    objective.constant += kind.volume_GB / levels[0] * TICKS_PER_S
    ladder, previous = [], None
    for index in range(1, len(levels)):
        reached = model.NewBoolVar(f"{kind.name}>={levels[index]:.6g}")
        if previous is not None:
            model.AddImplication(reached, previous)
        objective.terms.append((kind.volume_GB * (1 / levels[index - 1] - 1 / levels[index]) * TICKS_PER_S, reached))
        ladder.append((levels[index] * (1 - LEVEL_TOLERANCE), reached))
        previous = reached
    return ladder


def _rank_pairs(kind: GroupKind, block_size: int) -> list[tuple[int, int, int]]:
    """(rank i, rank j, factor) for every pair in a group of ``kind``."""
    pairs = []
    for group in kind.groups.tolist():
        blocks = [rank // block_size for rank in group]
        per_node = min(blocks.count(b) for b in set(blocks))
        for x in range(len(group)):
            for y in range(x + 1, len(group)):
                pairs.append((group[x], group[y], 1 if blocks[x] == blocks[y] else per_node))
    return pairs


def _solve(model: cp_model.CpModel, objective: _Objective, time_limit_s: float):
    """Minimise; integer coefficients (ticks). One worker and a deterministic
    time budget, so the same problem gives the same answer on any machine.
    CP-SAT's deterministic seconds run 2-4x slower than wall seconds on this
    kind of model, hence half the limit; the wall-clock cap is a safety net."""
    model.Minimize(sum(-round(gain) * var for gain, var in objective.terms))
    solver = _cp_sat().CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_deterministic_time = time_limit_s / 2
    solver.parameters.max_time_in_seconds = 4 * time_limit_s
    solver.parameters.random_seed = 0
    status = solver.Solve(model)
    return status, solver


# ------------------------------------------------------------- decomposition


def decomposed(problem: PlacementProblem, time_limit_s: float) -> PlacementSolution:
    started = time.perf_counter()
    host_of_block = _place_blocks(problem, time_limit_s)
    slot_of_rank = _arrange_hosts(problem, _carry_local_order(problem, host_of_block))
    return _finish(problem, slot_of_rank, lower_bound_s(problem), False, "decomposed", started)


@dataclass(frozen=True)
class _Hosts:
    """Hosts as level 1 sees them: the network bandwidth of each host's slowest
    GPU (its best partner on another node), its leaf switch (hosts that reach
    each other at full speed) and the spine factor between leaves."""

    network_GBps: np.ndarray
    leaf: np.ndarray
    spine_factor: float
    classes: list[tuple[int, ...]]  # hosts that level 1 cannot tell apart
    class_of_host: np.ndarray


def _hosts(problem: PlacementProblem) -> _Hosts:
    bandwidth, host_of_slot = problem.bandwidth_GBps, problem.host_of_slot
    num_hosts, per_host = host_of_slot.max() + 1, np.bincount(host_of_slot).max()
    same = host_of_slot[:, None] == host_of_slot[None, :]
    network_GBps = np.where(same, 0.0, bandwidth).max(axis=1).reshape(num_hosts, per_host).min(axis=1)
    # Slowest GPU pair between two hosts; full speed means the same leaf.
    between = np.where(same, np.inf, bandwidth).reshape(num_hosts, per_host, num_hosts, per_host).min(axis=(1, 3))
    full = between >= np.minimum.outer(network_GBps, network_GBps) * (1 - LEVEL_TOLERANCE)
    leaf = np.zeros(num_hosts, dtype=np.int64)
    for index, members in enumerate(_components(full)):
        leaf[members] = index
    across = ~full & ~np.eye(num_hosts, dtype=bool)
    ratios = between[across] / np.minimum.outer(network_GBps, network_GBps)[across]
    spine_factor = float(ratios.min()) if ratios.size else 1.0
    keys = [(int(leaf[h]), round(float(network_GBps[h]), 6), int(problem.host_type[h])) for h in range(num_hosts)]
    classes = [tuple(h for h in range(num_hosts) if keys[h] == key) for key in sorted(set(keys))]
    class_of_host = np.empty(num_hosts, dtype=np.int64)
    for index, members in enumerate(classes):
        class_of_host[list(members)] = index
    return _Hosts(network_GBps, leaf, spine_factor, classes, class_of_host)


def _components(adjacent: np.ndarray) -> list[list[int]]:
    """Connected components of a boolean adjacency matrix, in index order."""
    label = -np.ones(len(adjacent), dtype=np.int64)
    components = []
    for seed in range(len(adjacent)):
        if label[seed] >= 0:
            continue
        members, frontier = [seed], [seed]
        label[seed] = len(components)
        while frontier:
            for other in np.flatnonzero(adjacent[frontier.pop()] & (label < 0)):
                label[other] = len(components)
                members.append(int(other))
                frontier.append(int(other))
        components.append(sorted(members))
    return components


def _block_groups(problem: PlacementProblem, kind: GroupKind) -> list[tuple[tuple[int, ...], int]]:
    """A kind's groups as the blocks they span and their fewest members on one
    block; groups inside one block are level 2's."""
    found = set()
    for group in (kind.groups // problem.block_size).tolist():
        blocks = sorted(set(group))
        if len(blocks) > 1:
            found.add((tuple(blocks), min(group.count(b) for b in blocks)))
    return sorted(found)


def _place_blocks(problem: PlacementProblem, time_limit_s: float) -> np.ndarray:
    """Level 1: a host for every block, by CP-SAT over host classes, hinted
    with the better of the start and the leaf packing."""
    hosts = _hosts(problem)
    start_host = _hint(problem, hosts)
    cp = _cp_sat()
    model = cp.CpModel()
    classes_of: dict[int, list] = {}  # block -> [(class, "block is in class")]
    for block in range(problem.num_blocks):
        start_class = hosts.class_of_host[start_host[block]]
        classes_of[block] = [
            (index, model.NewBoolVar(f"block{block}@class{index}"))
            for index, members in enumerate(hosts.classes)
            if problem.host_type[members[0]] == problem.host_type[start_host[block]]
        ]
        model.AddExactlyOne(var for _, var in classes_of[block])
        for index, var in classes_of[block]:
            model.AddHint(var, int(index == start_class))
    for index, members in enumerate(hosts.classes):
        model.Add(sum(var for options in classes_of.values() for c, var in options if c == index) <= len(members))
    objective = _Objective(0.0, [])
    for kind in problem.kinds:
        groups = _block_groups(problem, kind)
        if groups and kind.volume_GB > 0:
            _add_block_levels(model, hosts, kind, groups, classes_of, objective)
    status, solver = _solve(model, objective, time_limit_s)
    if status not in (cp.OPTIMAL, cp.FEASIBLE):
        return start_host
    chosen = {block: next(c for c, var in options if solver.Value(var)) for block, options in classes_of.items()}
    return _hosts_in_classes(hosts, start_host, chosen)


def _hint(problem: PlacementProblem, hosts: _Hosts) -> np.ndarray:
    start_host = problem.host_of_slot[problem.start[:: problem.block_size]]
    packed = _leaf_packing(problem, hosts, start_host)
    if packed is None:
        return start_host
    cost = {name: communication_s(problem, _carry_local_order(problem, option)) for name, option in (("start", start_host), ("packed", packed))}
    return packed if cost["packed"] < cost["start"] * (1 - TOLERANCE) else start_host


def _leaf_packing(problem: PlacementProblem, hosts: _Hosts, start_host: np.ndarray) -> np.ndarray | None:
    """Each group of the heaviest kind whose groups fit under one leaf switch,
    packed whole into a leaf (best fit, largest first): the move that takes a
    group off the spine rewires many nodes at once, which local search and
    CP-SAT's neighbourhoods rarely find. None if no kind packs (or GPU types mix)."""
    if len(set(problem.host_type.tolist())) > 1:
        return None
    free = {leaf: sorted(np.flatnonzero(hosts.leaf == leaf).tolist()) for leaf in sorted(set(hosts.leaf.tolist()))}
    for kind in sorted(problem.kinds, key=lambda kind: -kind.volume_GB):
        groups = sorted({blocks for blocks, _ in _block_groups(problem, kind)}, key=lambda blocks: (-len(blocks), blocks))
        if not groups or len({b for blocks in groups for b in blocks}) < sum(map(len, groups)):
            continue  # groups overlap (e.g. pipeline neighbours): not a packing
        if max(map(len, groups)) > max(map(len, free.values())) or len(free) < 2:
            continue
        leaves = {leaf: list(members) for leaf, members in free.items()}
        host_of_block = np.full(problem.num_blocks, -1)
        for blocks in groups:
            fits = [leaf for leaf, members in leaves.items() if len(members) >= len(blocks)]
            if not fits:
                break
            leaf = min(fits, key=lambda leaf: (len(leaves[leaf]), leaf))
            for block in blocks:
                host_of_block[block] = leaves[leaf].pop(0)
        else:
            rest = sorted(h for members in leaves.values() for h in members)
            host_of_block[host_of_block < 0] = rest[: int((host_of_block < 0).sum())]
            return host_of_block
    return None


def _add_block_levels(model, hosts: _Hosts, kind: GroupKind, groups, classes_of: dict[int, list], objective: _Objective) -> None:
    """Level booleans for one kind over block groups: a group reaches V only if
    every block's host class is fast enough (k x network >= V), and, where the
    spine would slow it below V, only if all its blocks share a leaf."""
    leaves = sorted(set(hosts.leaf.tolist()))
    class_network = [hosts.network_GBps[members[0]] for members in hosts.classes]
    class_leaf = [hosts.leaf[members[0]] for members in hosts.classes]
    spine = len(leaves) > 1 and hosts.spine_factor < 1
    factors = [1.0, hosts.spine_factor] if spine else [1.0]
    levels = _levels(np.array([k * q * f for _, k in groups for q in class_network for f in factors]))
    spans = {group: _spans_leaves(model, group, leaves, classes_of, class_leaf) for group in groups} if spine else {}
    for level, reached in _level_ladder(model, kind, levels, objective):
        # Every block of a group at this level sits in a fast enough class
        # (one clause per block and k: blocks recur across groups).
        for block, k in sorted({(block, k) for blocks, k in groups for block in blocks}):
            fast = [var for c, var in classes_of[block] if k * class_network[c] >= level]
            if len(fast) < len(classes_of[block]):
                model.AddBoolOr([reached.Not(), *fast])
        # ... and, if the group spans leaves, fast enough after the spine.
        for (blocks, k), spanning in spans.items():
            for block in blocks:
                fast = [var for c, var in classes_of[block] if k * class_network[c] * hosts.spine_factor >= level]
                if len(fast) < len(classes_of[block]):
                    model.AddBoolOr([reached.Not(), spanning.Not(), *fast])


def _spans_leaves(model, group, leaves: list[int], classes_of: dict[int, list], class_leaf: list[int]):
    """A boolean that is false only if every block of ``group`` is in one leaf."""
    blocks, _ = group
    within = [model.NewBoolVar(f"in-leaf{leaf}") for leaf in leaves]
    spanning = model.NewBoolVar("spans")
    model.AddExactlyOne([*within, spanning])
    for leaf, inside in zip(leaves, within):
        for block in blocks:
            model.AddBoolOr([inside.Not(), *(var for c, var in classes_of[block] if class_leaf[c] == leaf)])
    return spanning


def _hosts_in_classes(hosts: _Hosts, start_host: np.ndarray, class_of_block: dict[int, int]) -> np.ndarray:
    """Hosts for blocks from their classes: a block keeps its start host when
    that host is in its class; the others take the class's free hosts in order."""
    host_of_block = np.full(len(start_host), -1)
    taken: set[int] = set()
    for block, index in sorted(class_of_block.items()):
        if start_host[block] in hosts.classes[index]:
            host_of_block[block] = start_host[block]
            taken.add(int(start_host[block]))
    for block, index in sorted(class_of_block.items()):
        if host_of_block[block] < 0:
            host_of_block[block] = next(h for h in hosts.classes[index] if h not in taken)
            taken.add(int(host_of_block[block]))
    return host_of_block


def _carry_local_order(problem: PlacementProblem, host_of_block: np.ndarray) -> np.ndarray:
    """Ranks on their new hosts in the order they had on their start hosts."""
    slot_of_rank = np.empty_like(problem.start)
    for block, host in enumerate(host_of_block):
        ranks = np.arange(block * problem.block_size, (block + 1) * problem.block_size)
        old = problem.start[ranks]
        order = np.argsort(np.argsort(old))  # local position on the start host
        slot_of_rank[ranks] = problem.slots_of_host(host)[order]
    return slot_of_rank


# Above this many GPUs per node, level 2 keeps each node's GPU order.
LEVEL2_MAX_GPUS = 8


def _arrange_hosts(problem: PlacementProblem, slot_of_rank: np.ndarray) -> np.ndarray:
    """Level 2: on each host, the GPU order that is best for the groups touching
    it, every permutation tried (8! = 40,320 at most, vectorised), the other
    hosts as they are. Hosts whose NVLink pairs are all alike are left alone."""
    if problem.block_size > LEVEL2_MAX_GPUS or not problem.reorder_gpus:
        return slot_of_rank
    slot_of_rank = slot_of_rank.copy()
    perms = np.array(list(itertools.permutations(range(problem.block_size))))
    for block in range(problem.num_blocks):
        ranks = np.arange(block * problem.block_size, (block + 1) * problem.block_size)
        slots = np.sort(slot_of_rank[ranks])
        if _alike(problem, slots):
            continue
        costs = _local_costs(problem, slot_of_rank, ranks, slots, perms)
        best = int(np.argmin(costs))
        current = int(np.flatnonzero((slots[perms] == slot_of_rank[ranks]).all(axis=1))[0])
        if costs[best] < costs[current] * (1 - TOLERANCE):
            slot_of_rank[ranks] = slots[perms[best]]
    return slot_of_rank


def _alike(problem: PlacementProblem, slots: np.ndarray) -> bool:
    """Every NVLink pair of the host equally fast. Then no order of its GPUs
    beats another: each of its ranks is in a group of every kind that leaves
    the node, so a GPU with a slow NIC slows some group whatever runs on it,
    and the step waits for the slowest group of each kind."""
    inside = problem.bandwidth_GBps[np.ix_(slots, slots)]
    off = inside[~np.eye(len(slots), dtype=bool)]
    return bool((off == off[0]).all())


def _local_costs(problem: PlacementProblem, slot_of_rank: np.ndarray, ranks: np.ndarray, slots: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """Objective of each permutation of ``ranks`` over ``slots``, counting only
    the groups that touch them (the rest does not change)."""
    bandwidth, block = problem.bandwidth_GBps, ranks[0] // problem.block_size
    costs = np.zeros(len(perms))
    for kind in problem.kinds:
        if kind.groups.shape[1] < 2 or kind.volume_GB == 0:
            continue
        touching = kind.groups[(kind.groups // problem.block_size == block).any(axis=1)]
        slowest = np.full(len(perms), np.inf)
        for group in touching:
            local = group[group // problem.block_size == block] - ranks[0]
            remote = slot_of_rank[group[group // problem.block_size != block]]
            placed = slots[perms[:, local]]  # (perms, members here)
            for x in range(len(local)):
                for y in range(x + 1, len(local)):
                    slowest = np.minimum(slowest, bandwidth[placed[:, x], placed[:, y]])
            if len(remote):
                per_node = np.unique(group // problem.block_size, return_counts=True)[1].min()
                reach = bandwidth[np.ix_(slots, remote)].min(axis=1)  # each local slot's slowest remote partner
                slowest = np.minimum(slowest, per_node * reach[np.searchsorted(slots, placed)].min(axis=1))
        costs += kind.volume_GB / slowest
    return costs


# ------------------------------------------------------------ references


def brute_force(problem: PlacementProblem) -> PlacementSolution:
    """Every placement that keeps blocks on hosts (hosts for blocks times GPU
    orders inside each host), all GPU orders of one host assignment evaluated
    at once: the reference the exact model is checked against (16 GPUs as
    4 x 4 is 8 million placements, about a minute)."""
    started = time.perf_counter()
    size, hosts = problem.block_size, np.unique(problem.host_of_slot)
    orders = np.array(list(itertools.permutations(range(size))))
    choice = np.array(list(itertools.product(range(len(orders)), repeat=problem.num_blocks)))
    best_s, best = np.inf, problem.start
    for host_of_block in itertools.permutations(hosts, problem.num_blocks):
        placements = np.concatenate([problem.slots_of_host(h)[orders[choice[:, b]]] for b, h in enumerate(host_of_block)], axis=1)
        total = np.zeros(len(placements))
        for kind in problem.kinds:
            if kind.groups.shape[1] < 2 or kind.volume_GB == 0:
                continue
            slots = placements[:, kind.groups].reshape(-1, kind.groups.shape[1])
            bandwidth = group_bandwidth_GBps(problem.bandwidth_GBps, problem.host_of_slot, slots).reshape(len(placements), -1)
            total += kind.volume_GB / bandwidth.min(axis=1)
        if total.min() < best_s:
            best_s, best = float(total.min()), placements[int(total.argmin())]
    return PlacementSolution(best, best_s, communication_s(problem, problem.start), best_s, "optimal", "brute force", time.perf_counter() - started)




def anneal(problem: PlacementProblem, time_limit_s: float, seed: int = 0) -> PlacementSolution:
    """Simulated annealing from the start (Pipette's search): swap two blocks'
    hosts (of one GPU type) or two ranks inside a block; accept a worse
    placement with probability exp(-increase / temperature), the temperature
    falling geometrically over the time budget."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    current = problem.start.copy()
    current_s = best_s = communication_s(problem, current)
    best = current
    temperature0 = 0.05 * current_s
    while (elapsed := time.perf_counter() - started) < time_limit_s:
        candidate = _neighbour(problem, current, rng)
        candidate_s = communication_s(problem, candidate)
        temperature = temperature0 * 0.001 ** (elapsed / time_limit_s)
        if candidate_s <= current_s or rng.random() < math.exp(-(candidate_s - current_s) / max(temperature, 1e-30)):
            current, current_s = candidate, candidate_s
            if current_s < best_s:
                best, best_s = current, current_s
    return _finish(problem, best, lower_bound_s(problem), False, "anneal", started)


def _neighbour(problem: PlacementProblem, slot_of_rank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    moved = slot_of_rank.copy()
    size = problem.block_size
    a, b = rng.choice(problem.num_blocks, size=2, replace=problem.num_blocks < 2)
    host_a, host_b = (problem.host_of_slot[slot_of_rank[x * size]] for x in (a, b))
    if a != b and problem.host_type[host_a] == problem.host_type[host_b] and rng.random() < 0.5:
        moved[a * size : (a + 1) * size], moved[b * size : (b + 1) * size] = slot_of_rank[b * size : (b + 1) * size], slot_of_rank[a * size : (a + 1) * size]
    elif size > 1 and problem.reorder_gpus:
        i, j = a * size + rng.choice(size, size=2, replace=False)
        moved[i], moved[j] = slot_of_rank[j], slot_of_rank[i]
    return moved
