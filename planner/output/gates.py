"""CI gates: ``--gate mfu>=0.4 --gate memory_headroom>=0.1``. Each gate is a
metric of the best plan, a comparison and a number; ``loom`` exits 1 naming
every gate that fails."""

from __future__ import annotations

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
    match = GATE.match(text)
    if not match or match.group(1) not in METRICS:
        raise SpecError("--gate", text, f"METRIC OP NUMBER with METRIC one of {', '.join(METRICS)} and OP one of {', '.join(OPERATORS)}")
    try:
        threshold = float(match.group(3))
    except ValueError:
        raise SpecError("--gate", text, "a number after the comparison") from None
    return Gate(match.group(1), match.group(2), threshold)


def failed_gates(gates: list[Gate], plan: Plan) -> list[str]:
    """One line per failing gate, e.g. ``mfu>=0.4 (got 0.352)``."""
    failures = []
    for gate in gates:
        ok, value = gate.check(plan)
        if not ok:
            failures.append(f"{gate} (got {value:.4g})")
    return failures
