"""Answers beyond the cluster and the batch as given: whole nodes left idle,
and nearby global batch sizes.

Every layout uses every GPU (tp x pp x dp x cp = GPUs) and splits the global
batch evenly (micro batch x dp divides it). So a node count with a large
prime factor forces that factor into one degree: on 89 nodes of 8 A100,
GPT-3 175B (96 layers) can only run 89 pipeline stages. A global batch with
few factors of two (3,091 = 11 x 281) leaves data parallelism almost no
sizes. A practitioner then leaves a few nodes idle or rounds the batch; the
search does both (``search`` in layouts.py):

- idle nodes: on a cluster of GPUs of different compute, the search also runs
  on the nodes of each faster kind and up alone (synchronous training runs at
  its slowest GPU's pace, so the slow kind may cost more than it adds); when
  a node count has a prime factor above SMOOTH_PRIME, on k nodes, for the
  CANDIDATES values of k that leave at most MAX_IDLE_FRACTION of the nodes
  idle and factor best (most factors of two, then the most nodes), and
  likewise on counts whose GPUs a large prime factor of the global batch
  divides (idle_node_counts); the nodes left idle are the slowest
  (Cluster.fastest_nodes); those plans rank with the others by step time and
  report the GPUs they leave idle;
- nearby batches: when the global batch is not a multiple of ROUND_BATCH,
  the CANDIDATES batch sizes within NEARBY_BATCH_FRACTION with the most
  factors of two are searched too, and those whose best plan trains
  MIN_GAIN more tokens per second are reported (not planned: the batch is
  the user's choice).

Imports: planner.specs only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loom.planner.specs.cluster import Cluster, gpu_pace

# Thresholds of what counts as awkward and as near [assumed: a practitioner's
# rules of thumb, not measured]: at most an eighth of the nodes idle, batch
# sizes within 5%, counts whose prime factors are all at most 7, batches
# that are multiples of 16, gains of at least 1%.
MAX_IDLE_FRACTION = 1 / 8
NEARBY_BATCH_FRACTION = 0.05
SMOOTH_PRIME = 7
ROUND_BATCH = 16
MIN_GAIN = 0.01
CANDIDATES = 2


@dataclass(frozen=True)
class NearbyBatch:
    """A global batch size near the job's and what its best plan would give."""

    global_batch_size: int
    label: str  # its best plan's layout
    tokens_per_s: float
    gain: float  # tokens per second over the job's own best plan's, less 1
    idle_gpus: int = 0  # the GPUs its best plan leaves idle


def largest_prime_factor(n: int) -> int:
    """The largest prime dividing ``n`` (1 for n = 1)."""
    return max(prime_factors(n), default=1)


def factors_of_two(n: int) -> int:
    """How many times 2 divides ``n`` > 0."""
    return (n & -n).bit_length() - 1


def idle_node_counts(cluster: Cluster, global_batch_size: int) -> list[int]:
    """Node counts worth searching besides the whole cluster (none when its
    links were measured pair by pair, or for a count that would split an
    NVLink domain):

    - the nodes of each faster kind of GPU and up (faster: more compute;
      synchronous training runs at its slowest GPU's pace);
    - for the whole cluster and each of those, when its node count has a
      prime factor above SMOOTH_PRIME, up to CANDIDATES counts that leave at
      most MAX_IDLE_FRACTION of it idle and have only small prime factors,
      most factors of two first;
    - for each prime factor above SMOOTH_PRIME of the global batch that the
      GPU count lacks, up to CANDIDATES counts that leave at most
      MAX_IDLE_FRACTION idle and whose GPUs it divides, most factors of two
      first: data parallelism can then take it (3,091 = 11 x 281 on 1,344
      GPUs can only run DP1; on 1,232 it can run DP11)."""
    nodes, per_node = len(cluster.nodes), cluster.gpus_per_node
    if cluster.fabric.links_profile is not None:
        return []
    domain_nodes = cluster.slowest.domain_gpus // per_node

    def fewer(total: int, fits) -> list[int]:
        kept = [k for k in range(math.ceil(total * (1 - MAX_IDLE_FRACTION)), total) if k % domain_nodes == 0 and fits(k)]
        return sorted(kept, key=lambda k: (-factors_of_two(k * per_node), -k))[:CANDIDATES]

    compute = sorted({gpu_pace(node.gpu)[0] for node in cluster.nodes})
    faster = [sum(gpu_pace(node.gpu)[0] >= pace for node in cluster.nodes) for pace in compute[1:]]
    counts = list(faster)
    for total in [nodes, *faster]:
        if largest_prime_factor(total) > SMOOTH_PRIME:
            counts += fewer(total, lambda k: largest_prime_factor(k) <= SMOOTH_PRIME)
    for prime in prime_factors(global_batch_size):
        if prime > SMOOTH_PRIME and (nodes * per_node) % prime:
            counts += fewer(nodes, lambda k, prime=prime: k * per_node % prime == 0)
    return list(dict.fromkeys(k for k in counts if k % domain_nodes == 0))


def prime_factors(n: int) -> list[int]:
    """The distinct primes dividing ``n``, smallest first."""
    found, p = [], 2
    while p * p <= n:
        if n % p == 0:
            found.append(p)
            while n % p == 0:
                n //= p
        p += 1
    return found + ([n] if n > 1 else [])


def nearby_batch_sizes(global_batch_size: int) -> list[int]:
    """Global batch sizes worth trying besides the job's: none when it is a
    multiple of ROUND_BATCH; else up to CANDIDATES within
    NEARBY_BATCH_FRACTION with more factors of two, the most first, then the
    nearest."""
    if global_batch_size % ROUND_BATCH == 0:
        return []
    low = math.ceil(global_batch_size * (1 - NEARBY_BATCH_FRACTION))
    high = math.floor(global_batch_size * (1 + NEARBY_BATCH_FRACTION))
    rounder = [b for b in range(max(low, 1), high + 1) if factors_of_two(b) > factors_of_two(global_batch_size)]
    return sorted(rounder, key=lambda b: (-factors_of_two(b), abs(b - global_batch_size), b))[:CANDIDATES]
