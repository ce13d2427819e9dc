"""Readers of what real training runs report: Megatron-LM, torchtitan and
DeepSpeed logs and PyTorch profiler traces, each turned into a ``RunLog``
(record.py) that ``loom compare`` and ``loom calibrate`` set against a plan.

Imports only ``planner.specs.errors`` (bad input is a SpecError naming the
file and line); knows nothing of plans or the cost model.
"""

from __future__ import annotations

from pathlib import Path

from loom.planner.specs.errors import SpecError
from loom.profiles.run_logs import chrome_trace, deepspeed, megatron, torchtitan
from loom.profiles.run_logs.record import RunLog, log_text

TEXT_READERS = (megatron, torchtitan, deepspeed)  # tried in order: the first whose lines it recognises reads the log


def read_run_log(path: Path) -> RunLog:
    """The run ``path`` describes: a profiler trace (JSON) or a training log,
    whose format is recognised from its lines.

    Raises SpecError naming the file (and line) when it is none of them or a
    figure in it does not parse."""
    if chrome_trace.looks_like(path):
        return chrome_trace.read(path)
    lines = log_text(path, "training log")
    for reader in TEXT_READERS:
        if reader.looks_like(lines):
            return reader.read(lines, str(path))
    raise SpecError(str(path), "<file>", "a Megatron-LM log (' iteration N/ M | ... elapsed time per iteration (ms): ...'), a torchtitan "
                    "log ('step: N  loss: ...  tps: ...'), a DeepSpeed log ('epoch=E/micro_step=M/global_step=G, ...') or a "
                    "torch.profiler trace (.json)")
