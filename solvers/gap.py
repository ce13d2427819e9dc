"""The relative gap every solver here reports between its answer and its
proven lower bound."""

from __future__ import annotations

# An objective and a bound summed in different orders differ in their last
# bits: a gap below this is none.
GAP_TOLERANCE = 1e-12


def relative_gap(objective: float, bound: float) -> float:
    """(objective - bound) / objective: 0 for an objective of 0 or less, or
    within GAP_TOLERANCE; inf for a positive objective and a bound of -inf
    (nothing proven); NaN stays NaN."""
    if objective <= 0:
        return 0.0
    gap = (objective - bound) / objective
    return 0.0 if gap <= GAP_TOLERANCE else gap
