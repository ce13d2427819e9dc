"""CI gates: ``--gate 'mfu>=0.4' --gate 'memory_headroom>=0.1'`` (quoted:
unquoted, ``>`` is a shell redirect). Each gate is a
metric of the best plan, a comparison and a number; ``loom`` exits 1 naming
every gate that fails."""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from loom.planner.specs.errors import SpecError
from loom.planner.plan import Plan

METRICS = {
    "mfu": lambda plan: plan.mfu,
    "memory_headroom": lambda plan: plan.memory_headroom,
    "step_time_s": lambda plan: plan.step_time_s,
    "tokens_per_s": lambda plan: plan.tokens_per_s,
    "tflops_per_gpu": lambda plan: plan.tflops_per_gpu,
    "peak_memory_GiB": lambda plan: plan.peak_memory.peak_bytes / 1024**3,
}
OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
GATE = re.compile(r"^\s*([a-zA-Z_]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def check(self, plan: Plan) -> tuple[bool, float]:
        value = METRICS[self.metric](plan)
        return OPERATORS[self.op](value, self.threshold), value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def parse_gate(text: str) -> Gate:
    """``METRIC OP NUMBER`` as a Gate.

    Raises SpecError (flag ``--gate``) for anything else; a bare metric name
    is what the shell leaves of an unquoted ``--gate mfu>=0.4`` (it takes
    ``>=0.4`` as a redirect to the file ``=0.4``), so that message says to
    quote it."""
    expected = f"METRIC OP NUMBER, quoted (--gate 'mfu>=0.4'), with METRIC one of {', '.join(METRICS)} and OP one of {', '.join(OPERATORS)}"
    if text.strip() in METRICS:
        raise SpecError("--gate", "gate", f"a comparison after {text.strip()}: unquoted, the shell took '>...' or '<...' as a "
                        f"redirect (and may have written a file named like '=0.4'); quote the gate: --gate '{text.strip()}>=0.4'", text)
    match = GATE.match(text)
    if not match or match.group(1) not in METRICS:
        raise SpecError("--gate", "gate", expected, text)
    try:
        threshold = float(match.group(3))
    except ValueError:
        raise SpecError("--gate", "gate", "a number after the comparison", text) from None
    if not math.isfinite(threshold):
        raise SpecError("--gate", "gate", "a finite number after the comparison", text)
    return Gate(match.group(1), match.group(2), threshold)


def failed_gates(gates: list[Gate], plan: Plan) -> list[str]:
    """One line per failing gate, e.g. ``mfu>=0.4 (got 0.352)``."""
    failures = []
    for gate in gates:
        ok, value = gate.check(plan)
        if not ok:
            failures.append(f"{gate} (got {value:.4g})")
    return failures
