"""torchtitan training logs (``torchtitan/train.py``'s stdout).

Lines read (colour escapes stripped first; any logger prefix is fine):

- the step line of ``MetricsProcessor.log`` (torchtitan/components/metrics.py,
  0.1-0.2; torchtitan/metrics.py + train.py in 2024), printed at step 1 and
  every ``metrics.log_freq`` steps: ``step: N  loss: L  grad_norm: G  memory:
  X GiB(P%)  tps: T  tflops: F  mfu: M%`` (2024 releases: no grad_norm or
  tflops, ``wps`` for tps). ``tps`` is tokens per second per GPU over the
  steps since the previous line (local tokens / (seconds x the non-data-parallel
  degree)); ``memory`` is ``torch.cuda.max_memory_reserved`` in GiB since the
  previous line (the monitor's peak is reset after each line), on rank 0;
- the model size of ``train.py``: ``Model <name> size: N total parameters``.

Validation lines (``validate step: ...``) are skipped. torchtitan logs from
the ranks in ``LOG_RANK`` (rank 0 by default; torchrun's ``--tee`` prefixes
each line with its node-local ``[rankN]:``); with several, the steps come
from the rank that logged most of them (under pipeline parallelism the
last rank, which has the loss) and each rank's memory is kept. A step a
rank logged already is another node's (or, without torchrun's output
filter, another rank's) copy: its figures count for memory only. A step
line without its last field (``mfu``) is cut short: left out when it is the
log's last line (a run killed mid-write), else bad input.
"""

from __future__ import annotations

import re

from loom.planner.specs.errors import SpecError
from loom.profiles.run_logs.record import GiB, Interval, RunLog, number, peak_report

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(r"(?<!validate )\bstep:\s*(\d+)\s+loss:")
FIELD = re.compile(r"\b(loss|grad_norm|memory|tps|wps|tflops|mfu):\s*([^\s(]+)(?:\(([^)]*)%\))?")
SIZE = re.compile(r"\bsize:\s*([\d,]+) total parameters")
RANK = re.compile(r"\[rank(\d+)\]:")


def looks_like(lines: list[str]) -> bool:
    """Whether ``lines`` are a torchtitan log (a step line)."""
    return any(STEP.search(ANSI.sub("", line)) and ("tps:" in line or "wps:" in line) for line in lines)


def read(lines: list[str], source: str) -> RunLog:
    """The run a torchtitan log describes (module docstring: what is read).

    Raises SpecError naming ``source`` and the line of an unreadable figure,
    or of a step that goes back on its rank (two runs in one log)."""
    steps: dict[int, list[Interval]] = {}
    peaks: dict[int, list[tuple[float, int]]] = {}
    parameters = None
    for index, raw in enumerate(lines):
        line, line_number = ANSI.sub("", raw), index + 1
        if match := SIZE.search(line):
            parameters = int(number(match.group(1), source, line_number, "the model size"))
            continue
        match = STEP.search(line)
        if not match or not ("tps:" in line or "wps:" in line):
            continue
        rank_match = RANK.search(line[:match.start()])
        rank = int(rank_match.group(1)) if rank_match else 0
        logged = steps.setdefault(rank, [])
        step, previous = int(match.group(1)), logged[-1].last if logged else 0
        if step < previous:
            raise SpecError(source, f"line {line_number}", f"a step after {previous} on rank {rank} (one run per log)", step)
        fields = {m.group(1): m.group(2) for m in FIELD.finditer(line[match.start():])}
        if "mfu" not in fields:
            if index == len(lines) - 1:
                break  # cut short as the run was killed
            raise SpecError(source, f"line {line_number}", "a step line ending in its 'mfu: M%' field (is it cut short?)", line.strip())
        rate = fields.get("tps", fields.get("wps"))
        if rate is None:
            raise SpecError(source, f"line {line_number}", "a 'tps: N' field in the step line", line.strip())
        tps = number(rate, source, line_number, "tps")
        if tps <= 0:
            raise SpecError(source, f"line {line_number}", "tps above 0", rate)
        memory = fields.get("memory")
        if memory is not None:
            if not memory.endswith("GiB"):
                raise SpecError(source, f"line {line_number}", "memory as 'X GiB(P%)'", memory)
            peaks.setdefault(rank, []).append((number(memory.removesuffix("GiB"), source, line_number, "memory") * GiB, line_number))
        if step == previous:
            continue  # another node's copy of a step this rank logged
        # the first line covers its own step only (time_last_log starts at the first step); later ones the steps since
        logged.append(Interval(first=previous + 1 if logged else step, last=step, line=line_number, tokens_per_s_per_gpu=tps))
    rank = max(steps, key=lambda r: (len(steps[r]), r)) if steps else 0
    # The peak over every line: warm-up allocations are memory the job needs too.
    memory = tuple(report for r in sorted(peaks) for report in peak_report(peaks[r], r, reserved=True))
    return RunLog(path=source, format="torchtitan", intervals=tuple(steps.get(rank, ())), memory=memory, parameters=parameters)
