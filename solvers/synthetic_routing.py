"""Seeded stand-ins for measured MoE routing, for benchmarks and tests.

Measured expert loads are skewed (a few hot experts per layer, different ones
in each layer) and routing is correlated across layers: ExFlow (Yao et al.
2024) found that a token's expert in one layer strongly predicts its expert in
the next. ``zipf_loads`` draws the first, ``correlated_trace`` both.
"""

from __future__ import annotations

import numpy as np


def popularity(experts: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf popularity (rank r gets 1 / r^exponent; 0 is uniform) in a random expert order, summing to 1."""
    weights = 1.0 / np.arange(1, experts + 1) ** exponent
    return weights[rng.permutation(experts)] / weights.sum()


def zipf_loads(layers: int, experts: int, routed_tokens: int, exponent: float, seed: int) -> np.ndarray:
    """(layers, experts) routed tokens: each layer a multinomial draw from its own Zipf popularity."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.multinomial(routed_tokens, popularity(experts, exponent, rng)) for _ in range(layers)]).astype(float)


def correlated_trace(tokens: int, layers: int, experts: int, top_k: int, exponent: float, seed: int,
                     successors: int = 4, affinity: float = 2.0) -> np.ndarray:
    """(tokens, layers, top_k) expert ids with inter-layer affinity.

    Every expert of layer l has ``successors`` preferred experts in layer
    l + 1 (drawn at random). A token's experts in layer l + 1 are its top-k
    of ``log popularity + affinity x (how many of its current experts prefer
    that one) + Gumbel noise``: a Gumbel top-k draw, so without affinity the
    token samples k distinct experts by popularity."""
    rng = np.random.default_rng(seed)
    popular = [np.log(popularity(experts, exponent, rng)) for _ in range(layers)]
    preferred = [np.stack([rng.choice(experts, successors, replace=False) for _ in range(experts)]) for _ in range(layers - 1)]
    trace = np.empty((tokens, layers, top_k), dtype=np.int64)
    pull = np.zeros((tokens, experts))
    for layer in range(layers):
        score = popular[layer] + pull + rng.gumbel(size=(tokens, experts))
        trace[:, layer] = np.argpartition(-score, top_k - 1, axis=1)[:, :top_k]
        if layer < layers - 1:
            liked = preferred[layer][trace[:, layer]].reshape(tokens, -1)  # (tokens, top_k x successors)
            votes = np.zeros(tokens * experts)
            np.add.at(votes, (np.arange(tokens)[:, None] * experts + liked).ravel(), 1.0)
            pull = affinity * votes.reshape(tokens, experts)
    return trace
